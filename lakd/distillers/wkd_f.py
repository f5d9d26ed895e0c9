"""WKD-F, Wasserstein distance based feature distillation (Lv, Yang, Li, NeurIPS 2024): the per-channel Gaussian
(mean and standard deviation over space) of the last stage's map, matched by the 2-Wasserstein distance of
diagonal Gaussians, after a learnable projector on the student's map.

With ``mu`` and ``sigma = sqrt(var + eps)`` (unbiased variance) of every channel over each cell of a ``grid x grid``
partition of the map (``F.adaptive_avg_pool2d``'s windows), the projected student's and the teacher's::

    W2^2 = ratio * sum (mu_s - mu_t)^2 + sum (sigma_s - sigma_t)^2,   summed over channels and cells
    loss = ce_weight * CE + feat_weight * w(epoch) * W2^2 / (grid^2 * B)

as the authors' code (JiamingLv/WKD, ``mdistiller/distillers/WKD.py``: ``wkd_feature_loss``,
``adaptive_avg_std_pool2d``; ``MEAN_COV_RATIO`` is ``ratio``). The projector (``wkd_f.projector``) is theirs:
``conv1x1`` (mdistiller's ``ConvReg``: a convolution to the teacher's channels and size, BatchNorm, ReLU; lakd's
FitNet regressor) or ``bottleneck`` (``ConvRegBottleNeck``, same spatial size only: 1x1 to 256 channels, 3x3,
1x1 to the teacher's channels, each with a bias, then BatchNorm and ReLU; their ImageNet default). ``w(epoch)``
is WKD-L's cosine decay from ``decay_from`` (their ``COSINE_DECAY_EPOCH``). Their CIFAR-100 setting for
ResNet32x4 -> ResNet8x4: weight 0.08, ratio 4, grid 1, ``conv1x1``, decay from epoch 150 of 240; ImageNet
ResNet-34 -> ResNet-18: weight 0.02, ratio 2, grid 4, ``bottleneck``, decay over the whole run.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import LakdError
from ..models.base import FeatureShape
from .base import Distiller, register_distiller
from .fitnet import ConvRegressor
from .wkd_l import cosine_decay

PROJECTORS = ("conv1x1", "bottleneck")


class BottleneckProjector(nn.Module):
    """The authors' ``ConvRegBottleNeck`` for maps of equal size: 1x1 -> ``hidden``, 3x3, 1x1 -> teacher channels
    (convolutions with bias, no activation between), BatchNorm, ReLU."""

    def __init__(self, s: FeatureShape, t: FeatureShape, hidden: int = 256):
        super().__init__()
        if (s.height, s.width) != (t.height, t.width):
            raise LakdError(f"wkd_f.projector=bottleneck needs maps of the same size, got {s.height}x{s.width} "
                            f"(student) and {t.height}x{t.width} (teacher); use wkd_f.projector=conv1x1")
        self.conv1 = nn.Conv2d(s.channels, hidden, kernel_size=1)
        self.conv2 = nn.Conv2d(hidden, hidden, kernel_size=3, padding=1)
        self.conv3 = nn.Conv2d(hidden, t.channels, kernel_size=1)
        self.bn = nn.BatchNorm2d(t.channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv3(self.conv2(self.conv1(x)))))


def mean_std_grid(f: torch.Tensor, grid: int, eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """Per channel and cell of a ``grid x grid`` partition (adaptive pooling's windows: rows ``floor(i H / g)`` to
    ``ceil((i + 1) H / g)``): the mean and ``sqrt(unbiased variance + eps)``, each B x C x grid x grid (a cell of
    one pixel: variance 0)."""
    h, w = f.shape[-2:]
    means, stds = [], []
    for i in range(grid):
        r0, r1 = math.floor(i * h / grid), math.ceil((i + 1) * h / grid)
        for j in range(grid):
            c0, c1 = math.floor(j * w / grid), math.ceil((j + 1) * w / grid)
            block = f[:, :, r0:r1, c0:c1]
            means.append(block.mean(dim=(-1, -2)))
            # one-pixel cells (a grid finer than the map): the variance 0, not the unbiased 0/0
            stds.append(torch.sqrt(block.var(dim=(-1, -2), correction=int(block[0, 0].numel() > 1)) + eps))
    b, c = f.shape[:2]
    return (torch.stack(means, -1).view(b, c, grid, grid), torch.stack(stds, -1).view(b, c, grid, grid))


def wkd_feature_terms(f_s: torch.Tensor, f_t: torch.Tensor, grid: int = 1,
                      eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean term, std term): ``sum (mu_s - mu_t)^2`` and ``sum (sigma_s - sigma_t)^2`` over channels and cells,
    divided by ``grid^2 * B``."""
    mu_s, sd_s = mean_std_grid(f_s.float(), grid, eps)
    mu_t, sd_t = mean_std_grid(f_t.float(), grid, eps)
    n = grid * grid * f_s.shape[0]
    return (mu_s - mu_t).pow(2).sum() / n, (sd_s - sd_t).pow(2).sum() / n


def stage_feature(feats: dict, stage: int) -> torch.Tensor:
    return feats["stem"] if stage == 0 else feats["stages"][stage - 1]


@register_distiller("wkd_f")
class WKDF(Distiller):
    """WKD-F (Lv et al., NeurIPS 2024) distils the last stage's per-channel Gaussians by the Wasserstein distance.

    Settings (``wkd_f``): ``ce_weight``, ``feat_weight``, ``mean_cov_ratio``, ``grid``, ``projector`` (``conv1x1``
    or ``bottleneck``), ``stage`` (``last``, or 0 (stem) to n), ``eps``, ``decay_from``. Extra part: the
    projector."""

    display_name = "WKD-F"
    report_order = 56
    DEFAULTS = {"wkd_f": {"ce_weight": 1.0, "feat_weight": 0.08, "mean_cov_ratio": 4.0, "grid": 1,
                          "projector": "conv1x1", "stage": "last", "eps": 1e-5, "decay_from": 150}}
    #: each setting's kind and range, checked before anything is built (lakd.settings; plain data)
    SETTINGS = {
        "wkd_f.ce_weight": {"kind": "number", "ge": 0},
        "wkd_f.feat_weight": {"kind": "number", "ge": 0},
        "wkd_f.mean_cov_ratio": {"kind": "number", "ge": 0, "about": "the mean term's weight against the std term's"},
        "wkd_f.grid": {"kind": "int", "ge": 1, "about": "cells per side"},
        "wkd_f.projector": {"kind": "choice", "choices": ["conv1x1", "bottleneck"]},
        "wkd_f.stage": {"kind": "int", "ge": 0, "also": ["last"], "about": "0 (stem) to n, or last"},
        "wkd_f.eps": {"kind": "number", "gt": 0, "about": "added to the variance"},
        "wkd_f.decay_from": {"kind": "number", "ge": 0, "about": "the epoch after which the weight decays"},
    }
    #: checks over several settings, or a setting and the run (lakd.settings)
    CHECKS = [
        {"rule": "not_all_zero", "keys": ["wkd_f.ce_weight", "wkd_f.feat_weight"]},
    ]

    def __init__(self, student, teacher, cfg, num_data=0):
        super().__init__(student, teacher, cfg, num_data)
        s = self.section("wkd_f")
        self.ce_weight, self.feat_weight, self.ratio = (float(s[k]) for k in
                                                        ("ce_weight", "feat_weight", "mean_cov_ratio"))
        self.eps, self.grid, self.decay_from = float(s["eps"]), int(s["grid"]), float(s["decay_from"])
        info_s, info_t = student.feature_info(), teacher.feature_info()
        n = min(len(info_s["stages"]), len(info_t["stages"]))
        stage = s["stage"]
        if stage == "last":
            stage = n
        if isinstance(stage, bool) or not isinstance(stage, int) or not 0 <= stage <= n:
            raise LakdError(f"wkd_f.stage={s['stage']!r} is out of range: use last (the authors' -1) or an integer "
                            f"from 0 (stem) to {n}")
        # 'last' means each network's own last stage (the authors' feats[-1]), even with unequal stage counts
        self.stage_s = len(info_s["stages"]) if s["stage"] == "last" else stage
        self.stage_t = len(info_t["stages"]) if s["stage"] == "last" else stage
        shape_s = ([info_s["stem"], *info_s["stages"]])[self.stage_s]
        shape_t = ([info_t["stem"], *info_t["stages"]])[self.stage_t]
        self.projector = (ConvRegressor(shape_s, shape_t) if s["projector"] == "conv1x1"
                          else BottleneckProjector(shape_s, shape_t))

    def weight_now(self) -> float:
        return cosine_decay(self.feat_weight, self.epoch + 1, self.decay_from, self.total_epochs)

    def teacher_pass(self, image, **batch):
        return stage_feature(self.teacher_forward(image, features=True)[1], self.stage_t)

    def student_losses(self, image, target, f_t, **batch):
        logits, feats = self.student(image, features=True)
        f_s = self.projector(stage_feature(feats, self.stage_s))
        with torch.autocast(device_type=f_s.device.type, enabled=False):
            mean_term, std_term = wkd_feature_terms(f_s, f_t, self.grid, self.eps)
        return logits, {
            "ce": self.ce_weight * F.cross_entropy(logits, target),
            "wkd_f": self.weight_now() * (self.ratio * mean_term + std_term),
        }
