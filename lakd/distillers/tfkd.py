"""Tf-KD, teacher-free knowledge distillation (Yuan et al., CVPR 2020), the manually designed regularisation.

No teacher: a virtual teacher puts probability ``a`` (0.99) on the label and ``(1 - a) / (C - 1)`` on every other
class; its distribution is softened as in the authors' code, ``u = softmax(q / T)`` of those probabilities, and the
student is pulled to it::

    loss = (1 - alpha) * CE + alpha * multiplier * KL(u || softmax(z_s)) / C      (KL summed over classes,
                                                                                batch mean)

(the ``/ C`` is the authors' ``nn.KLDivLoss()`` element mean over B x C). It is label smoothing with a tuned
shape. Defaults are the authors' CIFAR-100 setting (their ``experiments/base_experiments/base_resnet18/
params.json``: alpha 0.1, T 20, multiplier 100; a = 0.99 in their loss); the self-training variant Tf-KD_self is KD with a pre-trained student as the
teacher (method ``kd`` with ``teacher.name`` = the student's architecture).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import LakdError
from .base import Distiller, register_distiller


def virtual_teacher(target: torch.Tensor, num_classes: int, correct_prob: float, temperature: float):
    """The softened virtual teacher ``softmax(q / T)`` of the one-hot-like ``q`` (B x C)."""
    q = torch.full((target.shape[0], num_classes), (1.0 - correct_prob) / (num_classes - 1), device=target.device)
    q.scatter_(1, target.view(-1, 1), correct_prob)
    return F.softmax(q / temperature, dim=1)


def tfkd_reg_loss(logits_s: torch.Tensor, target: torch.Tensor, correct_prob: float, temperature: float):
    """``KL(u || softmax(z_s))`` averaged over the B x C elements (the authors' reduction)."""
    c = logits_s.shape[1]
    u = virtual_teacher(target, c, correct_prob, temperature)
    log_p = F.log_softmax(logits_s.float(), dim=1)
    return (u * (torch.log(u) - log_p)).sum(1).mean() / c


@register_distiller("tfkd")
class TfKD(Distiller):
    """Tf-KD (Yuan et al. CVPR 2020) distils a hand-designed virtual teacher: teacher-free label regularisation.

    Settings (``tfkd``): ``alpha``, ``T``, ``multiplier``, ``correct_prob``. No teacher is used."""

    display_name = "Tf-KD"
    report_order = 25
    needs_teacher = False
    DEFAULTS = {"tfkd": {"alpha": 0.1, "T": 20.0, "multiplier": 100.0, "correct_prob": 0.99}}

    def __init__(self, student, teacher, cfg, num_data=0):
        super().__init__(student, None, cfg, num_data)
        s = self.section("tfkd")
        self.alpha, self.T = float(s["alpha"]), float(s["T"])
        self.multiplier, self.correct_prob = float(s["multiplier"]), float(s["correct_prob"])
        if not 0 <= self.alpha <= 1:
            raise LakdError(f"tfkd.alpha must lie in [0, 1], got {s['alpha']!r}")
        if self.T <= 0:
            raise LakdError(f"tfkd.T (the temperature) must be positive, got {s['T']!r}")
        if not 0 < self.correct_prob < 1:
            raise LakdError(f"tfkd.correct_prob must lie in (0, 1) (the authors': 0.99), got {s['correct_prob']!r}")

    def teacher_pass(self, image, **batch):
        return None

    def student_losses(self, image, target, teacher_out=None, **batch):
        logits = self.student(image)
        if logits.shape[1] < 2:
            raise LakdError("tfkd needs at least 2 classes")
        return logits, {
            "ce": (1.0 - self.alpha) * F.cross_entropy(logits, target),
            "reg": self.alpha * self.multiplier * tfkd_reg_loss(logits, target, self.correct_prob, self.T),
        }
