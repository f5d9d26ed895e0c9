"""NKD, normalized knowledge distillation (Yang et al., ICCV 2023): target and normalised non-target parts.

With ``y`` the label, ``p`` the softmaxes at temperature 1 and ``q`` the softmaxes over the non-target classes
only at temperature ``T`` (the target logit removed, the rest renormalised)::

    L_NKD = - mean_i [ p_t(y) * log p_s(y) ]  -  gamma * T^2 * mean_i sum_{j != y} q_t(j) * log q_s(j)
    loss  = ce_weight * CE + L_NKD

The target part weights the student's log-probability of the label by the teacher's (a detached soft target);
the non-target part is a cross-entropy between the normalised non-target distributions, so it does not shrink
with the teacher's confidence as the non-target part of KD does. Defaults: the authors' (``yzd-v/cls_KD``)
``NKDLoss`` defaults and ImageNet setting, ``temp = 1``, ``gamma = 1.5``, CE weight 1; their CIFAR-100 config
(``configs/distillers/cifar100/res34_distill_res18_cifar.py``) uses ``temp = 3``, ``gamma = 3.5``, which the
CIFAR configs carry.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import LakdError
from .base import Distiller, register_distiller


def nkd_terms(logits_s: torch.Tensor, logits_t: torch.Tensor, target: torch.Tensor, temperature: float):
    """(target part, non-target part before ``gamma``): ``-mean p_t(y) log p_s(y)`` and
    ``-T^2 mean sum q_t log q_s`` over the non-target classes."""
    logits_s, logits_t = logits_s.float(), logits_t.float()
    y = target.view(-1, 1)
    log_p_s = F.log_softmax(logits_s, dim=1).gather(1, y)
    p_t = F.softmax(logits_t, dim=1).gather(1, y)
    target_part = -(p_t * log_p_s).mean()
    keep = torch.ones_like(logits_s, dtype=torch.bool).scatter_(1, y, False)
    n, c = logits_s.shape
    zs, zt = logits_s[keep].view(n, c - 1), logits_t[keep].view(n, c - 1)
    non = (F.softmax(zt / temperature, dim=1) * F.log_softmax(zs / temperature, dim=1)).sum(1).mean()
    return target_part, -(temperature**2) * non


@register_distiller("nkd")
class NKD(Distiller):
    """NKD (Yang et al. ICCV 2023) distils the target probability and the normalised non-target distribution.

    Settings (``nkd``): ``ce_weight``, ``T`` (temperature of the non-target part), ``gamma`` (its weight)."""

    display_name = "NKD"
    report_order = 22
    DEFAULTS = {"nkd": {"ce_weight": 1.0, "T": 1.0, "gamma": 1.5}}
    #: each setting's kind and range, checked before anything is built (lakd.settings; plain data)
    SETTINGS = {
        "nkd.ce_weight": {"kind": "number", "ge": 0},
        "nkd.gamma": {"kind": "number", "ge": 0},
        "nkd.T": {"kind": "number", "gt": 0, "about": "the temperature"},
    }

    def __init__(self, student, teacher, cfg, num_data=0):
        super().__init__(student, teacher, cfg, num_data)
        s = self.section("nkd")
        self.ce_weight, self.T, self.gamma = float(s["ce_weight"]), float(s["T"]), float(s["gamma"])

    def student_losses(self, image, target, t_logits, **batch):
        logits = self.student(image)
        if logits.shape[1] < 2:
            raise LakdError("nkd needs at least 2 classes (its non-target part is over the other classes)")
        tgt, non = nkd_terms(logits, t_logits, target, self.T)
        return logits, {
            "ce": self.ce_weight * F.cross_entropy(logits, target),
            "target": tgt,
            "non_target": self.gamma * non,
        }
