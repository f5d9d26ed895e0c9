"""DKD, decoupled knowledge distillation (Zhao et al., 2022), as in mdistiller.

With temperature-``T`` softmaxes ``p`` of student and teacher and the target class ``y``:
TCKD = KL([p_y, 1 - p_y]_teacher || [p_y, 1 - p_y]_student) (the binary target / non-target split) and
NCKD = KL(p^_teacher || p^_student) over the non-target classes only (softmax with the target logit removed,
done as in mdistiller by subtracting 1000 from it), each batch-mean times T^2. Loss
``ce_weight * CE + w(epoch) * (alpha * TCKD + beta * NCKD)`` with the warm-up ``w = min(epoch / warmup, 1)``,
``epoch`` 1-based as in mdistiller (``self.epoch + 1`` here, the trainer's epoch being 0-based).
mdistiller: alpha 1, beta 8 (2 for res56->res20 and res110->res32, 6 for the WRN and VGG pairs), T 4,
warm-up 20 epochs, CE weight 1.

``dkd.logit_stand: true`` z-scores both sides' logits first (logit standardization, Sun et al., CVPR 2024;
``lakd.distillers.kd.standardize``). The reference (sunshangquan/logit-standardization-KD, ``tools/train.py``)
runs DKD+LS with ``--logit-stand --base-temp T --kd-weight K``, which sets ``dkd.T = T`` and multiplies DKD's
``alpha`` and ``beta`` by ``K``: its README's command (``--base-temp 2 --kd-weight 9`` on mdistiller's alpha 1,
beta 8) is alpha 9, beta 72, T 2 (variant ``dkd_ls``). Its CIFAR-100 logs name the per-pair values
(``configs/cifar100/dkd_ls/``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Distiller, register_distiller
from .kd import standardize


def dkd_terms(logits_s: torch.Tensor, logits_t: torch.Tensor, target: torch.Tensor, temperature: float):
    """(TCKD, NCKD), each already multiplied by T^2 and averaged over the batch."""
    gt = F.one_hot(target, logits_s.shape[1]).to(torch.bool)
    p_s = F.softmax(logits_s / temperature, dim=1)
    p_t = F.softmax(logits_t / temperature, dim=1)
    pt_s = (p_s * gt).sum(1, keepdim=True)
    pt_t = (p_t * gt).sum(1, keepdim=True)
    b_s = torch.cat([pt_s, (p_s * ~gt).sum(1, keepdim=True)], dim=1)
    b_t = torch.cat([pt_t, (p_t * ~gt).sum(1, keepdim=True)], dim=1)
    n = target.shape[0]
    tckd = F.kl_div(torch.log(b_s), b_t, reduction="sum") * temperature**2 / n
    log_q_s = F.log_softmax(logits_s / temperature - 1000.0 * gt, dim=1)
    q_t = F.softmax(logits_t / temperature - 1000.0 * gt, dim=1)
    nckd = F.kl_div(log_q_s, q_t, reduction="sum") * temperature**2 / n
    return tckd, nckd


@register_distiller("dkd")
class DKD(Distiller):
    """DKD (Zhao et al. CVPR 2022) distils target and non-target class parts; dkd_ls: + logit standardization.

    ``dkd.logit_stand: true`` z-scores both sides' logits first (Sun et al., CVPR 2024); the variant ``dkd_ls``
    sets it with the reference's README values (``T = 2``, alpha and beta times its ``--kd-weight 9``)."""

    display_name = "DKD"
    report_order = 2
    DEFAULTS = {"dkd": {"ce_weight": 1.0, "alpha": 1.0, "beta": 8.0, "T": 4.0, "warmup": 20, "logit_stand": False}}
    #: DKD with logit standardization as the reference's README runs it (Sun et al., 2024): --logit-stand
    #: --base-temp 2 --kd-weight 9 on the default alpha 1, beta 8
    variants = {"dkd_ls": ["dkd.logit_stand=true", "dkd.T=2.0", "dkd.alpha=9.0", "dkd.beta=72.0"]}
    #: each setting's kind and range, checked before anything is built (lakd.settings; plain data)
    SETTINGS = {
        "dkd.ce_weight": {"kind": "number", "ge": 0},
        "dkd.alpha": {"kind": "number", "ge": 0},
        "dkd.beta": {"kind": "number", "ge": 0},
        "dkd.T": {"kind": "number", "gt": 0, "about": "the temperature"},
        "dkd.warmup": {"kind": "number", "ge": 0, "about": "epochs over which the DKD loss ramps up; mdistiller: 20"},
        "dkd.logit_stand": {"kind": "bool", "about": "logit standardization"},
    }
    #: checks over several settings, or a setting and the run (lakd.settings)
    CHECKS = [
        {"rule": "not_all_zero", "keys": ["dkd.ce_weight", "dkd.alpha", "dkd.beta"]},
        {"rule": "compare", "key": "dkd.warmup", "op": "<=", "than": "solver.epochs", "waivable": True, "about":
            "the DKD loss ramps up over dkd.warmup epochs and would never reach its full weight"},
    ]

    def __init__(self, student, teacher, cfg, num_data=0):
        super().__init__(student, teacher, cfg, num_data)
        s = self.section("dkd")
        self.ce_weight, self.alpha, self.beta = float(s["ce_weight"]), float(s["alpha"]), float(s["beta"])
        self.T, self.warmup, self.logit_stand = float(s["T"]), float(s["warmup"]), bool(s["logit_stand"])

    def warmup_factor(self) -> float:
        return 1.0 if self.warmup <= 0 else min((self.epoch + 1) / self.warmup, 1.0)

    def student_losses(self, image, target, t_logits, **batch):
        logits = self.student(image)
        zs, zt = (standardize(logits), standardize(t_logits)) if self.logit_stand else (logits, t_logits)
        tckd, nckd = dkd_terms(zs, zt, target, self.T)
        w = self.warmup_factor()
        return logits, {
            "ce": self.ce_weight * F.cross_entropy(logits, target),
            "tckd": w * self.alpha * tckd,
            "nckd": w * self.beta * nckd,
        }
