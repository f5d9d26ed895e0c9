"""SKD, streamlined knowledge distillation (Jeong, Lee, Choi, CVPR 2026): instance-level KD plus a direction-level
term, the Mahalanobis distance between the student's and the teacher's Gram matrices of L2-normalised logits.

With ``g = z / ||z||`` per sample (B x C) and the B x B Gram matrices ``G = g g^T / C`` of both networks::

    D      = G_s - G_t                                        (row i: sample i's relations to the batch)
    Sigma' = cov(D) + tikhonov * I                            (B x B, over the rows of D, unbiased)
    dir    = mean_i sqrt(D_i Sigma'^-1 D_i^T)                 (Cholesky inverse of Sigma')
    inst   = T^2 * mean_i KL(softmax(z_t / T) || softmax(z_s / T))
    loss   = ce_weight * CE + kd_weight * m_B * inst + dir_weight * m_C * dir

as the authors' code (HyunJunSik/StreamLined, ``Distiller/SKD.py``: ``SKD_loss`` and ``SKD.forward_train``). Their
masks are MLKD's: ``m_B`` is the fraction of the batch whose teacher confidence ``max softmax(z_t)`` is at most
its median, ``m_C`` the fraction of classes whose summed teacher probability is at most the median over classes;
they multiply the already batch-averaged terms (``(loss * mask).mean()``), so they scale (by about 1/2) and
select no sample. ``skd.masks: false`` drops them. The covariance is not detached (its gradient reaches the
student, as theirs).

torchdistill's ``SKDInstanceLoss`` / ``SKDDirectionLoss`` (PR #538) differ: no masks, no ``/ C`` on the Gram
matrices, the KL without ``T^2``, and no CE term in its sample config; ``skd.masks=false
skd.gram_by_classes=false skd.kd_weight=0.0625 skd.dir_weight=1 skd.ce_weight=0`` is that form at T 4.

The defaults are the authors' (``SKD(student, teacher, temp=4, tik=0.1, ce=0.1, kd=0.9)``, the direction term at
the KD weight; their docstring: CE 0.5 / KD 0.5 for ResNet32x4 -> ResNet8x4). The direction term needs a batch of
2 or more (a covariance over the batch).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import LakdError
from .base import Distiller, register_distiller
from .kd import kd_loss
from .mlkd import below_percentile


def gram(logits: torch.Tensor, by_classes: bool = True) -> torch.Tensor:
    """B x B Gram matrix of the L2-normalised logits, divided by the class count C (``by_classes``, the authors')."""
    g = F.normalize(logits.float(), p=2, dim=1)
    out = g @ g.t()
    return out / logits.shape[1] if by_classes else out


def skd_direction_loss(logits_s: torch.Tensor, logits_t: torch.Tensor, tikhonov: float,
                       by_classes: bool = True) -> torch.Tensor:
    """``mean_i sqrt(D_i (cov(D) + tikhonov I)^-1 D_i^T)`` with ``D = G_s - G_t`` (``gram``)."""
    if logits_s.shape[0] < 2:
        raise LakdError("skd's direction term needs a batch of 2 or more images (a covariance over the batch); "
                        "use solver.batch_size=64")
    d = gram(logits_s, by_classes) - gram(logits_t, by_classes)
    cov = torch.cov(d.t()) + tikhonov * torch.eye(d.shape[1], device=d.device, dtype=d.dtype)
    inv = torch.cholesky_inverse(torch.linalg.cholesky(cov))
    return torch.einsum("bi,ij,bj->b", d, inv, d).sqrt().mean()


def confidence_fractions(logits_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The authors' masks as the fractions they scale by: of the samples whose teacher confidence is at most its
    median, and of the classes whose summed teacher probability is at most its median (numpy's percentile)."""
    with torch.no_grad():
        p = F.softmax(logits_t.float(), dim=1)
        return below_percentile(p.max(dim=1).values, 50.0).mean(), below_percentile(p.sum(dim=0), 50.0).mean()


@register_distiller("skd")
class SKD(Distiller):
    """SKD (Jeong et al., CVPR 2026) distils softened probabilities and the batch's Gram-matrix directions.

    Settings (``skd``): ``ce_weight``, ``kd_weight`` (instance term), ``dir_weight`` (direction term), ``T``,
    ``tikhonov`` (added to the covariance), ``masks`` (the authors' median-confidence scaling), ``gram_by_classes``
    (the authors' Gram / C)."""

    display_name = "SKD"
    report_order = 30
    DEFAULTS = {"skd": {"ce_weight": 0.1, "kd_weight": 0.9, "dir_weight": 0.9, "T": 4.0, "tikhonov": 0.1,
                        "masks": True, "gram_by_classes": True}}
    #: each setting's kind and range, checked before anything is built (lakd.settings; plain data)
    SETTINGS = {
        "skd.ce_weight": {"kind": "number", "ge": 0},
        "skd.kd_weight": {"kind": "number", "ge": 0},
        "skd.dir_weight": {"kind": "number", "ge": 0},
        "skd.T": {"kind": "number", "gt": 0, "about": "the instance term's temperature"},
        "skd.tikhonov": {"kind": "number", "gt": 0, "about": "added to the covariance's diagonal"},
        "skd.masks": {"kind": "bool", "about": "the authors' median-confidence scaling"},
        "skd.gram_by_classes": {"kind": "bool", "about": "the authors' Gram matrices divided by the class count"},
    }
    #: checks over several settings, or a setting and the run (lakd.settings)
    CHECKS = [
        {"rule": "not_all_zero", "keys": ["skd.ce_weight", "skd.kd_weight", "skd.dir_weight"]},
        {"rule": "compare", "key": "@smallest_batch", "op": ">=", "than": 2, "about":
            "its direction term is a covariance over the batch", "example": "solver.batch_size=64"},
    ]

    def __init__(self, student, teacher, cfg, num_data=0):
        super().__init__(student, teacher, cfg, num_data)
        s = self.section("skd")
        self.ce_weight, self.kd_weight, self.dir_weight = (float(s[k]) for k in
                                                           ("ce_weight", "kd_weight", "dir_weight"))
        self.T, self.tikhonov = float(s["T"]), float(s["tikhonov"])
        self.masks, self.gram_by_classes = s["masks"], s["gram_by_classes"]

    def student_losses(self, image, target, t_logits, **batch):
        logits = self.student(image)
        m_b, m_c = confidence_fractions(t_logits) if self.masks else (1.0, 1.0)
        with torch.autocast(device_type=logits.device.type, enabled=False):
            direction = skd_direction_loss(logits.float(), t_logits.float(), self.tikhonov, self.gram_by_classes)
        return logits, {
            "ce": self.ce_weight * F.cross_entropy(logits, target),
            "instance": self.kd_weight * m_b * kd_loss(logits, t_logits, self.T),
            "direction": self.dir_weight * m_c * direction,
        }
