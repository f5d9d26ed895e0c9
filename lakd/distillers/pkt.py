"""PKT, probabilistic knowledge transfer (Passalis & Tefas, ECCV 2018): the student's penultimate embeddings match
the teacher's conditional probability distribution over the batch, estimated with a cosine kernel.

As RepDistiller's and mdistiller's ``PKT``: on ``feats["embedding"]``, each embedding is L2-normalised, the
cosine kernel ``K_ij = (cos(x_i, x_j) + 1) / 2`` is made row-stochastic, ``p_{j|i} = K_ij / sum_k K_ik``, and the
loss is the KL divergence between the teacher's and the student's conditional distributions, averaged over all
N x N entries (the references' ``mean(p_t * log((p_t + eps) / (p_s + eps)))``, eps 1e-7). Weights: CE 1, PKT 30,000
(mdistiller's ``PKT.LOSS.FEAT_WEIGHT``, RepDistiller's ``-b 30000``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Distiller, register_distiller


def pkt_probabilities(x: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """N x N row-stochastic matrix ``p_{j|i}`` of the cosine kernel ``(cos + 1) / 2`` between the rows of ``x``."""
    x = x.flatten(1).float()
    x = x / (x.norm(dim=1, keepdim=True) + eps)
    k = (x @ x.t() + 1.0) / 2.0
    return k / k.sum(dim=1, keepdim=True)


def pkt_loss(f_s: torch.Tensor, f_t: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """``mean_ij p_t(j|i) log((p_t(j|i) + eps) / (p_s(j|i) + eps))`` (the teacher side without gradient)."""
    with torch.no_grad():
        p_t = pkt_probabilities(f_t, eps)
    p_s = pkt_probabilities(f_s, eps)
    return (p_t * torch.log((p_t + eps) / (p_s + eps))).mean()


@register_distiller("pkt")
class PKT(Distiller):
    """PKT (Passalis & Tefas, ECCV 2018) distils the teacher's cosine-kernel distribution over a batch's embeddings.

    Loss ``ce_weight * CE + feat_weight * KL(p_t || p_s)`` (module docstring); no learnable part.
    """

    display_name = "PKT"
    report_order = 40
    DEFAULTS = {"pkt": {"ce_weight": 1.0, "feat_weight": 30000.0, "eps": 1e-7}}
    #: each setting's kind and range, checked before anything is built (lakd.settings; plain data)
    SETTINGS = {
        "pkt.ce_weight": {"kind": "number", "ge": 0},
        "pkt.feat_weight": {"kind": "number", "ge": 0},
        "pkt.eps": {"kind": "number", "gt": 0, "about": "a small positive number"},
    }
    #: checks over several settings, or a setting and the run (lakd.settings)
    CHECKS = [
        {"rule": "not_all_zero", "keys": ["pkt.ce_weight", "pkt.feat_weight"]},
        {"rule": "compare", "key": "@smallest_batch", "op": ">=", "than": 2, "about":
            "PKT matches the similarities between the images of a batch"},
    ]

    def __init__(self, student, teacher, cfg, num_data=0):
        super().__init__(student, teacher, cfg, num_data)
        s = self.section("pkt")
        self.ce_weight, self.feat_weight, self.eps = float(s["ce_weight"]), float(s["feat_weight"]), float(s["eps"])

    def teacher_pass(self, image, **batch):
        return self.teacher_forward(image, features=True)[1]["embedding"]

    def student_losses(self, image, target, f_t, **batch):
        logits, feats = self.student(image, features=True)
        f_s = feats["embedding"]
        with torch.autocast(device_type=f_s.device.type, enabled=False):  # float32: eps 1e-7 is below fp16's range
            loss = pkt_loss(f_s, f_t, self.eps)
        return logits, {"ce": self.ce_weight * F.cross_entropy(logits, target), "pkt": self.feat_weight * loss}
