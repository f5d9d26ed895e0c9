"""ICKD, inter-channel correlation knowledge distillation (Liu et al., ICCV 2021): the student's channel-by-channel
correlation matrix of its last feature map, after a learnable connector, matches the teacher's.

The student's last map (``feats["last"]``, the input of global pooling) passes through a convolution (no bias) to
the teacher's channel count and a BatchNorm (the authors' ``Embed``); per sample, the C x C inter-channel
correlation ``G = F F^T`` of the flattened C x HW maps is L2-normalised row by row, and the loss is
``sum_b ||G_s^b - G_t^b||_F^2 / (C B^p)``. Where the two maps differ in size, the larger is average-pooled to the
smaller's. The authors have two code bases, which differ in the connector and the divisor:

- CIFAR-100 (ADLab-AutoDrive/ICKD ``Cifar100/distiller_zoo/ICKD.py``, class ``ICKDLoss``): a 1x1 connector and
  ``p = 1`` (``/ (ch * bsz)``): ``ickd.embed_kernel: 1``, ``ickd.batch_power: 1``, the defaults;
- ImageNet (their ``ImageNet/torchdistill``: ``ChSimLoss`` in ``losses/single.py``, the ``Embed`` of
  ``models/special.py``; torchdistill's own ``ChSimLoss`` and ``ChannelSimilarityEmbed`` are the same): a 3x3
  connector (padding 1) and ``p = 2`` (``/ (ch * bsz * bsz)``): ``embed_kernel: 3``, ``batch_power: 2``. With
  ``p = 2`` the term shrinks as 1/B: its weight belongs to the batch it was set for.

Weights: CE 1, ICKD 2.5, KD 1 at ``T`` 4: the authors' CIFAR-100 headline row "ICKD-C" (``-a 1 -b 2.5``, KD at
RepDistiller's ``kd_T`` 4); ``ickd.kd_weight=0`` is their "ICKD-C (w/o KL)" row (``-a 0 -b 2.5``). torchdistill's
ImageNet recipe combines ICKD with KD too (CE 0.5, KD 0.5 at T = 1, ICKD 500).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..models.base import FeatureShape
from .base import Distiller, register_distiller
from .kd import kd_loss


class Conv1x1BN(nn.Sequential):
    """A convolution without bias (1x1 by default; ``kernel_size`` k pads k // 2, keeping the map's size) and a
    BatchNorm (optionally a ReLU): the channel connector of ICKD and SRRL."""

    def __init__(self, c_in: int, c_out: int, relu: bool = False, kernel_size: int = 1):
        layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, kernel_size=kernel_size, padding=kernel_size // 2,
                                             bias=False), nn.BatchNorm2d(c_out)]
        if relu:
            layers.append(nn.ReLU(inplace=True))
        super().__init__(*layers)


def match_size(f_s: torch.Tensor, f_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The larger of two maps average-pooled to the smaller's spatial size."""
    if f_s.shape[2:] == f_t.shape[2:]:
        return f_s, f_t
    if f_s.shape[2] * f_s.shape[3] > f_t.shape[2] * f_t.shape[3]:
        return F.adaptive_avg_pool2d(f_s, f_t.shape[2:]), f_t
    return f_s, F.adaptive_avg_pool2d(f_t, f_s.shape[2:])


def channel_correlation(f: torch.Tensor) -> torch.Tensor:
    """B x C x C: ``F F^T`` of each sample's C x HW map, every row L2-normalised."""
    a = f.flatten(2).float()
    return F.normalize(torch.bmm(a, a.transpose(1, 2)), p=2, dim=2)


def ickd_loss(f_s: torch.Tensor, f_t: torch.Tensor, batch_power: int = 1) -> torch.Tensor:
    """``sum_b ||G_s - G_t||_F^2 / (C B^batch_power)`` for equal-shape maps (the student's already through the
    connector): ``batch_power`` 1 as the authors' CIFAR code, 2 as their ImageNet code and torchdistill."""
    b, c = f_s.shape[:2]
    with torch.no_grad():
        g_t = channel_correlation(f_t)
    return (channel_correlation(f_s) - g_t).pow(2).sum() / (c * b**batch_power)


@register_distiller("ickd")
class ICKD(Distiller):
    """ICKD (Liu et al., ICCV 2021) distils the teacher's inter-channel correlations of its last feature map.

    The student's map is first mapped to the teacher's channels by a learnable connector.

    Extra part: ``connector`` (``ickd.embed_kernel`` x ``embed_kernel`` conv + BatchNorm).
    """

    display_name = "ICKD"
    report_order = 44
    DEFAULTS = {"ickd": {"ce_weight": 1.0, "feat_weight": 2.5, "kd_weight": 1.0, "T": 4.0, "embed_kernel": 1,
                         "batch_power": 1}}
    #: each setting's kind and range, checked before anything is built (lakd.settings; plain data)
    SETTINGS = {
        "ickd.ce_weight": {"kind": "number", "ge": 0},
        "ickd.feat_weight": {"kind": "number", "ge": 0},
        "ickd.kd_weight": {"kind": "number", "ge": 0},
        "ickd.T": {"kind": "number", "gt": 0, "about": "the KD temperature"},
        "ickd.embed_kernel": {"kind": "int", "ge": 1, "odd": True, "about":
            "the connector's kernel size: 1 (the authors' CIFAR code) or 3 (their ImageNet code)"},
        "ickd.batch_power": {"kind": "choice", "choices": [1, 2], "about":
            "1: the loss divided by C*B (the authors' CIFAR code), 2: by C*B^2 (their ImageNet code, torchdistill)"},
    }
    #: checks over several settings, or a setting and the run (lakd.settings)
    CHECKS = [
        {"rule": "not_all_zero", "keys": ["ickd.ce_weight", "ickd.feat_weight", "ickd.kd_weight"]},
    ]

    def __init__(self, student, teacher, cfg, num_data=0):
        super().__init__(student, teacher, cfg, num_data)
        s = self.section("ickd")
        self.ce_weight, self.feat_weight = float(s["ce_weight"]), float(s["feat_weight"])
        self.kd_weight, self.T = float(s["kd_weight"]), float(s["T"])
        k, self.batch_power = int(s["embed_kernel"]), int(s["batch_power"])
        s_shape: FeatureShape = student.feature_info()["last"]
        t_shape: FeatureShape = teacher.feature_info()["last"]
        self.connector = Conv1x1BN(s_shape.channels, t_shape.channels, kernel_size=k)

    def teacher_pass(self, image, **batch):
        logits, feats = self.teacher_forward(image, features=True)
        return feats["last"], logits

    def student_losses(self, image, target, t_out, **batch):
        f_t, t_logits = t_out
        logits, feats = self.student(image, features=True)
        f_s = self.connector(feats["last"])
        with torch.autocast(device_type=f_s.device.type, enabled=False):
            loss = ickd_loss(*match_size(f_s.float(), f_t.float()), self.batch_power)
        losses = {"ce": self.ce_weight * F.cross_entropy(logits, target), "ickd": self.feat_weight * loss}
        if self.kd_weight:
            losses["kd"] = self.kd_weight * kd_loss(logits, t_logits, self.T)
        return logits, losses
