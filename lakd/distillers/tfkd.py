"""Tf-KD, teacher-free knowledge distillation (Yuan et al., CVPR 2020): the manually designed regularisation
(``tfkd.mode: reg``, the default) and self-training (``tfkd.mode: self``, variant ``tfkd_self``).

Regularisation, no teacher: a virtual teacher puts probability ``a`` (0.99) on the label and ``(1 - a) / (C - 1)`` on every other
class; its distribution is softened as in the authors' code, ``u = softmax(q / T)`` of those probabilities, and the
student is pulled to it::

    loss = (1 - alpha) * CE + alpha * multiplier * KL(u || softmax(z_s)) / C      (KL summed over classes,
                                                                                batch mean)

(the ``/ C`` is the authors' ``nn.KLDivLoss()`` element mean over B x C). It is label smoothing with a tuned
shape. Defaults are the authors' CIFAR-100 setting (their ``experiments/base_experiments/base_resnet18/
params.json``: alpha 0.1, T 20, multiplier 100; a = 0.99 in their loss).

Self-training (Tf-KD_self): the teacher is a pre-trained network of the student's own architecture (trained first
with the scratch config), and the loss is the authors' ``loss_kd_self``::

    loss = (1 - alpha) * CE + alpha * multiplier * T^2 * KL(softmax(z_t / T) || softmax(z_s / T)) / C

(again ``nn.KLDivLoss()``'s mean over B x C). Its settings are ``self_alpha``, ``self_T``, ``self_multiplier``
(the authors' ``alpha``, ``temperature``, ``multiplier`` of a ``*_self_teacher/params.json``; ours are their
ResNet18 ones, 0.95, 6, 50, the nearest of their networks to the CIFAR ResNets). A teacher of another
architecture is allowed with a warning: the paper also distils a stronger student from a weaker teacher
(Re-KD) and from a poorly trained one (Defective KD); that is KD with this loss, not self-training.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from ..errors import LakdError
from .base import Distiller, register_distiller

log = logging.getLogger(__name__)


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


def tfkd_self_loss(logits_s: torch.Tensor, logits_t: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T^2 * KL(softmax(z_t / T) || softmax(z_s / T))`` averaged over the B x C elements (``loss_kd_self``'s
    ``nn.KLDivLoss()`` times ``T * T``, before its multiplier)."""
    log_p_s = F.log_softmax(logits_s.float() / temperature, dim=1)
    log_p_t = F.log_softmax(logits_t.float() / temperature, dim=1)
    return (log_p_t.exp() * (log_p_t - log_p_s)).sum(1).mean() / logits_s.shape[1] * temperature**2


def same_architecture(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    """Same class and the same parameter and buffer names and shapes."""
    if type(a) is not type(b):
        return False
    sa, sb = a.state_dict(), b.state_dict()
    return list(sa) == list(sb) and all(sa[k].shape == sb[k].shape for k in sa)


@register_distiller("tfkd")
class TfKD(Distiller):
    """Tf-KD (Yuan et al. CVPR 2020) distils a hand-designed virtual teacher, or (tfkd_self) a trained copy of the student.

    Settings (``tfkd``): ``mode`` (``reg``: teacher-free regularisation, ``alpha``, ``T``, ``multiplier``,
    ``correct_prob``; ``self``: self-training from a teacher of the student's architecture, ``self_alpha``,
    ``self_T``, ``self_multiplier``). Only ``mode: self`` uses a teacher."""

    display_name = "Tf-KD"
    report_order = 25
    needs_teacher = False
    DEFAULTS = {"tfkd": {"mode": "reg", "alpha": 0.1, "T": 20.0, "multiplier": 100.0, "correct_prob": 0.99,
                         "self_alpha": 0.95, "self_T": 6.0, "self_multiplier": 50.0}}
    #: each setting's kind and range, checked before anything is built (lakd.settings; plain data)
    SETTINGS = {
        "tfkd.mode": {"kind": "choice", "choices": ["reg", "self"], "about":
            "reg: teacher-free regularisation, self: self-training from a trained network of the student's "
            "architecture"},
        "tfkd.alpha": {"kind": "number", "ge": 0, "le": 1},
        "tfkd.T": {"kind": "number", "gt": 0, "about": "the temperature"},
        "tfkd.multiplier": {"kind": "number", "ge": 0},
        "tfkd.correct_prob": {"kind": "number", "gt": 0, "lt": 1, "about": "the authors': 0.99"},
        "tfkd.self_alpha": {"kind": "number", "ge": 0, "le": 1},
        "tfkd.self_T": {"kind": "number", "gt": 0, "about": "the temperature"},
        "tfkd.self_multiplier": {"kind": "number", "ge": 0},
    }
    variants = {"tfkd_self": ["tfkd.mode=self"]}

    @classmethod
    def uses_teacher(cls, cfg: dict) -> bool:
        return ((cfg.get("tfkd") or {}).get("mode", "reg")) == "self"

    def __init__(self, student, teacher, cfg, num_data=0):
        s = {**self.DEFAULTS["tfkd"], **(cfg.get("tfkd") or {})}
        self.mode = s["mode"]  # an unknown mode: refused by the declared settings (Distiller.__init__)
        if self.mode == "self" and teacher is None:
            raise LakdError("tfkd.mode=self needs a teacher: set teacher.name to the student's architecture and "
                            "teacher.checkpoint to its trained checkpoint (the scratch config's best.pt)")
        super().__init__(student, teacher if self.mode == "self" else None, cfg, num_data)
        pre = "self_" if self.mode == "self" else ""
        self.alpha, self.T, self.multiplier = float(s[pre + "alpha"]), float(s[pre + "T"]), float(s[pre + "multiplier"])
        self.correct_prob = float(s["correct_prob"])
        if self.mode == "self" and not same_architecture(student, teacher):
            log.warning("tfkd.mode=self with a teacher of another architecture than the student's: that is KD with "
                        "Tf-KD's self-training loss (the paper's Re-KD), not Tf-KD_self; for self-training set "
                        "teacher.name to the student's architecture")

    def teacher_pass(self, image, **batch):
        return None if self.mode == "reg" else self.teacher_forward(image)

    def student_losses(self, image, target, teacher_out=None, **batch):
        logits = self.student(image)
        if logits.shape[1] < 2:
            raise LakdError("tfkd needs at least 2 classes")
        if self.mode == "self":
            return logits, {
                "ce": (1.0 - self.alpha) * F.cross_entropy(logits, target),
                "kd": self.alpha * self.multiplier * tfkd_self_loss(logits, teacher_out, self.T),
            }
        return logits, {
            "ce": (1.0 - self.alpha) * F.cross_entropy(logits, target),
            "reg": self.alpha * self.multiplier * tfkd_reg_loss(logits, target, self.correct_prob, self.T),
        }
