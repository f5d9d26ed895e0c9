"""CTKD, curriculum temperature for knowledge distillation (Li et al., AAAI 2023): global and instance-wise.

KD with a learnable temperature. Global (``ctkd.temperature: global``, the default): one parameter ``t``
(initialised to 1) gives
``T = t_start + t_range * sigmoid(t)`` (the authors' 1 + 20 sigmoid). ``t`` reaches the loss through a gradient
reversal layer, identity forward and ``-lambda * grad`` backward, so the optimizer step moves the temperature to
*raise* the KD loss (the adversarial, harder task) while the student lowers it. ``lambda`` follows the authors'
cosine curriculum from 0 to ``lambda_max`` over ``decay_epochs`` epochs,
``lambda(e) = lambda_max * (1 - cos(pi * e / decay_epochs)) / 2`` with ``e`` the 1-based epoch, ``lambda_max``
afterwards (their ``CosineDecay(max 0, min -1, loops 10)`` applied as the layer's factor). Loss
``ce_weight * CE + kd_weight * KL(p_t^T || p_s^T) * T^2`` (the authors' ``-r 0.1 -a 0.9``, base KD).
``ctkd.logit_stand: true`` z-scores both sides' logits first (Sun et al., CVPR 2024; variant ``ctkd_ls`` with the
reference's KD weight 9).

Instance-wise (``ctkd.temperature: instance``, variant ``ctkd_instance``; the paper's Instance-T, its Fig. 2b): a
two-layer MLP reads the concatenated class probabilities ``[softmax(z_t), softmax(z_s)]`` (B x 2C) and gives one
raw value per sample, bounded as the global one, ``T_i = t_start + t_range * sigmoid(mlp(...)_i)``, behind the same
gradient reversal layer and curriculum; the KD term is the batch mean of ``T_i^2 * KL(p_t^{T_i} || p_s^{T_i})``
(the authors' README loop over the batch with ``KL_Loss``). What the authors published about the module is its
figure and their project page's words ("two 1x1-conv layers, the teacher's and student's outputs concatenated");
their file is on a cloud drive, not in the repository. Hence: hidden width ``ctkd.instance_hidden`` (256, our
choice), a ReLU between the layers (our choice), the MLP's inputs detached (the temperature network is the
adversary; the student learns only through the KD term's logits).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import Distiller, register_distiller
from .kd import kd_loss, standardize


class _ReverseGrad(torch.autograd.Function):
    """Identity forward, ``-scale * grad`` backward (torch has no built-in gradient reversal layer)."""

    @staticmethod
    def forward(ctx, x, scale: float):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return -ctx.scale * grad, None


def reverse_grad(x: torch.Tensor, scale: float) -> torch.Tensor:
    return _ReverseGrad.apply(x, scale)


def cosine_lambda(epoch: int, decay_epochs: float, lambda_max: float = 1.0) -> float:
    """The curriculum: 0 at epoch 0, ``lambda_max`` from ``decay_epochs`` on, a half cosine in between."""
    if decay_epochs <= 0 or epoch >= decay_epochs:
        return lambda_max
    return lambda_max * (1.0 - math.cos(math.pi * epoch / decay_epochs)) / 2.0


class GlobalTemperature(nn.Module):
    """One learnable temperature for the whole batch: ``t_start + t_range * sigmoid(t)``, ``t`` behind a gradient
    reversal layer of factor ``lam``."""

    def __init__(self, t_start: float, t_range: float, init: float = 1.0):
        super().__init__()
        self.t_start, self.t_range = t_start, t_range
        self.t = nn.Parameter(torch.tensor(float(init)))

    def forward(self, lam: float) -> torch.Tensor:
        return self.t_start + self.t_range * torch.sigmoid(reverse_grad(self.t, lam))


class InstanceTemperature(nn.Module):
    """One learnable temperature per sample (CTKD's Instance-T): ``t_start + t_range * sigmoid(mlp(x))`` with
    ``x = [softmax(z_t), softmax(z_s)]`` (detached), the MLP ``Linear(2C, hidden) -> ReLU -> Linear(hidden, 1)``
    and its output behind a gradient reversal layer of factor ``lam``."""

    def __init__(self, num_classes: int, hidden: int, t_start: float, t_range: float):
        super().__init__()
        self.t_start, self.t_range = t_start, t_range
        self.mlp = nn.Sequential(nn.Linear(2 * num_classes, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, 1))

    def forward(self, lam: float, logits_t: torch.Tensor, logits_s: torch.Tensor) -> torch.Tensor:
        x = torch.cat([F.softmax(logits_t.detach().float(), dim=1), F.softmax(logits_s.detach().float(), dim=1)], 1)
        return self.t_start + self.t_range * torch.sigmoid(reverse_grad(self.mlp(x).squeeze(1), lam))


def instance_kd_loss(logits_s: torch.Tensor, logits_t: torch.Tensor, temperature: torch.Tensor,
                     logit_stand: bool = False) -> torch.Tensor:
    """``mean_i T_i^2 * KL(softmax(z_t,i / T_i) || softmax(z_s,i / T_i))`` with one temperature per sample (B)."""
    if logit_stand:
        logits_s, logits_t = standardize(logits_s), standardize(logits_t)
    temp = temperature.view(-1, 1)
    log_p_s = F.log_softmax(logits_s.float() / temp, dim=1)
    log_p_t = F.log_softmax(logits_t.float() / temp, dim=1)
    return ((log_p_t.exp() * (log_p_t - log_p_s)).sum(1) * temperature**2).mean()


@register_distiller("ctkd")
class CTKD(Distiller):
    """CTKD (Li et al. AAAI 2023) distils KD at a learned curriculum temperature (ctkd_instance: one per sample); ctkd_ls: + logit standardization.

    Settings (``ctkd``): ``ce_weight``, ``kd_weight``, ``t_start``, ``t_range``, ``t_init``, ``decay_epochs``,
    ``lambda_max``, ``logit_stand`` (variant ``ctkd_ls``), ``temperature`` (``global`` or ``instance``, variant
    ``ctkd_instance``) and ``instance_hidden``. Extra part: ``temperature`` (one parameter, or the instance MLP)."""

    display_name = "CTKD"
    report_order = 21
    DEFAULTS = {"ctkd": {"ce_weight": 0.1, "kd_weight": 0.9, "t_start": 1.0, "t_range": 20.0, "t_init": 1.0,
                         "decay_epochs": 10, "lambda_max": 1.0, "logit_stand": False, "temperature": "global",
                         "instance_hidden": 256}}
    #: each setting's kind and range, checked before anything is built (lakd.settings; plain data)
    SETTINGS = {
        "ctkd.ce_weight": {"kind": "number", "ge": 0},
        "ctkd.kd_weight": {"kind": "number", "ge": 0},
        "ctkd.t_start": {"kind": "number", "gt": 0, "about": "the lowest temperature; the authors': 1"},
        "ctkd.t_range": {"kind": "number", "ge": 0, "about":
            "the temperature lies in [t_start, t_start + t_range]; the authors': 20"},
        "ctkd.t_init": {"kind": "number", "about": "the global temperature's initial parameter"},
        "ctkd.decay_epochs": {"kind": "number", "ge": 0, "about": "epochs of the curriculum's ramp; the authors': 10"},
        "ctkd.lambda_max": {"kind": "number", "ge": 0, "about": "the curriculum's final gradient-reversal weight"},
        "ctkd.logit_stand": {"kind": "bool", "about": "logit standardization"},
        "ctkd.temperature": {"kind": "choice", "choices": ["global", "instance"], "about":
            "one learned temperature, or one per sample (the paper's Instance-T)"},
        "ctkd.instance_hidden": {"kind": "int", "ge": 1, "about": "the instance MLP's width"},
    }
    #: checks over several settings, or a setting and the run (lakd.settings)
    CHECKS = [
        {"rule": "not_all_zero", "keys": ["ctkd.ce_weight", "ctkd.kd_weight"]},
    ]
    variants = {"ctkd_ls": ["ctkd.logit_stand=true", "ctkd.kd_weight=9.0"],
                "ctkd_instance": ["ctkd.temperature=instance"]}

    def __init__(self, student, teacher, cfg, num_data=0):
        super().__init__(student, teacher, cfg, num_data)
        s = self.section("ctkd")
        self.ce_weight, self.kd_weight = float(s["ce_weight"]), float(s["kd_weight"])
        t_start, t_range = float(s["t_start"]), float(s["t_range"])
        self.decay_epochs, self.lambda_max = float(s["decay_epochs"]), float(s["lambda_max"])
        self.logit_stand = bool(s["logit_stand"])
        self.mode = s["temperature"]
        if self.mode == "global":
            self.temperature = GlobalTemperature(t_start, t_range, float(s["t_init"]))
        else:
            h = int(s["instance_hidden"])
            classes = int(student.feature_info()["num_classes"])
            self.temperature = InstanceTemperature(classes, h, t_start, t_range)

    def grl_lambda(self) -> float:
        return cosine_lambda(self.epoch + 1, self.decay_epochs, self.lambda_max)

    def current_temperature(self) -> float | None:
        """The global temperature now (None with instance-wise temperatures: they depend on the sample)."""
        if self.mode != "global":
            return None
        with torch.no_grad():
            return float(self.temperature(0.0))

    def student_losses(self, image, target, t_logits, **batch):
        logits = self.student(image)
        if self.mode == "global":
            kd = kd_loss(logits, t_logits, self.temperature(self.grl_lambda()), self.logit_stand)
        else:
            temp = self.temperature(self.grl_lambda(), t_logits, logits)
            kd = instance_kd_loss(logits, t_logits, temp, self.logit_stand)
        return logits, {"ce": self.ce_weight * F.cross_entropy(logits, target), "kd": self.kd_weight * kd}
