"""FitNet (Romero et al., 2015): the student's hint feature, mapped by a learnable regressor, regresses the
teacher's feature at the same depth (MSE), on top of cross-entropy.

Follows mdistiller's ``FitNet``: the hint is one feature of ``[stem, stage 1, stage 2, ...]`` (``hint_stage``;
default ``null`` (or ``auto``): the middle stage, ``(n + 1) // 2`` of the n stages both models have, which is
mdistiller's ``HINT_LAYER: 2`` for the 3-stage CIFAR nets and stage 1 for a 2-stage student), the
regressor is mdistiller's ``ConvReg`` (conv + BN + ReLU; the conv is a 3x3 stride-2 conv when the student map
is twice the teacher's size, a 4x4 stride-2 transposed conv when it is half, and otherwise a
``(1 + Hs - Ht) x (1 + Ws - Wt)`` conv, i.e. 1x1 for equal sizes), loss ``ce_weight * CE + feat_weight * MSE``
with weights 1 and 100.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import LakdError
from ..models.base import FeatureShape
from .base import Distiller, register_distiller


class ConvRegressor(nn.Module):
    """Maps a student feature map (Cs x Hs x Ws) onto the teacher's (Ct x Ht x Wt): conv, BN, ReLU."""

    def __init__(self, s: FeatureShape, t: FeatureShape, use_relu: bool = True):
        super().__init__()
        if s.height == 2 * t.height and s.width == 2 * t.width:
            self.conv = nn.Conv2d(s.channels, t.channels, kernel_size=3, stride=2, padding=1)
        elif 2 * s.height == t.height and 2 * s.width == t.width:
            self.conv = nn.ConvTranspose2d(s.channels, t.channels, kernel_size=4, stride=2, padding=1)
        elif s.height >= t.height and s.width >= t.width:
            self.conv = nn.Conv2d(s.channels, t.channels,
                                  kernel_size=(1 + s.height - t.height, 1 + s.width - t.width))
        else:  # a smaller map in another ratio (a CNN student's deep stage against a ViT's fixed patch grid):
            # upsampled bilinearly to the teacher's size, then a 1x1 conv (mdistiller's ConvReg has no such case)
            self.up = (t.height, t.width)
            self.conv = nn.Conv2d(s.channels, t.channels, kernel_size=1)
        self.bn = nn.BatchNorm2d(t.channels)
        self.use_relu = use_relu

    #: the teacher's size a smaller student map is upsampled to first (None: the conv maps the sizes itself)
    up: tuple[int, int] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.up is not None:
            x = F.interpolate(x, size=self.up, mode="bilinear", align_corners=False)
        x = self.bn(self.conv(x))
        return F.relu(x) if self.use_relu else x


def hint_feature(feats: dict, stage: int) -> torch.Tensor:
    """Feature ``stage`` of ``[stem, stage 1, stage 2, ...]`` (mdistiller's ``feats`` indexing)."""
    return feats["stem"] if stage == 0 else feats["stages"][stage - 1]


@register_distiller("fitnet")
class FitNet(Distiller):
    display_name = "FitNet"
    report_order = 5
    bench_default = True
    DEFAULTS = {"fitnet": {"ce_weight": 1.0, "feat_weight": 100.0, "hint_stage": None}}  # None/auto: middle stage
    #: each setting's kind and range, checked before anything is built (lakd.settings; plain data)
    SETTINGS = {
        "fitnet.ce_weight": {"kind": "number", "ge": 0},
        "fitnet.feat_weight": {"kind": "number", "ge": 0},
        "fitnet.hint_stage": {"kind": "int", "ge": 0, "null": True, "also": ["auto"], "example": "auto", "about":
            "the stage whose output is the hint: 0 (stem) to the last stage, or auto (the middle one)"},
    }
    #: checks over several settings, or a setting and the run (lakd.settings)
    CHECKS = [
        {"rule": "not_all_zero", "keys": ["fitnet.ce_weight", "fitnet.feat_weight"]},
    ]

    def __init__(self, student, teacher, cfg, num_data=0):
        super().__init__(student, teacher, cfg, num_data)
        s = self.section("fitnet")
        self.ce_weight, self.feat_weight = float(s["ce_weight"]), float(s["feat_weight"])
        info_s, info_t = student.feature_info(), teacher.feature_info()
        n = min(len(info_s["stages"]), len(info_t["stages"]))
        stage = s["hint_stage"]
        if stage is None or stage == "auto":  # the middle stage of those both models have (2 of 3 on CIFAR nets)
            stage = max(1, (n + 1) // 2) if n else 0
        if isinstance(stage, bool) or not isinstance(stage, int) or not 0 <= stage <= n:
            raise LakdError(f"fitnet.hint_stage={stage!r} is out of range: use an integer from 0 (stem) "
                            f"to {n} (last stage), or auto (the middle stage) for "
                            f"{getattr(student, 'label', type(student).__name__)} / "
                            f"{getattr(teacher, 'label', type(teacher).__name__)}")
        self.hint_stage = stage
        shapes_s = [info_s["stem"], *info_s["stages"]]
        shapes_t = [info_t["stem"], *info_t["stages"]]
        self.regressor = ConvRegressor(shapes_s[stage], shapes_t[stage])

    def teacher_pass(self, image, **batch):
        return hint_feature(self.teacher_forward(image, features=True)[1], self.hint_stage)

    def student_losses(self, image, target, t_hint, **batch):
        logits, feats = self.student(image, features=True)
        pred = self.regressor(hint_feature(feats, self.hint_stage))
        return logits, {
            "ce": self.ce_weight * F.cross_entropy(logits, target),
            "fitnet": self.feat_weight * F.mse_loss(pred, t_hint),
        }
