"""WKD-L, Wasserstein distance based logit distillation (Lv, Yang, Li, NeurIPS 2024): the teacher's target-class
probability by cross-entropy, and its non-target distribution by an entropy-regularised optimal transport
(Sinkhorn) distance whose ground cost between classes comes from the teacher.

With ``p = softmax(z / T)`` over the C - 1 non-target classes of each sample (student and teacher), a C x C class
cost ``D`` (its target row and column left out) and ``K = exp(-D / lambda)``::

    target = - mean_i softmax(z_t)_i[y_i] * log softmax(z_s)_i[y_i]                  (T 1)
    u = 1 / (C - 1);  repeat ``iters`` times:  v = p_t / (K^T u + 1e-8),  u = p_s / (K v + 1e-8)
    WD_i  = sum_jk u_j K_jk v_k D_jk                                                  (the transport plan's cost)
    loss  = ce_weight * CE + target_weight * target + wkd_weight * w(epoch) * mean_i WD_i

as the authors' code (JiamingLv/WKD, ``mdistiller/distillers/WKD.py``: ``sinkhorn``, ``wkd_logit_loss`` and
``wkd_logit_loss_with_speration``); the gradient flows through the Sinkhorn iterations into the student's
probabilities, as theirs. The ground cost is ``relu(D) + 1e-8`` with ``D = 1 - exp(-sharpen * D0)``
(``sharpen`` 0: ``D = D0``), and ``D0`` is, by ``wkd_l.cost``:

- ``classifier`` (default): ``1 - cosine similarity`` of the teacher's classifier weights (the authors'
  ``COST_MATRIX: fc``), computed once when the method is built;
- a file path: a C x C tensor (``torch.save`` / ``.npy``), e.g. the authors' CKA matrices
  (``wkd_cost_matrix/cifar100/resnet32x4/linear_cka.pth``: ``1 -`` linear CKA between the teacher's per-class
  feature sets over the training data), which their CIFAR-100 and ImageNet configs use.

``w(epoch)``: the weight is constant up to ``decay_from`` (1-based epochs) and then falls to 0 along a half cosine
at the last epoch (the authors' ``COSINE_DECAY_EPOCH``: 150 of 240 on CIFAR-100, 0, i.e. from the start, on
ImageNet). Instead of building each sample's (C - 1) x (C - 1) cost as theirs, the target class is kept with zero
mass on both sides (its softmax entry at ``-inf``, its first ``u`` 0): the same plan and distance, and one shared
C x C kernel (their form needs B x (C - 1)^2 memory).
"""
from __future__ import annotations

import math
import os

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import LakdError
from .base import Distiller, register_distiller


def classifier_cost(weight: torch.Tensor) -> torch.Tensor:
    """``1 - cos(w_j, w_k)`` between the classifier's class weight vectors (C x C)."""
    w = F.normalize(weight.detach().float(), p=2, dim=-1)
    return 1.0 - w @ w.t()


def load_cost(path: str, num_classes: int) -> torch.Tensor:
    """A C x C cost matrix from a file (``torch.save``'d tensor, or ``.npy``)."""
    if not os.path.isfile(path):
        raise LakdError(f"wkd_l.cost: no file {path!r}; give a C x C cost matrix file (e.g. the authors' "
                        f"wkd_cost_matrix/cifar100/resnet32x4/linear_cka.pth) or wkd_l.cost=classifier")
    try:
        m = np.load(path) if path.endswith(".npy") else torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same one-line message
        raise LakdError(f"wkd_l.cost: cannot read {path!r} as a tensor ({type(e).__name__}); give a C x C matrix "
                        f"saved by torch.save or numpy.save, or wkd_l.cost=classifier") from None
    m = torch.as_tensor(m, dtype=torch.float32)
    if m.shape != (num_classes, num_classes):
        raise LakdError(f"wkd_l.cost: {path!r} holds a {tuple(m.shape)} matrix but the teacher has {num_classes} "
                        f"classes; give a {num_classes} x {num_classes} matrix or wkd_l.cost=classifier")
    return m


def sinkhorn_plan(w1: torch.Tensor, w2: torch.Tensor, kernel: torch.Tensor, iters: int,
                  u0: torch.Tensor | None = None) -> torch.Tensor:
    """The authors' Sinkhorn scaling: B x C x C transport plans ``u_j K_jk v_k`` between the rows of ``w1``
    (marginal over j) and ``w2`` (over k), B x C, for the shared C x C ``kernel``; ``u0`` the first ``u``
    (default ``1 / C``)."""
    u = torch.full_like(w1, 1.0 / w1.shape[1]) if u0 is None else u0
    v = w2
    for _ in range(iters):
        v = w2 / (u @ kernel + 1e-8)  # K^T u, per row
        u = w1 / (v @ kernel.t() + 1e-8)  # K v
    return u.unsqueeze(2) * kernel.unsqueeze(0) * v.unsqueeze(1)


def wkd_logit_terms(z_s: torch.Tensor, z_t: torch.Tensor, target: torch.Tensor, cost: torch.Tensor,
                    temperature: float, reg: float = 0.05, iters: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """(target term, mean Wasserstein distance of the non-target distributions) for cost ``cost`` (C x C, already
    ``relu(D) + 1e-8``)."""
    z_s, z_t = z_s.float(), z_t.float()
    y = target.view(-1, 1)
    s_y = F.log_softmax(z_s, dim=1).gather(1, y)
    t_y = F.softmax(z_t, dim=1).gather(1, y).detach()
    target_term = -(t_y * s_y).mean()
    gt = F.one_hot(target, z_s.shape[1]).to(torch.bool)
    p_s = F.softmax((z_s / temperature).masked_fill(gt, float("-inf")), dim=1)
    p_t = F.softmax((z_t / temperature).masked_fill(gt, float("-inf")), dim=1)
    u0 = (~gt).float() / (z_s.shape[1] - 1)
    plan = sinkhorn_plan(p_s, p_t, torch.exp(-cost / reg), iters, u0)
    return target_term, (plan * cost.unsqueeze(0)).sum((1, 2)).mean()


def cosine_decay(weight: float, epoch: int, start: float, total: int) -> float:
    """The authors' schedule of a loss weight: ``weight`` up to epoch ``start`` (1-based ``epoch``), then
    ``weight * (1 + cos(pi (epoch - start) / (total - start))) / 2``."""
    if epoch <= start or total <= start:
        return weight
    return 0.5 * weight * (1.0 + math.cos((epoch - start) / (total - start) * math.pi))


@register_distiller("wkd_l")
class WKDL(Distiller):
    """WKD-L (Lv et al., NeurIPS 2024) distils the non-target probabilities by a Wasserstein distance over classes.

    The class cost comes from the teacher's classifier (``wkd_l.cost: classifier``) or a C x C file (the authors'
    CKA matrices). Settings (``wkd_l``): ``ce_weight``, ``target_weight``, ``wkd_weight``, ``T``, ``cost``,
    ``sharpen``, ``sinkhorn_lambda``, ``sinkhorn_iters``, ``decay_from`` (epoch of the weight's cosine decay)."""

    display_name = "WKD-L"
    report_order = 28
    DEFAULTS = {"wkd_l": {"ce_weight": 1.0, "target_weight": 1.0, "wkd_weight": 600.0, "T": 8.0,
                          "cost": "classifier", "sharpen": 1.0, "sinkhorn_lambda": 0.05, "sinkhorn_iters": 10,
                          "decay_from": 150}}
    #: each setting's kind and range, checked before anything is built (lakd.settings; plain data)
    SETTINGS = {
        "wkd_l.ce_weight": {"kind": "number", "ge": 0},
        "wkd_l.target_weight": {"kind": "number", "ge": 0},
        "wkd_l.wkd_weight": {"kind": "number", "ge": 0},
        "wkd_l.T": {"kind": "number", "gt": 0, "about": "the non-target softmax's temperature"},
        "wkd_l.cost": {"kind": "text", "about": "classifier (from the teacher's classifier weights) or the path of a "
                                                "C x C cost file"},
        "wkd_l.sharpen": {"kind": "number", "ge": 0, "about": "the cost's sharpening, 1 - exp(-sharpen * cost)"},
        "wkd_l.sinkhorn_lambda": {"kind": "number", "gt": 0, "about": "the entropic regularisation"},
        "wkd_l.sinkhorn_iters": {"kind": "int", "ge": 1},
        "wkd_l.decay_from": {"kind": "number", "ge": 0, "about": "the epoch after which the weight decays"},
    }
    #: checks over several settings, or a setting and the run (lakd.settings)
    CHECKS = [
        {"rule": "not_all_zero", "keys": ["wkd_l.ce_weight", "wkd_l.target_weight", "wkd_l.wkd_weight"]},
    ]

    def requirements(self):
        cost = self.section("wkd_l").get("cost")
        return {"student": (), "teacher": (("classifier", "wkd_l.cost", cost),) if cost == "classifier" else ()}

    def __init__(self, student, teacher, cfg, num_data=0):
        super().__init__(student, teacher, cfg, num_data)
        s = self.section("wkd_l")
        self.ce_weight, self.target_weight, self.wkd_weight, self.sharpen = (
            float(s[k]) for k in ("ce_weight", "target_weight", "wkd_weight", "sharpen"))
        self.T, self.reg = float(s["T"]), float(s["sinkhorn_lambda"])
        self.iters, self.decay_from = int(s["sinkhorn_iters"]), float(s["decay_from"])
        num_classes = int(teacher.feature_info()["num_classes"])
        if s["cost"] == "classifier":
            d0 = classifier_cost(teacher.classifier.weight)
        elif isinstance(s["cost"], str) and s["cost"]:
            d0 = load_cost(s["cost"], num_classes)
        else:
            raise LakdError(f"wkd_l.cost must be classifier or the path of a C x C cost file, got {s['cost']!r}")
        if self.sharpen:
            d0 = 1.0 - torch.exp(-self.sharpen * d0)
        # derived from the teacher or a file, so not saved in checkpoints (rebuilt the same on resume)
        self.register_buffer("cost", F.relu(d0) + 1e-8, persistent=False)
        self.cost: torch.Tensor

    def weight_now(self) -> float:
        return cosine_decay(self.wkd_weight, self.epoch + 1, self.decay_from, self.total_epochs)

    def student_losses(self, image, target, t_logits, **batch):
        logits = self.student(image)
        with torch.autocast(device_type=logits.device.type, enabled=False):
            tgt, wd = wkd_logit_terms(logits, t_logits, target, self.cost, self.T, self.reg, self.iters)
        return logits, {
            "ce": self.ce_weight * F.cross_entropy(logits, target),
            "target": self.target_weight * tgt,
            "wkd": self.weight_now() * wd,
        }

