"""DeiT's distillation token (Touvron et al., ICML 2021, "Training data-efficient image transformers &
distillation through attention"): a student with a class token and a distillation token, each read by its own
linear head (timm's ``deit_*_distilled_*``, ``VisionTransformerDistilled``); the class head learns the labels, the
distillation head the teacher's output:

    L = ce_weight * CE(z_cls, y) + distill_weight * L_distill(z_dist, z_t)

``deit.type: hard`` (the paper's DeiT-distilled, its default recipe): ``L_distill = CE(z_dist, argmax z_t)``.
``soft``: ``T^2 * KL(softmax(z_t / T) || softmax(z_dist / T))``, the summed KL divided by the number of logits
(B x K: DeiT's ``losses.py``, ``deit.kl_reduction: numel``) or by the batch size (timm's
``TokenDistillationTask``, ``batchmean``). DeiT's ``--distillation-alpha`` is ``distill_weight``, with
``ce_weight = 1 - alpha`` (alpha 0.5, its default, is this method's default); timm's ``task_loss_weight`` and
``distill_loss_weight`` are the two weights as they are.

At evaluation the student's output is the mean of its two heads, as DeiT's and timm's: that is the distilled
network's own output, so ``lakd eval`` and the trainer's validation need nothing more. The training step reads
the two heads from the adapted network (``feats["heads"]``: a network whose logits are the mean of two linear heads),
so timm's ``set_distilled_training`` is not needed. The teacher can be any network (its logits only).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import LakdError
from .base import Distiller, register_distiller

TYPES = ("hard", "soft")
REDUCTIONS = ("numel", "batchmean")


def deit_distill_loss(dist_logits: torch.Tensor, teacher_logits: torch.Tensor, kind: str = "hard", T: float = 1.0,
                      reduction: str = "numel") -> torch.Tensor:
    """The distillation head's loss against the teacher's logits: ``hard`` (cross-entropy with the teacher's
    argmax) or ``soft`` (temperature KL times T^2, summed and divided by the logits' count, ``numel``, or the batch
    size, ``batchmean``)."""
    if kind == "hard":
        return F.cross_entropy(dist_logits, teacher_logits.argmax(dim=1))
    kl = F.kl_div(F.log_softmax(dist_logits.float() / T, dim=1), F.log_softmax(teacher_logits.float() / T, dim=1),
                  reduction="sum", log_target=True)
    return kl * (T * T) / (dist_logits.numel() if reduction == "numel" else dist_logits.shape[0])


@register_distiller("deit")
class DeiT(Distiller):
    """DeiT (Touvron et al., ICML 2021) trains a distilled ViT's distillation token on the teacher's output (hard
    or soft) and its class token on the labels; evaluation averages the two heads.

    Needs a student with a class head and a distillation head (timm's ``deit_*_distilled_*``)."""

    display_name = "DeiT"
    report_order = 60
    DEFAULTS = {"deit": {"type": "hard", "ce_weight": 0.5, "distill_weight": 0.5, "T": 1.0,
                         "kl_reduction": "numel"}}
    #: each setting's kind and range, checked before anything is built (lakd.settings; plain data)
    SETTINGS = {
        "deit.type": {"kind": "choice", "choices": list(TYPES), "about": "hard: the teacher's argmax (DeiT's paper), "
                      "soft: its softened probabilities"},
        "deit.ce_weight": {"kind": "number", "ge": 0, "about": "DeiT's 1 - alpha"},
        "deit.distill_weight": {"kind": "number", "ge": 0, "about": "DeiT's alpha"},
        "deit.T": {"kind": "number", "gt": 0, "about": "the soft loss's temperature (DeiT's tau)"},
        "deit.kl_reduction": {"kind": "choice", "choices": list(REDUCTIONS), "about":
                              "numel: DeiT's losses.py, batchmean: timm's token distillation"},
    }
    #: checks over several settings (lakd.settings)
    CHECKS = [{"rule": "not_all_zero", "keys": ["deit.ce_weight", "deit.distill_weight"]}]

    def requirements(self):
        return {"student": ("heads",), "teacher": ()}

    def __init__(self, student, teacher, cfg, num_data=0):
        super().__init__(student, teacher, cfg, num_data)
        s = self.section("deit")  # kinds and ranges checked by the base class (SETTINGS)
        self.type, self.reduction = s["type"], s["kl_reduction"]
        self.ce_weight, self.distill_weight, self.T = float(s["ce_weight"]), float(s["distill_weight"]), float(s["T"])
        if student.feature_info()["num_classes"] != teacher.feature_info()["num_classes"]:
            raise LakdError("DeiT's distillation head learns the teacher's classes: give the student the teacher's "
                            "number of classes (model.num_classes)")

    def student_heads(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The student's class-head and distillation-head logits (one forward; no feature maps copied)."""
        s = self.student
        h = s.run_blocks(s.stem_forward(image), 0, s.num_blocks)
        _, more = s.head_features(h)
        cls_logits, dist_logits = more["heads"]
        return cls_logits, dist_logits

    def student_losses(self, image, target, t_logits, **batch):
        cls_logits, dist_logits = self.student_heads(image)
        return cls_logits, {
            "ce": self.ce_weight * F.cross_entropy(cls_logits, target),
            "distill": self.distill_weight * deit_distill_loss(dist_logits, t_logits, self.type, self.T,
                                                               self.reduction),
        }
