"""NST, neuron selectivity transfer (Huang & Wang, 2017): the distribution of the student's channel activation
patterns matches the teacher's, measured by a maximum mean discrepancy with a polynomial kernel.

As mdistiller's ``NST``: on every stage output (``feats["stages"]``, mdistiller's ``feats[1:]``), the larger of
the two maps is average-pooled to the smaller's size, each channel's H*W pattern is L2-normalised (the channels
are the MMD's samples, so student and teacher may have different channel counts), and per stage::

    MMD^2 = mean_ij k(t_i, t_j) + mean_ij k(s_i, s_j) - 2 mean_ij k(s_i, t_j),   k(x, y) = (x . y)^2

(the paper's polynomial kernel with d = 2, c = 0), summed over the stages. Weights: CE 1, NST 50 (mdistiller's
``NST.LOSS.FEAT_WEIGHT``, RepDistiller's ``-b 50``). The references build the kernel by broadcasting to
B x C x C x HW; here it is the square of a batched matrix product, the same numbers without that temporary.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Distiller, register_distiller


def poly_kernel_mean(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean over the batch and all channel pairs of ``(a_i . b_j)^2``; ``a`` is B x Ca x D, ``b`` B x Cb x D."""
    return torch.bmm(a, b.transpose(1, 2)).pow(2).mean()


def nst_stage_loss(f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
    """Polynomial-kernel MMD^2 between the student's and the teacher's channel patterns of one stage."""
    f_s, f_t = f_s.float(), f_t.float()
    hs, ht = f_s.shape[2:], f_t.shape[2:]
    if hs[0] > ht[0]:
        f_s = F.adaptive_avg_pool2d(f_s, ht)
    elif hs[0] < ht[0]:
        f_t = F.adaptive_avg_pool2d(f_t, hs)
    s = F.normalize(f_s.flatten(2), dim=2)
    t = F.normalize(f_t.flatten(2), dim=2)
    with torch.no_grad():
        tt = poly_kernel_mean(t, t)
    return tt + poly_kernel_mean(s, s) - 2 * poly_kernel_mean(s, t)


def nst_loss(g_s: list, g_t: list) -> torch.Tensor:
    return sum(nst_stage_loss(f_s, f_t) for f_s, f_t in zip(g_s, g_t))


@register_distiller("nst")
class NST(Distiller):
    """NST (Huang & Wang, 2017) distils the teacher's channel activation patterns of every stage by a kernel MMD.

    Loss ``ce_weight * CE + feat_weight * sum over stages of MMD^2`` (module docstring); no learnable part.
    """

    display_name = "NST"
    report_order = 42
    DEFAULTS = {"nst": {"ce_weight": 1.0, "feat_weight": 50.0}}
    #: each setting's kind and range, checked before anything is built (lakd.settings; plain data)
    SETTINGS = {
        "nst.ce_weight": {"kind": "number", "ge": 0},
        "nst.feat_weight": {"kind": "number", "ge": 0},
    }
    #: checks over several settings, or a setting and the run (lakd.settings)
    CHECKS = [
        {"rule": "not_all_zero", "keys": ["nst.ce_weight", "nst.feat_weight"]},
    ]

    def __init__(self, student, teacher, cfg, num_data=0):
        super().__init__(student, teacher, cfg, num_data)
        s = self.section("nst")
        self.ce_weight, self.feat_weight = float(s["ce_weight"]), float(s["feat_weight"])

    def teacher_pass(self, image, **batch):
        return self.teacher_forward(image, features=True)[1]["stages"]

    def student_losses(self, image, target, g_t, **batch):
        logits, feats = self.student(image, features=True)
        g_s = feats["stages"]
        with torch.autocast(device_type=logits.device.type, enabled=False):
            loss = nst_loss(g_s, g_t)
        return logits, {"ce": self.ce_weight * F.cross_entropy(logits, target), "nst": self.feat_weight * loss}
