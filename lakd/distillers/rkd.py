"""RKD, relational knowledge distillation (Park et al., 2019): the student keeps the teacher's pairwise
distances and triplet angles among the penultimate embeddings of a batch, on top of cross-entropy.

As mdistiller's ``RKD``: on ``feats["embedding"]``, distance term = smooth-L1 between the pairwise Euclidean
distance matrices (``sqrt(clamp(d^2, eps))``, diagonal 0), each divided by the mean of its positive entries;
angle term = smooth-L1 between the cosines ``<e_ij, e_ik>`` of the unit difference vectors
``e_ij = (x_j - x_i)/|.|`` over all (i, j, k); weights 25 (distance) and 50 (angle), CE weight 1. The teacher side has no gradient.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Distiller, register_distiller


def pairwise_distances(x: torch.Tensor, squared: bool = False, eps: float = 1e-12) -> torch.Tensor:
    """N x N Euclidean (or squared) distances between the rows of ``x``, clamped at ``eps``, diagonal 0."""
    sq = x.pow(2).sum(1)
    d = (sq.unsqueeze(1) + sq.unsqueeze(0) - 2 * x @ x.t()).clamp(min=eps)
    if not squared:
        d = d.sqrt()
    return d * (1 - torch.eye(len(x), device=x.device, dtype=d.dtype))


def rkd_distance_loss(f_s: torch.Tensor, f_t: torch.Tensor, squared: bool = False,
                      eps: float = 1e-12) -> torch.Tensor:
    s, t = f_s.flatten(1).float(), f_t.flatten(1).float()
    with torch.no_grad():
        d_t = pairwise_distances(t, squared, eps)
        d_t = d_t / d_t[d_t > 0].mean()
    d_s = pairwise_distances(s, squared, eps)
    d_s = d_s / d_s[d_s > 0].mean()
    return F.smooth_l1_loss(d_s, d_t)


def triplet_cosines(x: torch.Tensor) -> torch.Tensor:
    """N x N x N: entry (i, j, k) is the cosine of the angle at x_i between x_j and x_k (0 if j or k is i)."""
    diff = F.normalize(x.unsqueeze(0) - x.unsqueeze(1), p=2, dim=2)  # diff[i, j] = unit(x_j - x_i)
    return torch.bmm(diff, diff.transpose(1, 2))


def rkd_angle_loss(f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        a_t = triplet_cosines(f_t.flatten(1).float())
    return F.smooth_l1_loss(triplet_cosines(f_s.flatten(1).float()), a_t)


@register_distiller("rkd")
class RKD(Distiller):
    display_name = "RKD"
    report_order = 6
    DEFAULTS = {"rkd": {"ce_weight": 1.0, "distance_weight": 25.0, "angle_weight": 50.0, "eps": 1e-12,
                        "squared": False}}
    #: each setting's kind and range, checked before anything is built (lakd.settings; plain data)
    SETTINGS = {
        "rkd.ce_weight": {"kind": "number", "ge": 0},
        "rkd.distance_weight": {"kind": "number", "ge": 0},
        "rkd.angle_weight": {"kind": "number", "ge": 0},
        "rkd.eps": {"kind": "number", "gt": 0, "about": "a small positive number"},
        "rkd.squared": {"kind": "bool"},
    }
    #: checks over several settings, or a setting and the run (lakd.settings)
    CHECKS = [
        {"rule": "not_all_zero", "keys": ["rkd.ce_weight", "rkd.distance_weight", "rkd.angle_weight"]},
        {"rule": "compare", "key": "@smallest_batch", "op": ">=", "than": 3, "about":
            "its distances are normalised by their mean and its angles need three images: with fewer both losses "
            "are 0"},
    ]

    def __init__(self, student, teacher, cfg, num_data=0):
        super().__init__(student, teacher, cfg, num_data)
        s = self.section("rkd")
        self.ce_weight = float(s["ce_weight"])
        self.distance_weight, self.angle_weight = float(s["distance_weight"]), float(s["angle_weight"])
        self.eps, self.squared = float(s["eps"]), bool(s["squared"])

    def teacher_pass(self, image, **batch):
        return self.teacher_forward(image, features=True)[1]["embedding"]

    def student_losses(self, image, target, f_t, **batch):
        logits, feats = self.student(image, features=True)
        f_s = feats["embedding"]
        # float32 even under AMP: distances from |a|^2 + |b|^2 - 2ab cancel badly in half precision
        with torch.autocast(device_type=f_s.device.type, enabled=False):
            dist = rkd_distance_loss(f_s, f_t, self.squared, self.eps)
            angle = rkd_angle_loss(f_s, f_t)
        return logits, {
            "ce": self.ce_weight * F.cross_entropy(logits, target),
            "rkd_distance": self.distance_weight * dist,
            "rkd_angle": self.angle_weight * angle,
        }
