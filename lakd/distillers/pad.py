"""PAD-L2, prime-aware adaptive distillation with the L2 loss (Zhang et al., ECCV 2020), as torchdistill has it.

The student's pooled embedding ``f_s`` (``feats["embedding"]``) is pulled to the teacher's ``f_t`` by an L2 loss
whose every sample and dimension is weighted by a learned uncertainty: a variance branch on the student's
embedding, ``Linear(d_s, d_t) -> BatchNorm1d(d_t)``, predicts ``log sigma^2`` per dimension (torchdistill's
``VarianceBranch4PAD``), and (its ``PADL2Loss``, "the author's provided code takes average of losses")::

    pad = mean_b mean_d [ (f_t - f_s)^2 / (eps + exp(log sigma^2)) + log sigma^2 ]      (eps 1e-6)

Samples the student cannot fit get a large variance and so a small weight; the ``log sigma^2`` term keeps the
variances from growing without bound. PAD is two-stage in torchdistill's ImageNet recipe: a whole CE + 15 x L2
run (MSE of the pooled embeddings), then 30 epochs of CE + 1 x PAD-L2 from it (90 + 30 epochs). In one run here:
the first ``pad_l2.l2_fraction`` of the epochs (0.75, their 90 of 120) train ``ce_weight * CE + l2_weight * MSE`` and
the variance branch is idle; the rest train ``ce_weight * CE + pad_weight * PAD-L2``. ``l2_fraction: 0`` is
PAD-L2 from the start. A student embedding of another width than the teacher's passes through a linear map
``Linear(d_s, d_t)`` first (torchdistill's pair has equal widths and none).

Two backward groups (``trainable_groups``): the student with the map, and the variance branch, whose forward runs
through its own group, so that under torchrun the branch's idle first stage leaves no parameter of a
``DistributedDataParallel`` without its gradient.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import Distiller, StepGroup, register_distiller


def pad_l2_loss(f_s: torch.Tensor, f_t: torch.Tensor, log_var: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``mean_b mean_d [(f_t - f_s)^2 / (eps + exp(log_var)) + log_var]`` (torchdistill's ``PADL2Loss``)."""
    f_s, f_t, log_var = f_s.flatten(1).float(), f_t.flatten(1).float(), log_var.float()
    return ((f_t - f_s) ** 2 / (eps + torch.exp(log_var)) + log_var).mean(1).mean()


class VarianceBranch(nn.Sequential):
    """``log sigma^2`` per embedding dimension from the student's embedding: ``Linear -> BatchNorm1d``."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__(nn.Linear(dim_in, dim_out), nn.BatchNorm1d(dim_out))


@register_distiller("pad_l2")
class PADL2(Distiller):
    """PAD-L2 (Zhang et al. ECCV 2020) distils pooled embeddings by an L2 loss weighted by learned uncertainty.

    Settings (``pad_l2``): ``ce_weight``, ``l2_weight`` and ``pad_weight`` (the two stages' feature weights),
    ``l2_fraction`` (the share of the epochs in the plain-L2 stage), ``eps``. Extra parts: ``var_branch``, and
    ``connector`` when the embedding widths differ."""

    display_name = "PAD-L2"
    report_order = 47
    DEFAULTS = {"pad_l2": {"ce_weight": 1.0, "l2_weight": 15.0, "pad_weight": 1.0, "l2_fraction": 0.75, "eps": 1e-6}}
    #: each setting's kind and range, checked before anything is built (lakd.settings; plain data)
    SETTINGS = {
        "pad_l2.ce_weight": {"kind": "number", "ge": 0},
        "pad_l2.l2_weight": {"kind": "number", "ge": 0},
        "pad_l2.pad_weight": {"kind": "number", "ge": 0},
        "pad_l2.l2_fraction": {"kind": "number", "ge": 0, "le": 1, "about":
            "the share of the epochs trained with plain L2 before PAD-L2; torchdistill's 90 of 120 epochs: 0.75"},
        "pad_l2.eps": {"kind": "number", "gt": 0, "about": "a small positive number; torchdistill's 1e-6"},
    }
    #: checks over several settings, or a setting and the run (lakd.settings)
    CHECKS = [
        {"rule": "not_all_zero", "keys": ["pad_l2.ce_weight", "pad_l2.l2_weight", "pad_l2.pad_weight"]},
    ]

    def __init__(self, student, teacher, cfg, num_data=0):
        super().__init__(student, teacher, cfg, num_data)
        s = self.section("pad_l2")
        self.ce_weight, self.l2_weight, self.pad_weight, self.l2_fraction, self.eps = (
            float(s[k]) for k in ("ce_weight", "l2_weight", "pad_weight", "l2_fraction", "eps"))
        d_s = int(student.feature_info()["embedding_dim"])
        d_t = int(teacher.feature_info()["embedding_dim"])
        self.connector = nn.Linear(d_s, d_t) if d_s != d_t else None
        self.var_branch = VarianceBranch(d_s, d_t)
        if self.l2_epochs() > 0:  # idle in the first stage, where the reachability check's step runs
            self.unreached_ok = ("var_branch.*",)

    def l2_epochs(self) -> int:
        """The epochs of the plain-L2 stage: ``round(l2_fraction * epochs)``."""
        return int(round(self.l2_fraction * self.total_epochs))

    def in_l2_stage(self) -> bool:
        return self.epoch < self.l2_epochs()

    def teacher_pass(self, image, **batch):
        return self.teacher_forward(image, features=True)[1]["embedding"]

    def trainable_groups(self) -> list[StepGroup]:
        branch = [p for p in self.var_branch.parameters() if p.requires_grad]
        ids = {id(p) for p in branch}
        main = [p for p in self.trainable_parameters() if id(p) not in ids]
        return [StepGroup(self.forward_train, main), StepGroup(self.var_branch, branch)]

    def student_losses(self, image, target, f_t, **batch):
        logits, feats = self.student(image, features=True)
        emb = feats["embedding"]
        f_s = self.connector(emb) if self.connector is not None else emb
        losses = {"ce": self.ce_weight * F.cross_entropy(logits, target)}
        if self.in_l2_stage():
            losses["l2"] = self.l2_weight * F.mse_loss(f_s.float(), f_t.float())
        else:
            log_var = self.call_group(1, self.var_branch, emb)
            with torch.autocast(device_type=emb.device.type, enabled=False):  # exp and eps 1e-6 in float32
                losses["pad"] = self.pad_weight * pad_l2_loss(f_s, f_t, log_var, self.eps)
        return logits, losses
