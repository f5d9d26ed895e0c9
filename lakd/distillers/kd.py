"""KD (Hinton et al., 2015): cross-entropy plus the temperature-scaled KL divergence to the teacher.

``kd.logit_stand: true`` is logit standardization (Sun et al., CVPR 2024): each sample's logits of student and
teacher are z-scored (``(z - mean) / (std + 1e-7)`` over the classes, the reference's unbiased std) before the
temperature softmax, so the student matches the teacher's logit *relations* rather than their range. The
reference's KD+LS settings are ``T = 2`` (3 for vgg13 -> vgg8) and ``kd_weight = 9`` (variant ``kd_ls``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Distiller, register_distiller


def standardize(logits: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Logit standardization (Sun et al., 2024): each row z-scored over the classes, ``(z - mean) / (std + eps)``
    with the unbiased std, as in the reference code."""
    logits = logits.float()
    return (logits - logits.mean(dim=1, keepdim=True)) / (logits.std(dim=1, keepdim=True) + eps)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature,
            logit_stand: bool = False) -> torch.Tensor:
    """KL(teacher || student) on temperature-softened distributions, batch-mean, times T^2 (``temperature`` a
    number or a tensor, e.g. CTKD's learnable one). ``logit_stand``: both sides z-scored first."""
    if logit_stand:
        student_logits, teacher_logits = standardize(student_logits), standardize(teacher_logits)
    log_p_s = F.log_softmax(student_logits.float() / temperature, dim=1)
    log_p_t = F.log_softmax(teacher_logits.float() / temperature, dim=1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(1).mean()
    return kl * temperature**2


@register_distiller("kd")
class KD(Distiller):
    """KD (Hinton et al. 2015) distils softened class probabilities; kd_ls: + logit standardization (CVPR 2024).

    ``kd.logit_stand: true`` z-scores both sides' logits before the softmax (Sun et al., CVPR 2024); the variant
    ``kd_ls`` sets it with the reference's ``T = 2`` and ``kd_weight = 9``."""

    display_name = "KD"
    report_order = 1
    bench_default = True
    DEFAULTS = {"kd": {"T": 4.0, "ce_weight": 0.1, "kd_weight": 0.9, "logit_stand": False}}
    #: each setting's kind and range, checked before anything is built (lakd.settings; plain data)
    SETTINGS = {
        "kd.ce_weight": {"kind": "number", "ge": 0},
        "kd.kd_weight": {"kind": "number", "ge": 0},
        "kd.T": {"kind": "number", "gt": 0, "about": "the temperature"},
        "kd.logit_stand": {"kind": "bool", "about": "logit standardization"},
    }
    #: checks over several settings, or a setting and the run (lakd.settings)
    CHECKS = [
        {"rule": "not_all_zero", "keys": ["kd.ce_weight", "kd.kd_weight"]},
    ]
    #: KD with logit standardization at the reference's settings (Sun et al., 2024)
    variants = {"kd_ls": ["kd.logit_stand=true", "kd.T=2.0", "kd.kd_weight=9.0"]}
    bench_variants = ()  # lakd bench's default list stays the paper's Table 4 methods

    def __init__(self, student, teacher, cfg, num_data=0):
        super().__init__(student, teacher, cfg, num_data)
        s = self.section("kd")
        self.T, self.ce_weight, self.kd_weight = float(s["T"]), float(s["ce_weight"]), float(s["kd_weight"])
        self.logit_stand = bool(s["logit_stand"])

    def student_losses(self, image, target, t_logits, **batch):
        logits = self.student(image)
        return logits, {
            "ce": self.ce_weight * F.cross_entropy(logits, target),
            "kd": self.kd_weight * kd_loss(logits, t_logits, self.T, self.logit_stand),
        }
