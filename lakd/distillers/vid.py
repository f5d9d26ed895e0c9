"""VID, variational information distillation (Ahn et al., CVPR 2019), as in mdistiller and RepDistiller.

For every stage pair (the last ``n`` stage outputs of each net, ``n`` the smaller stage count), a regressor
``mu`` (1x1 conv to the teacher's channels, ReLU, 1x1 conv, ReLU, 1x1 conv; no biases) predicts the teacher's
map ``t`` from the student's ``s`` (the larger map average-pooled to the smaller one's size), and a learnable
per-channel variance ``sigma^2_c = softplus(alpha_c) + eps`` (initialised to ``init_pred_var`` = 5) completes a
Gaussian ``q(t | s)``. The loss is its negative log-likelihood without the constant (paper, Eq. 5)::

    1/2 * mean over batch, channels, positions of  [ (t - mu(s))^2 / sigma^2_c + log sigma^2_c ]

summed over the stage pairs, times ``feat_weight`` (1), plus ``ce_weight`` (1) times cross-entropy
(RepDistiller's VID script: ``-a 0 -b 1``). The variances are registered parameters, so they are trained (as in
RepDistiller; mdistiller keeps them in a plain list, outside its optimizer).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import Distiller, register_distiller
from .stage_utils import pool_to_match


def vid_nll(pred_mean: torch.Tensor, target: torch.Tensor, log_scale: torch.Tensor, eps: float) -> torch.Tensor:
    """Mean Gaussian negative log-likelihood (no constant) with per-channel variance softplus(log_scale) + eps."""
    var = (F.softplus(log_scale.float()) + eps).view(1, -1, 1, 1)
    return 0.5 * ((pred_mean.float() - target.float()) ** 2 / var + torch.log(var)).mean()


def regressor(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 1, bias=False), nn.ReLU(),
                         nn.Conv2d(c_out, c_out, 1, bias=False), nn.ReLU(),
                         nn.Conv2d(c_out, c_out, 1, bias=False))


@register_distiller("vid")
class VID(Distiller):
    """VID (Ahn et al., CVPR 2019) distils stage features through a variational bound on mutual information.

    A regressor per stage gives the mean and learnt per-channel variances the spread of a Gaussian over the
    teacher's map."""

    display_name = "VID"
    report_order = 53
    DEFAULTS = {"vid": {"ce_weight": 1.0, "feat_weight": 1.0, "init_pred_var": 5.0, "eps": 1e-5}}
    #: each setting's kind and range, checked before anything is built (lakd.settings; plain data)
    SETTINGS = {
        "vid.ce_weight": {"kind": "number", "ge": 0},
        "vid.feat_weight": {"kind": "number", "ge": 0},
        "vid.init_pred_var": {"kind": "number", "gt": 0, "about": "the initial predicted variance"},
        "vid.eps": {"kind": "number", "gt": 0, "about": "the variance's floor"},
    }
    #: checks over several settings, or a setting and the run (lakd.settings)
    CHECKS = [
        {"rule": "not_all_zero", "keys": ["vid.ce_weight", "vid.feat_weight"]},
        {"rule": "compare", "key": "vid.init_pred_var", "op": ">", "than": "vid.eps", "about":
            "the predicted variance is eps plus a softplus"},
    ]

    def __init__(self, student, teacher, cfg, num_data=0):
        super().__init__(student, teacher, cfg, num_data)
        s = self.section("vid")
        self.ce_weight, self.feat_weight = float(s["ce_weight"]), float(s["feat_weight"])
        init_var, self.eps = float(s["init_pred_var"]), float(s["eps"])
        ch_s = [f.channels for f in student.feature_info()["stages"]]
        ch_t = [f.channels for f in teacher.feature_info()["stages"]]
        self.num_stages = n = min(len(ch_s), len(ch_t))
        self.regressors = nn.ModuleList(regressor(cs, ct) for cs, ct in zip(ch_s[-n:], ch_t[-n:]))
        alpha = math.log(math.expm1(init_var - self.eps))  # softplus(alpha) + eps = init_pred_var
        self.log_scales = nn.ParameterList(nn.Parameter(torch.full((ct,), alpha)) for ct in ch_t[-n:])

    def vid_loss(self, fs: list, ft: list) -> torch.Tensor:
        n = self.num_stages
        total = 0.0
        for s, t, reg, a in zip(fs[-n:], ft[-n:], self.regressors, self.log_scales):
            s, t = pool_to_match(s, t)
            total = total + vid_nll(reg(s), t, a, self.eps)
        return total

    def teacher_pass(self, image, **batch):
        return self.teacher_forward(image, features=True)[1]["stages"]

    def student_losses(self, image, target, t_stages, **batch):
        logits, feats = self.student(image, features=True)
        return logits, {
            "ce": self.ce_weight * F.cross_entropy(logits, target),
            "vid": self.feat_weight * self.vid_loss(feats["stages"], t_stages),
        }
