"""AB, activation boundaries (Heo et al., AAAI 2019), in RepDistiller's form: an initialisation stage.

Each student stage's pre-ReLU output passes through a connector to the teacher's shape (none when channels and
size already match, else FitNet's conv regressor without ReLU); the alternative (hinge) loss of the paper's
Eq. 6 makes the student neuron active exactly where the teacher's is, with margin ``mu``::

    (s + mu)^2 [s > -mu and t <= 0]  +  (s - mu)^2 [s <= mu and t > 0]

summed over channels and positions, averaged over the batch, stage ``i`` of ``n`` weighted ``2^(i - n + 1)``
(the deepest 1), times 3/1000 (RepDistiller's ``ABLoss``). ``prepare`` trains the student and the connectors
with this loss alone for ``pretrain_epochs`` (30) at ``pretrain_lr`` (0.05), RepDistiller's ``init`` (which trains
the stem and blocks, ``get_feat_modules``, and keeps the student's head in eval mode: a WRN's final BatchNorm,
which the last stage's pre-activation passes through, neither trains nor updates its statistics); the
distillation that follows is ``ce_weight * CE + feat_weight * AB`` with ``feat_weight`` 0 (RepDistiller adds
no AB term after the initialisation; its script ``-a 0 -b 1``), i.e. cross-entropy training from the
initialised student. With ``feat_weight > 0`` the connectors keep training with the student.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import Distiller, register_distiller
from .fitnet import ConvRegressor
from .stage_utils import head_modules


def ab_hinge(s: torch.Tensor, t: torch.Tensor, margin: float) -> torch.Tensor:
    """The alternative loss of AB, summed over everything (divide by the batch yourself)."""
    s, t = s.float(), t.float()
    on = (t > 0).to(s.dtype)
    return ((s + margin).pow(2) * ((s > -margin).to(s.dtype) * (1 - on))
            + (s - margin).pow(2) * ((s <= margin).to(s.dtype) * on)).sum()


@register_distiller("ab")
class AB(Distiller):
    """AB (Heo et al., AAAI 2019) distils the teacher neurons' activation boundaries in a first stage.

    Which pre-activations are positive, through connectors and a margin hinge (``prepare``)."""

    display_name = "AB"
    report_order = 52
    needs = ("preact",)
    DEFAULTS = {"ab": {"ce_weight": 1.0, "feat_weight": 0.0, "margin": 1.0, "pretrain_epochs": 30,
                       "pretrain_lr": 0.05}}
    #: each setting's kind and range, checked before anything is built (lakd.settings; plain data)
    SETTINGS = {
        "ab.ce_weight": {"kind": "number", "ge": 0},
        "ab.feat_weight": {"kind": "number", "ge": 0},
        "ab.margin": {"kind": "number", "gt": 0, "about": "the hinge margin on the pre-ReLU responses"},
        "ab.pretrain_epochs": {"kind": "int", "ge": 0, "about": "epochs of the initialisation stage"},
        "ab.pretrain_lr": {"kind": "number", "gt": 0, "about": "the initialisation stage's learning rate"},
    }
    #: checks over several settings, or a setting and the run (lakd.settings)
    CHECKS = [
        {"rule": "not_all_zero", "keys": ["ab.ce_weight", "ab.feat_weight"]},
    ]

    def __init__(self, student, teacher, cfg, num_data=0):
        super().__init__(student, teacher, cfg, num_data)
        s = self.section("ab")
        self.ce_weight, self.feat_weight = float(s["ce_weight"]), float(s["feat_weight"])
        self.margin, self.pretrain_epochs = float(s["margin"]), int(s["pretrain_epochs"])
        self.pretrain_lr = float(s["pretrain_lr"])
        info_s, info_t = student.feature_info()["stages"], teacher.feature_info()["stages"]
        self.num_stages = n = min(len(info_s), len(info_t))
        self.connectors = nn.ModuleList(
            nn.Identity() if (a.channels, a.height, a.width) == (b.channels, b.height, b.width)
            else ConvRegressor(a, b, use_relu=False) for a, b in zip(info_s[-n:], info_t[-n:]))
        if self.feat_weight == 0:
            self.connectors.requires_grad_(False)  # used by prepare() only

    def ab_loss(self, pre_s: list, pre_t: list) -> torch.Tensor:
        n = self.num_stages
        total = 0.0
        for i, (s, t, conn) in enumerate(zip(pre_s[-n:], pre_t[-n:], self.connectors)):
            total = total + 2.0 ** (i - n + 1) * ab_hinge(conn(s), t, self.margin) / s.shape[0]
        return total * 3 / 1000

    def teacher_pass(self, image, **batch):
        if self.feat_weight == 0:
            return None  # cross-entropy only after the initialisation: no teacher pass
        return self.teacher_forward(image, features=True, preact=True)[1]["stages_preact"]

    def prepare(self, train_loader, device=None) -> None:
        """RepDistiller's initialisation stage: the student and connectors fit the teacher's boundaries."""
        self.connectors.requires_grad_(True)
        params = self.feature_parameters() + list(self.connectors.parameters())
        try:
            def loss(image, target):
                pre_t = self.teacher_forward(image, features=True, preact=True)[1]["stages_preact"]
                pre_s = self.student(image, features=True, preact=True)[1]["stages_preact"]
                return self.ab_loss(pre_s, pre_t)

            self.run_stage(train_loader, device, params, loss, self.pretrain_epochs, self.pretrain_lr,
                           "initialisation", eval_modules=head_modules(self.student))
        finally:
            if self.feat_weight == 0:
                self.connectors.requires_grad_(False)

    def student_losses(self, image, target, pre_t, **batch):
        if self.feat_weight == 0:
            logits = self.student(image)
            return logits, {"ce": self.ce_weight * F.cross_entropy(logits, target)}
        logits, feats = self.student(image, features=True, preact=True)
        return logits, {
            "ce": self.ce_weight * F.cross_entropy(logits, target),
            "ab": self.feat_weight * self.ab_loss(feats["stages_preact"], pre_t),
        }
