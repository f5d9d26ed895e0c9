"""SP, similarity-preserving knowledge distillation (Tung & Mori, ICCV 2019): the student's batch similarity
(Gram) matrix of a feature map matches the teacher's.

As mdistiller's ``SP`` (RepDistiller's ``Similarity``): on the last stage output (``feats["stages"][-1]``,
mdistiller's ``feats[-1]``), each sample's map is flattened, ``G = A A^T`` (B x B) is L2-normalised row by row,
and the loss is ``||G_t - G_s||_F^2 / B^2`` (the paper's equation 4). Weights: CE 1, SP 3000 (mdistiller's
``SP.LOSS.FEAT_WEIGHT``, RepDistiller's ``-b 3000``). Student and teacher maps may differ in channels and size:
only the B x B matrices are compared.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Distiller, register_distiller


def sp_gram(f: torch.Tensor) -> torch.Tensor:
    """The B x B similarity matrix of a batch of features, each row L2-normalised."""
    a = f.flatten(1).float()
    return F.normalize(a @ a.t(), p=2, dim=1)


def sp_loss(f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
    """``||G_t - G_s||_F^2 / B^2`` (the teacher side without gradient)."""
    with torch.no_grad():
        g_t = sp_gram(f_t)
    g_s = sp_gram(f_s)
    return (g_t - g_s).pow(2).sum() / f_s.shape[0] ** 2


@register_distiller("sp")
class SP(Distiller):
    """SP (Tung & Mori, ICCV 2019) distils the teacher's batch similarity matrix of its last stage output.

    Loss ``ce_weight * CE + feat_weight * ||G_t - G_s||^2 / B^2`` (module docstring); no learnable part.
    """

    display_name = "SP"
    report_order = 41
    DEFAULTS = {"sp": {"ce_weight": 1.0, "feat_weight": 3000.0}}
    #: each setting's kind and range, checked before anything is built (lakd.settings; plain data)
    SETTINGS = {
        "sp.ce_weight": {"kind": "number", "ge": 0},
        "sp.feat_weight": {"kind": "number", "ge": 0},
    }
    #: checks over several settings, or a setting and the run (lakd.settings)
    CHECKS = [
        {"rule": "not_all_zero", "keys": ["sp.ce_weight", "sp.feat_weight"]},
        {"rule": "compare", "key": "@smallest_batch", "op": ">=", "than": 2, "about":
            "SP matches the similarities between the images of a batch"},
    ]

    def __init__(self, student, teacher, cfg, num_data=0):
        super().__init__(student, teacher, cfg, num_data)
        s = self.section("sp")
        self.ce_weight, self.feat_weight = float(s["ce_weight"]), float(s["feat_weight"])

    def teacher_pass(self, image, **batch):
        return self.teacher_forward(image, features=True)[1]["stages"][-1]

    def student_losses(self, image, target, f_t, **batch):
        logits, feats = self.student(image, features=True)
        f_s = feats["stages"][-1]
        with torch.autocast(device_type=f_s.device.type, enabled=False):  # float32: Gram entries overflow fp16
            loss = sp_loss(f_s, f_t)
        return logits, {"ce": self.ce_weight * F.cross_entropy(logits, target), "sp": self.feat_weight * loss}
