"""MLKD, multi-level logit distillation (Jin et al., CVPR 2023): instance, batch and class alignment.

With softmaxes ``P_s``, ``P_t`` (B x C) at each temperature ``T`` of ``temperatures`` (prediction augmentation;
the authors' 4, 3, 5, 2, 6):

- instance level: ``KL(P_t[i] || P_s[i]) * T^2`` per sample ``i``;
- batch level: the B x B Gram matrices ``G = P P^T``; per sample ``i`` the row error ``sum_k (G_t - G_s)[i, k]^2``;
- class level: the C x C matrices ``M = P^T P``; per class ``j`` the column error ``sum_c (M_t - M_s)[c, j]^2``.

Confidence masking (the authors' code): a sample takes part in the masked instance and batch terms when the
teacher's confidence ``max softmax(z_t)`` is at most the batch's ``mask_percentile`` (50: the median), a class in
the class term when the teacher's summed probability ``sum_i softmax(z_t)[i, j]`` is at most the percentile over
classes. Each masked term is the mean over samples (classes) of the per-sample (per-class) error times the mask,
i.e. the unmasked term ``mean_i err_i`` restricted to the kept items. (The authors' code multiplies the
already-reduced scalar by the mask and averages, which scales the loss by the kept fraction instead of selecting
samples; the per-sample selection here is what the paper describes.) Per temperature::

    instance = mean_i m_i KL_i + mean_i KL_i        batch = mean_i m_i err_i        class = mean_j c_j err_j

summed over the temperatures, each times ``kd_weight``; plus ``ce_weight * CE``. The authors train on two views
of every image, a weak and a strong augmentation, with the masked terms on the weak view and the unmasked
instance term on the strong one; this pipeline gives one view, which serves as both (so the instance level has a
masked and an unmasked part on the same images). ``mlkd.logit_stand: true`` z-scores the logits of the instance
level first (Sun et al., CVPR 2024, as in their MLKD code; variant ``mlkd_ls``: temperatures 2, 2, 3, 5, 6 and
KD weight 9). The authors' recipe is 480 epochs with a stronger augmentation (the configs say where ours differs).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import LakdError
from .base import Distiller, register_distiller
from .kd import check_logit_stand, standardize


def instance_kl(logits_s: torch.Tensor, logits_t: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per-sample ``KL(p_t || p_s) * T^2`` (a vector of B values)."""
    log_p_s = F.log_softmax(logits_s / temperature, dim=1)
    log_p_t = F.log_softmax(logits_t / temperature, dim=1)
    return (log_p_t.exp() * (log_p_t - log_p_s)).sum(1) * temperature**2


def batch_errors(p_s: torch.Tensor, p_t: torch.Tensor) -> torch.Tensor:
    """Per-sample row errors of the B x B Gram matrices ``P P^T`` (the authors' batch-level consistency)."""
    return ((p_t @ p_t.t() - p_s @ p_s.t()) ** 2).sum(1)


def class_errors(p_s: torch.Tensor, p_t: torch.Tensor) -> torch.Tensor:
    """Per-class column errors of the C x C matrices ``P^T P`` (the authors' class-level consistency)."""
    return ((p_t.t() @ p_t - p_s.t() @ p_s) ** 2).sum(0)


def below_percentile(values: torch.Tensor, percentile: float) -> torch.Tensor:
    """1.0 where ``values <= `` their ``percentile`` (linear interpolation, numpy's default), else 0.0."""
    thresh = torch.quantile(values.float(), percentile / 100.0)
    return (values <= thresh).float()


def mlkd_terms(logits_s, logits_t, temperatures, percentile: float = 50.0, logit_stand: bool = False):
    """(instance, batch, class) losses summed over ``temperatures``, masked as described in the module."""
    logits_s, logits_t = logits_s.float(), logits_t.float()
    with torch.no_grad():
        p1 = F.softmax(logits_t, dim=1)
        mask = below_percentile(p1.max(dim=1).values, percentile)
        class_mask = below_percentile(p1.sum(dim=0), percentile)
    zs, zt = (standardize(logits_s), standardize(logits_t)) if logit_stand else (logits_s, logits_t)
    inst = bat = cls = logits_s.new_zeros(())
    for t in temperatures:
        kl = instance_kl(zs, zt, t)
        inst = inst + (kl * mask).mean() + kl.mean()
        p_s, p_t = F.softmax(logits_s / t, dim=1), F.softmax(logits_t / t, dim=1)
        bat = bat + (batch_errors(p_s, p_t) * mask).mean()
        cls = cls + (class_errors(p_s, p_t) * class_mask).mean()
    return inst, bat, cls


@register_distiller("mlkd")
class MLKD(Distiller):
    """MLKD (Jin et al. CVPR 2023) distils instance, batch, class logit relations; mlkd_ls: + logit standardization.

    Settings (``mlkd``): ``ce_weight``, ``kd_weight``, ``temperatures``, ``mask_percentile``, ``logit_stand``
    (variant ``mlkd_ls``: + logit standardization, Sun et al. CVPR 2024)."""

    display_name = "MLKD"
    report_order = 23
    DEFAULTS = {"mlkd": {"ce_weight": 0.1, "kd_weight": 0.9, "temperatures": [4.0, 3.0, 5.0, 2.0, 6.0],
                         "mask_percentile": 50.0, "logit_stand": False}}
    variants = {"mlkd_ls": ["mlkd.logit_stand=true", "mlkd.temperatures=[2.0,3.0,5.0,2.0,6.0]",
                            "mlkd.kd_weight=9.0"]}

    def __init__(self, student, teacher, cfg, num_data=0):
        super().__init__(student, teacher, cfg, num_data)
        s = self.section("mlkd")
        self.ce_weight, self.kd_weight = float(s["ce_weight"]), float(s["kd_weight"])
        temps = s["temperatures"]
        if not isinstance(temps, (list, tuple)) or not temps or any(
                isinstance(t, bool) or not isinstance(t, (int, float)) or t <= 0 for t in temps):
            raise LakdError(f"mlkd.temperatures must be a non-empty list of positive numbers (the authors': "
                            f"[4, 3, 5, 2, 6]), got {temps!r}")
        self.temperatures = [float(t) for t in temps]
        q = s["mask_percentile"]
        if isinstance(q, bool) or not isinstance(q, (int, float)) or not 0 <= q <= 100:
            raise LakdError(f"mlkd.mask_percentile must be a number in [0, 100] (the authors': 50), got {q!r}")
        self.percentile = float(q)
        self.logit_stand = check_logit_stand("mlkd", s["logit_stand"])

    def student_losses(self, image, target, t_logits, **batch):
        logits = self.student(image)
        inst, bat, cls = mlkd_terms(logits, t_logits, self.temperatures, self.percentile, self.logit_stand)
        return logits, {
            "ce": self.ce_weight * F.cross_entropy(logits, target),
            "instance": self.kd_weight * inst,
            "batch": self.kd_weight * bat,
            "class": self.kd_weight * cls,
        }
