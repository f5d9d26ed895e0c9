"""CRLD, cross-view consistency regularisation (Zhang, Liu, Cai, Ma, ACM MM 2024): KD within and across a weak and
a strong view of every image, each term kept only for the samples the teacher is confident about.

The batch image is the weak view (crop + flip); the data pipeline makes the strong view of every image (its own
crop and flip, RandAugment(2, 10) and a Cutout of up to half the side: ``views``, the same spec as MLKD's, from
the authors' ``mdistiller/dataset/cifar100.py``). With per-sample ``KL_i(s, t) = T^2 KL(softmax(t_i / T) ||
softmax(s_i / T))``, student logits ``s_w``, ``s_s`` and teacher logits ``t_w``, ``t_s`` of the two views, and the
teacher's confidence masks ``m^w_i = [max softmax(t_w)_i >= tau_w]``, ``m^s_i = [max softmax(t_s)_i >= tau_s]``::

    CE     = ce_weight * (CE(s_w, y) + CE(s_s, y))
    within = wv_weight * mean_i m^w_i * (KL_i(s_w, t_w) + KL_i(s_s, t_s))
    cross  = cv_weight * mean_i m^s_i * (KL_i(s_s, t_w) + KL_i(s_w, t_s))

as the authors' ``CRLD.forward_train`` (``mdistiller/distillers/CRLD.py``: ``kd_loss(..., reduce=False)``, so the
masks select samples; the mean is over the whole batch). Their defaults (``mdistiller/engine/cfg.py``): CE 1,
within-view 2, cross-view 0.5, T 4, ``tau_w`` 0.9, ``tau_s`` 0.2, the same for every CIFAR-100 pair; on ImageNet
(ResNet-34 -> ResNet-18) T 1 and CE 2. The student runs once per view (BatchNorm statistics per view, as theirs);
the teacher, in eval mode, once on both.

Through ``lakd.distiller`` in one's own loop, give each batch its strong view: ``batch["views"] = {"strong": ...}``
(a tensor like ``batch["image"]``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import LakdError
from .base import Distiller, register_distiller
from .mlkd import STRONG_VIEW
from .sdd import kd_rows


def crld_terms(s_w: torch.Tensor, s_s: torch.Tensor, t_w: torch.Tensor, t_s: torch.Tensor, temperature: float,
               tau_w: float, tau_s: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(within-view, cross-view) terms before their weights: batch means of the masked per-sample KL sums."""
    s_w, s_s, t_w, t_s = s_w.float(), s_s.float(), t_w.float(), t_s.float()
    with torch.no_grad():
        m_w = (F.softmax(t_w, dim=1).max(dim=1).values >= tau_w).float()
        m_s = (F.softmax(t_s, dim=1).max(dim=1).values >= tau_s).float()
    within = ((kd_rows(s_w, t_w, temperature) + kd_rows(s_s, t_s, temperature)) * m_w).mean()
    cross = ((kd_rows(s_s, t_w, temperature) + kd_rows(s_w, t_s, temperature)) * m_s).mean()
    return within, cross


@register_distiller("crld")
class CRLD(Distiller):
    """CRLD (Zhang et al., ACM MM 2024) distils within and across a weak and a strong view, on confident samples.

    Settings (``crld``): ``ce_weight`` (per view), ``wv_weight`` (within-view), ``cv_weight`` (cross-view), ``T``,
    ``tau_w`` and ``tau_s`` (the teacher's confidence thresholds on the weak and the strong view). Needs the strong
    view of every image (``batch["views"]["strong"]``, made by the data pipeline)."""

    display_name = "CRLD"
    report_order = 29
    DEFAULTS = {"crld": {"ce_weight": 1.0, "wv_weight": 2.0, "cv_weight": 0.5, "T": 4.0, "tau_w": 0.9,
                         "tau_s": 0.2}}
    #: each setting's kind and range, checked before anything is built (lakd.settings; plain data)
    SETTINGS = {
        "crld.ce_weight": {"kind": "number", "ge": 0, "about": "the cross-entropy weight, per view"},
        "crld.wv_weight": {"kind": "number", "ge": 0, "about": "the within-view KD weight"},
        "crld.cv_weight": {"kind": "number", "ge": 0, "about": "the cross-view KD weight"},
        "crld.T": {"kind": "number", "gt": 0, "about": "the temperature"},
        "crld.tau_w": {"kind": "number", "ge": 0, "le": 1, "about": "the teacher's confidence threshold (weak view)"},
        "crld.tau_s": {"kind": "number", "ge": 0, "le": 1, "about": "the teacher's confidence threshold (strong view)"},
    }
    #: checks over several settings, or a setting and the run (lakd.settings)
    CHECKS = [
        {"rule": "not_all_zero", "keys": ["crld.ce_weight", "crld.wv_weight", "crld.cv_weight"]},
    ]

    def __init__(self, student, teacher, cfg, num_data=0):
        super().__init__(student, teacher, cfg, num_data)
        s = self.section("crld")
        self.ce_weight, self.wv_weight, self.cv_weight = (float(s[k]) for k in ("ce_weight", "wv_weight", "cv_weight"))
        self.T = float(s["T"])
        self.tau_w, self.tau_s = (float(s[k]) for k in ("tau_w", "tau_s"))

    @classmethod
    def views(cls, cfg: dict) -> dict[str, dict]:
        """The authors' strong view (MLKD's spec: own crop and flip, RandAugment(2, 10), Cutout up to 1/2)."""
        return dict(STRONG_VIEW)

    @staticmethod
    def _strong(image: torch.Tensor, views: dict | None) -> torch.Tensor:
        strong = (views or {}).get("strong")
        if strong is None:
            raise LakdError("crld trains on a strong view of every image (its own crop, RandAugment, Cutout) that the "
                            "data pipeline makes (batch['views']['strong']), but this batch has none; train through "
                            "lakd (lakd train, lakd.build), or pass batch['views'] = {'strong': images} yourself")
        if strong.shape != image.shape:
            raise LakdError(f"crld: the strong view {tuple(strong.shape)} does not match the batch "
                            f"{tuple(image.shape)}; it must hold a view of each of the batch's images")
        if not image.is_contiguous() and image.is_contiguous(memory_format=torch.channels_last):
            strong = strong.contiguous(memory_format=torch.channels_last)
        return strong

    def teacher_pass(self, image, views=None, **batch):
        strong = self._strong(image, views)
        return self.teacher_forward(torch.cat([image, strong])), strong  # eval mode: one pass is two

    def student_losses(self, image, target, t_out, **batch):
        t_logits, strong = t_out
        b = image.shape[0]
        s_w, s_s = self.student(image), self.student(strong)  # one pass per view: BatchNorm statistics per view
        with torch.autocast(device_type=s_w.device.type, enabled=False):
            within, cross = crld_terms(s_w, s_s, t_logits[:b], t_logits[b:], self.T, self.tau_w, self.tau_s)
        return s_w, {
            "ce": self.ce_weight * (F.cross_entropy(s_w, target) + F.cross_entropy(s_s, target)),
            "within": self.wv_weight * within,
            "cross": self.cv_weight * cross,
        }
