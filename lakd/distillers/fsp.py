"""FSP, flow of solution procedure (Yim et al., CVPR 2017), in RepDistiller's form: an initialisation stage.

The FSP matrix of two maps ``a`` (C1 x H x W) and ``b`` (C2 x H x W) of one net is ``G[i, j] = mean over
positions of a_i * b_j`` (the paper's Eq. 1; the larger map is average-pooled to the smaller one's size); it is
taken for every consecutive pair of ``[stem, stage 1, ..., stage n]``. The loss (Eq. 2, equal weights) is the
mean squared difference of the student's and teacher's matrices, summed over the pairs; the two nets must have
the same channels at every one of these points (RepDistiller refuses otherwise, e.g. wrn_40_2 -> wrn_40_1).
``prepare`` trains the student with this loss alone for ``pretrain_epochs`` (30) at ``pretrain_lr`` (0.05),
RepDistiller's ``init``, as the paper's first stage (its stem and blocks, ``get_feat_modules``; the head stays in
eval mode, so a WRN's final BatchNorm keeps its statistics); the training that follows is
``ce_weight * CE + feat_weight * FSP`` with ``feat_weight`` 0 (RepDistiller adds no FSP term afterwards, its
``-b 50`` is unused), i.e. the paper's second stage, cross-entropy from the initialised student.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import LakdError
from .base import Distiller, register_distiller
from .stage_utils import head_modules, pool_to_match


def fsp_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """B x C1 x C2: the mean over positions of the products of ``a``'s and ``b``'s channels, in float32 (also
    under AMP, which would run the product in half precision)."""
    with torch.autocast(device_type=a.device.type, enabled=False):
        a, b = pool_to_match(a.float(), b.float())
        return torch.einsum("bihw,bjhw->bij", a, b) / (a.shape[-2] * a.shape[-1])


def fsp_points(feats: dict) -> list:
    return [feats["stem"], *feats["stages"]]


@register_distiller("fsp")
class FSP(Distiller):
    """FSP (Yim et al., CVPR 2017) distils the flow between stages (FSP matrices) in a first stage.

    The student is initialised by ``prepare`` to match the teacher's matrices, then trained."""

    display_name = "FSP"
    report_order = 50
    DEFAULTS = {"fsp": {"ce_weight": 1.0, "feat_weight": 0.0, "pretrain_epochs": 30, "pretrain_lr": 0.05}}
    #: each setting's kind and range, checked before anything is built (lakd.settings; plain data)
    SETTINGS = {
        "fsp.ce_weight": {"kind": "number", "ge": 0},
        "fsp.feat_weight": {"kind": "number", "ge": 0},
        "fsp.pretrain_epochs": {"kind": "int", "ge": 0, "about": "epochs of the initialisation stage"},
        "fsp.pretrain_lr": {"kind": "number", "gt": 0, "about": "the initialisation stage's learning rate"},
    }
    #: checks over several settings, or a setting and the run (lakd.settings)
    CHECKS = [
        {"rule": "not_all_zero", "keys": ["fsp.ce_weight", "fsp.feat_weight"]},
    ]

    def __init__(self, student, teacher, cfg, num_data=0):
        super().__init__(student, teacher, cfg, num_data)
        s = self.section("fsp")
        self.ce_weight, self.feat_weight = float(s["ce_weight"]), float(s["feat_weight"])
        self.pretrain_epochs, self.pretrain_lr = int(s["pretrain_epochs"]), float(s["pretrain_lr"])
        info_s, info_t = student.feature_info(), teacher.feature_info()
        ch_s = [f.channels for f in [info_s["stem"], *info_s["stages"]]]
        ch_t = [f.channels for f in [info_t["stem"], *info_t["stages"]]]
        if ch_s != ch_t:
            raise LakdError(f"FSP needs the same channels in student and teacher at the stem and every stage; "
                            f"the student has {ch_s}, the teacher {ch_t}; pick a pair of equal widths or another "
                            f"method")

    def fsp_loss(self, f_s: list, f_t: list) -> torch.Tensor:
        total = 0.0
        for i in range(len(f_s) - 1):
            g_s = fsp_matrix(f_s[i], f_s[i + 1])
            g_t = fsp_matrix(f_t[i], f_t[i + 1])
            total = total + (g_s - g_t).pow(2).mean()
        return total

    def teacher_pass(self, image, **batch):
        if self.feat_weight == 0:
            return None  # cross-entropy only after the initialisation: no teacher pass
        return fsp_points(self.teacher_forward(image, features=True)[1])

    def prepare(self, train_loader, device=None) -> None:
        """The initialisation stage: the student fits the teacher's FSP matrices (module doc)."""
        params = self.feature_parameters()

        def loss(image, target):
            f_t = fsp_points(self.teacher_forward(image, features=True)[1])
            return self.fsp_loss(fsp_points(self.student(image, features=True)[1]), f_t)

        self.run_stage(train_loader, device, params, loss, self.pretrain_epochs, self.pretrain_lr, "initialisation",
                       eval_modules=head_modules(self.student))

    def student_losses(self, image, target, f_t, **batch):
        if self.feat_weight == 0:
            logits = self.student(image)
            return logits, {"ce": self.ce_weight * F.cross_entropy(logits, target)}
        logits, feats = self.student(image, features=True)
        return logits, {
            "ce": self.ce_weight * F.cross_entropy(logits, target),
            "fsp": self.feat_weight * self.fsp_loss(fsp_points(feats), f_t),
        }
