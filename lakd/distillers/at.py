"""AT, attention transfer (Zagoruyko & Komodakis, 2017): the student matches the teacher's spatial attention
maps at every stage output, on top of cross-entropy.

As mdistiller's ``AT``: ``at(f) = normalize(mean_c(f^p))`` flattened per image (L2 over positions), loss per
stage ``mean((at_s - at_t)^2)``, summed over the stage outputs, ``p = 2``, weight 1000, CE weight 1. When the
maps differ in size the larger one is average-pooled to the smaller. When the two nets have different
numbers of stages the last ones are paired (the deepest stage with the deepest stage).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Distiller, register_distiller


def attention_map(feat: torch.Tensor, p: float) -> torch.Tensor:
    """B x C x H x W -> B x (H*W): the channel mean of ``feat**p``, L2-normalised over positions."""
    return F.normalize(feat.float().pow(p).mean(1).reshape(feat.shape[0], -1), dim=1)


def at_stage_loss(f_s: torch.Tensor, f_t: torch.Tensor, p: float) -> torch.Tensor:
    hs, ht = f_s.shape[-2:], f_t.shape[-2:]
    if hs[0] * hs[1] > ht[0] * ht[1]:
        f_s = F.adaptive_avg_pool2d(f_s, ht)
    elif hs[0] * hs[1] < ht[0] * ht[1]:
        f_t = F.adaptive_avg_pool2d(f_t, hs)
    return (attention_map(f_s, p) - attention_map(f_t, p)).pow(2).mean()


def at_loss(feats_s: list, feats_t: list, p: float) -> torch.Tensor:
    """Sum over paired stages (the last ``min(len)`` of each list) of the per-stage AT loss."""
    n = min(len(feats_s), len(feats_t))
    return sum(at_stage_loss(fs, ft, p) for fs, ft in zip(feats_s[-n:], feats_t[-n:]))


@register_distiller("at")
class AT(Distiller):
    display_name = "AT"
    report_order = 7
    DEFAULTS = {"at": {"ce_weight": 1.0, "feat_weight": 1000.0, "p": 2.0}}
    #: each setting's kind and range, checked before anything is built (lakd.settings; plain data)
    SETTINGS = {
        "at.ce_weight": {"kind": "number", "ge": 0},
        "at.feat_weight": {"kind": "number", "ge": 0},
        "at.p": {"kind": "number", "gt": 0, "about": "the attention map's exponent; the paper uses 2"},
    }
    #: checks over several settings, or a setting and the run (lakd.settings)
    CHECKS = [
        {"rule": "not_all_zero", "keys": ["at.ce_weight", "at.feat_weight"]},
    ]

    def __init__(self, student, teacher, cfg, num_data=0):
        super().__init__(student, teacher, cfg, num_data)
        s = self.section("at")
        self.ce_weight, self.feat_weight = float(s["ce_weight"]), float(s["feat_weight"])
        self.p = float(s["p"])

    def teacher_pass(self, image, **batch):
        return self.teacher_forward(image, features=True)[1]["stages"]

    def student_losses(self, image, target, t_stages, **batch):
        logits, feats = self.student(image, features=True)
        return logits, {
            "ce": self.ce_weight * F.cross_entropy(logits, target),
            "at": self.feat_weight * at_loss(feats["stages"], t_stages, self.p),
        }
