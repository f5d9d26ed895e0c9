"""SRD, "Understanding the Role of the Projector in Knowledge Distillation" (Miles & Mikolajczyk, AAAI 2024): a
linear projector, batch normalisation of both representations and a soft maximum (a log-sum) of their distance.

As the authors' ImageNet code (roymiles/Simple-Recipe-Distillation, ``OurDistillationLoss`` with
``log_bn_corr_4``) and torchdistill's ``SRDLoss`` / ``SRDModelWrapper`` (its ``srd`` sample config for
resnet34 -> resnet18): the student's pooled embedding ``h_s`` (``feats["embedding"]``) passes through a linear
projector ``P = Linear(d_s, d_t)``; the projected student and the teacher's pooled embedding ``h_t`` are each
normalised by a BatchNorm1d without affine parameters (eps 1e-4, batch statistics in training)::

    rep   = log( sum_{b,d} | BN_s(P h_s) - BN_t(h_t) |^exponent )            (exponent 4)
    logit = T^2 KL( softmax(z_t / T) || softmax(z_s / T) )  (batch mean)     (T 1)
    loss  = ce_weight * CE + feat_weight * rep + kd_weight * logit            (1, 2, 1: the references' 2 * rep)

The log of the sum is the "soft maximum": its gradient is the per-element distance over the total, so the
largest discrepancies dominate and the loss is scale-free in the distance (the paper's remedy for a large
capacity gap). ``rep`` can be negative once the two representations are close; only its gradient matters.

Not to be confused with SRRL (Yang et al., ICLR 2021, "softmax regression representation learning"), which
some code bases also call SRD: lakd has it as ``srrl``.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import Distiller, register_distiller
from .kd import kd_loss


def srd_rep_loss(p_s: torch.Tensor, h_t: torch.Tensor, bn_s: nn.Module, bn_t: nn.Module,
                 exponent: float = 4.0) -> torch.Tensor:
    """``log(sum |BN_s(p_s) - BN_t(h_t)|^exponent)`` over the batch and the dimensions (the projected student
    ``p_s`` and the teacher's ``h_t``, both ``(B, d_t)``)."""
    diff = (bn_s(p_s.float()) - bn_t(h_t.float())).abs()
    return torch.log(diff.pow(exponent).sum())


@register_distiller("srd")
class SRD(Distiller):
    """SRD (Miles & Mikolajczyk, AAAI 2024) distils the batch-normalised pooled embedding through a projector.

    A log-sum of the |difference|^4 of the normalised projected student and teacher embeddings, with KD at T 1.
    Settings (``srd``): ``ce_weight`` (1), ``feat_weight`` (2), ``kd_weight`` (1), ``T`` (1), ``exponent`` (4),
    ``bn_eps`` (1e-4). Extra parts: ``projector`` (Linear), ``bn_s`` and ``bn_t`` (BatchNorm1d without affine
    parameters: running statistics only).
    """

    display_name = "SRD"
    report_order = 48
    DEFAULTS = {"srd": {"ce_weight": 1.0, "feat_weight": 2.0, "kd_weight": 1.0, "T": 1.0, "exponent": 4.0,
                        "bn_eps": 1e-4}}
    #: each setting's kind and range, checked before anything is built (lakd.settings; plain data)
    SETTINGS = {
        "srd.ce_weight": {"kind": "number", "ge": 0},
        "srd.feat_weight": {"kind": "number", "ge": 0},
        "srd.kd_weight": {"kind": "number", "ge": 0},
        "srd.T": {"kind": "number", "gt": 0, "about": "the temperature"},
        "srd.exponent": {"kind": "number", "gt": 0},
        "srd.bn_eps": {"kind": "number", "gt": 0, "about": "the BatchNorm's epsilon"},
    }
    #: checks over several settings, or a setting and the run (lakd.settings)
    CHECKS = [
        {"rule": "not_all_zero", "keys": ["srd.ce_weight", "srd.feat_weight", "srd.kd_weight"]},
        {"rule": "compare", "key": "@smallest_batch", "op": ">=", "than": 2, "about":
            "its BatchNorm over the embeddings needs two images per step"},
    ]

    def __init__(self, student, teacher, cfg, num_data=0):
        super().__init__(student, teacher, cfg, num_data)
        s = self.section("srd")
        self.ce_weight, self.feat_weight, self.kd_weight = (float(s[k]) for k in ("ce_weight", "feat_weight",
                                                                                   "kd_weight"))
        self.T, self.exponent, bn_eps = (float(s[k]) for k in ("T", "exponent", "bn_eps"))
        d_s = int(student.feature_info()["embedding_dim"])
        d_t = int(teacher.feature_info()["embedding_dim"])
        self.projector = nn.Linear(d_s, d_t)
        self.bn_s = nn.BatchNorm1d(d_t, eps=bn_eps, affine=False)
        self.bn_t = nn.BatchNorm1d(d_t, eps=bn_eps, affine=False)

    def teacher_pass(self, image, **batch):
        logits, feats = self.teacher_forward(image, features=True)
        return feats["embedding"], logits

    def student_losses(self, image, target, t_out, **batch):
        h_t, z_t = t_out
        logits, feats = self.student(image, features=True)
        p_s = self.projector(feats["embedding"])
        with torch.autocast(device_type=p_s.device.type, enabled=False):
            # BN_t normalises the teacher here, not in teacher_pass: its running statistics are the distiller's
            # state, updated once per training step
            rep = srd_rep_loss(p_s, h_t.detach(), self.bn_s, self.bn_t, self.exponent)
        return logits, {"ce": self.ce_weight * F.cross_entropy(logits, target),
                        "srd_feat": self.feat_weight * rep, "kd": self.kd_weight * kd_loss(logits, z_t, self.T)}
