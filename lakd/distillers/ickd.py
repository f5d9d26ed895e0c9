"""ICKD, inter-channel correlation knowledge distillation (Liu et al., ICCV 2021): the student's channel-by-channel
correlation matrix of its last feature map, after a learnable 1x1 connector, matches the teacher's.

As the authors' ICKD-CIFAR code (and torchdistill's ``ICKDLoss``): the student's last map (``feats["last"]``, the
input of global pooling) passes through a 1x1 convolution (no bias) to the teacher's channel count and a
BatchNorm (the authors' ``Embed``); per sample, the C x C inter-channel correlation ``G = F F^T`` of the flattened
C x HW maps is L2-normalised row by row, and the loss is ``sum_b ||G_s^b - G_t^b||_F^2 / (C B)``. Where the two
maps differ in size, the larger is average-pooled to the smaller's. Weights: CE 1, ICKD 2.5 (the authors'
CIFAR-100 setting, ``-b 2.5``). ``kd_weight`` (default 0) adds Hinton's KD term at temperature ``T``, which
torchdistill's ImageNet recipe combines with ICKD (CE 0.5, KD 0.5 at T = 1, ICKD 500).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..models.base import FeatureShape
from .base import Distiller, register_distiller
from .kd import kd_loss


class Conv1x1BN(nn.Sequential):
    """A 1x1 convolution without bias and a BatchNorm (optionally a ReLU): the channel connector of ICKD and SRD."""

    def __init__(self, c_in: int, c_out: int, relu: bool = False):
        layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, kernel_size=1, bias=False), nn.BatchNorm2d(c_out)]
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


def ickd_loss(f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
    """``sum_b ||G_s - G_t||_F^2 / (C B)`` for equal-shape maps (the student's already through the connector)."""
    b, c = f_s.shape[:2]
    with torch.no_grad():
        g_t = channel_correlation(f_t)
    return (channel_correlation(f_s) - g_t).pow(2).sum() / (c * b)


@register_distiller("ickd")
class ICKD(Distiller):
    """ICKD (Liu et al., ICCV 2021) distils the teacher's inter-channel correlations of its last feature map.

    The student's map is first mapped to the teacher's channels by a learnable 1x1 connector.

    Extra part: ``connector`` (1x1 conv + BatchNorm).
    """

    display_name = "ICKD"
    report_order = 44
    DEFAULTS = {"ickd": {"ce_weight": 1.0, "feat_weight": 2.5, "kd_weight": 0.0, "T": 4.0}}
    #: each setting's kind and range, checked before anything is built (lakd.settings; plain data)
    SETTINGS = {
        "ickd.ce_weight": {"kind": "number", "ge": 0},
        "ickd.feat_weight": {"kind": "number", "ge": 0},
        "ickd.kd_weight": {"kind": "number", "ge": 0},
        "ickd.T": {"kind": "number", "gt": 0, "about": "the KD temperature"},
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
        s_shape: FeatureShape = student.feature_info()["last"]
        t_shape: FeatureShape = teacher.feature_info()["last"]
        self.connector = Conv1x1BN(s_shape.channels, t_shape.channels)

    def teacher_pass(self, image, **batch):
        logits, feats = self.teacher_forward(image, features=True)
        return feats["last"], logits

    def student_losses(self, image, target, t_out, **batch):
        f_t, t_logits = t_out
        logits, feats = self.student(image, features=True)
        f_s = self.connector(feats["last"])
        with torch.autocast(device_type=f_s.device.type, enabled=False):
            loss = ickd_loss(*match_size(f_s.float(), f_t.float()))
        losses = {"ce": self.ce_weight * F.cross_entropy(logits, target), "ickd": self.feat_weight * loss}
        if self.kd_weight:
            losses["kd"] = self.kd_weight * kd_loss(logits, t_logits, self.T)
        return logits, losses
