"""WTTM, weighted transformed teacher matching (Zheng & Yang, ICLR 2024): the student, without temperature, matches
a power-transformed teacher distribution, each sample weighted by the transform's normaliser.

With the teacher's probabilities ``p_t = softmax(z_t)`` and the exponent ``gamma`` (``1 / T``: temperature scaling of
the teacher only, read as a power transform of its distribution)::

    q = p_t^gamma / U,   U = sum_c p_t[c]^gamma          (the transformed teacher and its normaliser)
    TTM  = mean_i KL(q_i || softmax(z_s)_i)                (no temperature on the student, no T^2)
    WTTM = mean_i U_i * KL(q_i || softmax(z_s)_i)          (a smoother teacher, a larger U: more weight)
    loss = ce_weight * CE + kd_weight * (WTTM, or TTM with ``wttm.weighted: false``)

as the authors' code (zkxufo/TTM, ``distiller_zoo/wttm.py`` and ``ttm.py``: ``torch.mean(norm * KL)``). Here the
transform is computed in log space (``gamma * log_softmax(z_t)``, its logsumexp), the same values without
underflow of small probabilities to 0. Variant ``ttm``: the unweighted TTM at the README's example setting
(gamma 0.1, weight 45, VGG13 -> VGG8).

The authors list their per-pair ``gamma`` and weight in the paper's appendix A.4 (Tables 8-10), which the configs
carry; the defaults here are the only WTTM setting in their README (gamma 0.2, weight 4, its CRD + WTTM example:
Table 8's WTTM+CRD setting for VGG13 -> VGG8). Their recipe: RepDistiller's (SGD lr 0.05, x0.1 at 150/180/210 of
240 epochs, batch 64, wd 5e-4), CE weight 1.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Distiller, register_distiller


def wttm_terms(logits_s: torch.Tensor, logits_t: torch.Tensor, gamma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample ``(KL(q || softmax(z_s)), U)``: the KL divergence of the student's softmax from the power-transformed
    teacher ``q = p_t^gamma / U`` and the normaliser ``U = sum p_t^gamma`` (two vectors of B values)."""
    log_q = gamma * F.log_softmax(logits_t.float(), dim=1)
    log_u = torch.logsumexp(log_q, dim=1, keepdim=True)
    log_q = log_q - log_u
    log_p_s = F.log_softmax(logits_s.float(), dim=1)
    kl = (log_q.exp() * (log_q - log_p_s)).sum(1)
    return kl, log_u.squeeze(1).exp()


def wttm_loss(logits_s: torch.Tensor, logits_t: torch.Tensor, gamma: float, weighted: bool = True) -> torch.Tensor:
    """WTTM (``mean_i U_i KL_i``) or, with ``weighted`` off, TTM (``mean_i KL_i``)."""
    kl, u = wttm_terms(logits_s, logits_t, gamma)
    return (u.detach() * kl).mean() if weighted else kl.mean()


@register_distiller("wttm")
class WTTM(Distiller):
    """WTTM (Zheng & Yang, ICLR 2024) distils a power-transformed teacher, weighted per sample; ttm: unweighted.

    Settings (``wttm``): ``ce_weight`` (1), ``kd_weight`` (the authors' beta), ``gamma`` (the power, 1 / T),
    ``weighted`` (false: TTM, the variant ``ttm``)."""

    display_name = "WTTM"
    report_order = 27
    DEFAULTS = {"wttm": {"ce_weight": 1.0, "kd_weight": 4.0, "gamma": 0.2, "weighted": True}}
    #: each setting's kind and range, checked before anything is built (lakd.settings; plain data)
    SETTINGS = {
        "wttm.ce_weight": {"kind": "number", "ge": 0},
        "wttm.kd_weight": {"kind": "number", "ge": 0},
        "wttm.gamma": {"kind": "number", "gt": 0, "about": "the power of the teacher's probabilities (1 / T)"},
        "wttm.weighted": {"kind": "bool", "about": "true: WTTM's sample weights, false: TTM"},
    }
    #: checks over several settings, or a setting and the run (lakd.settings)
    CHECKS = [
        {"rule": "not_all_zero", "keys": ["wttm.ce_weight", "wttm.kd_weight"]},
    ]
    #: TTM: no sample weights, at the README's example setting (VGG13 -> VGG8: --ttm_l 0.1 -b 45; the paper's Table 8)
    variants = {"ttm": ["wttm.weighted=false", "wttm.gamma=0.1", "wttm.kd_weight=45.0"]}

    def __init__(self, student, teacher, cfg, num_data=0):
        super().__init__(student, teacher, cfg, num_data)
        s = self.section("wttm")
        self.ce_weight, self.kd_weight = float(s["ce_weight"]), float(s["kd_weight"])
        self.gamma = float(s["gamma"])
        self.weighted = s["weighted"]

    def student_losses(self, image, target, t_logits, **batch):
        logits = self.student(image)
        return logits, {
            "ce": self.ce_weight * F.cross_entropy(logits, target),
            "wttm" if self.weighted else "ttm": self.kd_weight * wttm_loss(logits, t_logits, self.gamma,
                                                                           self.weighted),
        }
