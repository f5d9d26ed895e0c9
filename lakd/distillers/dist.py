"""DIST, distillation from a stronger teacher (Huang et al., NeurIPS 2022): Pearson correlation of probabilities.

With temperature-``tau`` softmaxes ``Y_s`` and ``Y_t`` (B x C), the inter-class relation is matched per sample
and the intra-class relation per class::

    inter = 1 - mean_i pearson(Y_s[i, :], Y_t[i, :])        intra = 1 - mean_j pearson(Y_s[:, j], Y_t[:, j])
    loss  = ce_weight * CE + tau^2 * (beta * inter + gamma * intra)

``pearson`` is the cosine similarity of the mean-centred vectors (eps 1e-8 in the denominator, as in the
authors' ``DIST_KD`` code). The authors (hunto/image_classification_sota, ``lib/models/losses/kd_loss.py``)
multiply ``DIST(beta, gamma, tau)`` by ``kd_loss_weight``, so lakd's ``beta`` and ``gamma`` are theirs times that
weight. Defaults: the authors' CIFAR-100 setting (``configs/strategies/distill/dist_cifar.yaml``: ``dist_t4``,
DIST(1, 1, 4) at kd_loss_weight 2: beta = gamma = 2, tau = 4, CE weight 1); their ImageNet setting
(``resnet_dist.yaml``: DIST(1, 1, 1) at kd_loss_weight 2) is beta = gamma = 2, tau = 1.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Distiller, register_distiller


def pearson_rows(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Pearson correlation of each row of ``a`` with the same row of ``b`` (a vector of B values)."""
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


def dist_terms(logits_s: torch.Tensor, logits_t: torch.Tensor, tau: float):
    """(inter-class, intra-class) relation losses, each ``1 - mean Pearson``, times ``tau^2``."""
    y_s = F.softmax(logits_s.float() / tau, dim=1)
    y_t = F.softmax(logits_t.float() / tau, dim=1)
    inter = 1.0 - pearson_rows(y_s, y_t).mean()
    intra = 1.0 - pearson_rows(y_s.t(), y_t.t()).mean()
    return tau**2 * inter, tau**2 * intra


@register_distiller("dist")
class DIST(Distiller):
    """DIST (Huang et al. NeurIPS 2022) distils inter- and intra-class Pearson correlations of the probabilities.

    Settings (``dist``): ``ce_weight``, ``beta`` (inter-class), ``gamma`` (intra-class), ``tau`` (temperature).
    The intra-class term correlates each class's column over the batch, so it needs a batch of 2 or more."""

    display_name = "DIST"
    report_order = 20
    DEFAULTS = {"dist": {"ce_weight": 1.0, "beta": 2.0, "gamma": 2.0, "tau": 4.0}}
    #: each setting's kind and range, checked before anything is built (lakd.settings; plain data)
    SETTINGS = {
        "dist.ce_weight": {"kind": "number", "ge": 0},
        "dist.beta": {"kind": "number", "ge": 0},
        "dist.gamma": {"kind": "number", "ge": 0},
        "dist.tau": {"kind": "number", "gt": 0, "about": "the temperature"},
    }
    #: checks over several settings, or a setting and the run (lakd.settings)
    CHECKS = [
        {"rule": "not_all_zero", "keys": ["dist.ce_weight", "dist.beta", "dist.gamma"]},
        {"rule": "compare", "key": "@smallest_batch", "op": ">=", "than": 2, "about":
            "its intra-class relation correlates each class across the batch"},
    ]

    def __init__(self, student, teacher, cfg, num_data=0):
        super().__init__(student, teacher, cfg, num_data)
        s = self.section("dist")
        self.ce_weight, self.beta, self.gamma = float(s["ce_weight"]), float(s["beta"]), float(s["gamma"])
        self.tau = float(s["tau"])

    def student_losses(self, image, target, t_logits, **batch):
        logits = self.student(image)
        inter, intra = dist_terms(logits, t_logits, self.tau)
        return logits, {
            "ce": self.ce_weight * F.cross_entropy(logits, target),
            "inter": self.beta * inter,
            "intra": self.gamma * intra,
        }
