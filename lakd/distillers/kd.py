"""KD (Hinton et al., 2015): cross-entropy plus the temperature-scaled KL divergence to the teacher."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Distiller, register_distiller


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher || student) on temperature-softened distributions, batch-mean, times T^2."""
    log_p_s = F.log_softmax(student_logits.float() / temperature, dim=1)
    log_p_t = F.log_softmax(teacher_logits.float() / temperature, dim=1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(1).mean()
    return kl * temperature**2


@register_distiller("kd")
class KD(Distiller):
    display_name = "KD"
    report_order = 1
    bench_default = True
    DEFAULTS = {"kd": {"T": 4.0, "ce_weight": 0.1, "kd_weight": 0.9}}

    def __init__(self, student, teacher, cfg, num_data=0):
        super().__init__(student, teacher, cfg, num_data)
        s = self.section("kd")
        self.T, self.ce_weight, self.kd_weight = float(s["T"]), float(s["ce_weight"]), float(s["kd_weight"])

    def student_losses(self, image, target, t_logits, **batch):
        logits = self.student(image)
        return logits, {
            "ce": self.ce_weight * F.cross_entropy(logits, target),
            "kd": self.kd_weight * kd_loss(logits, t_logits, self.T),
        }
