"""CC, correlation congruence (Peng et al., ICCV 2019): the student keeps the teacher's correlations between the
instances of a batch, on top of cross-entropy.

The penultimate embeddings (``feats["embedding"]``) of each network pass through a learnable linear embedding
head to ``feat_dim`` (128); both heads are trained. Two forms of the correlation loss, ``cc.form``:

- ``repdistiller`` (the default): RepDistiller's ``Correlation`` (``distiller_zoo/CC.py``, the code the CC
  authors shared with it), with which the CIFAR-100 figures of the CRD paper's Table 1 were measured: linear
  heads without normalisation (``LinearEmbed``), and the kernel-free
  ``mean_i sum_d |v_s - v_t|_{i,d} |v_s - v_t|_{i+1,d}`` over consecutive samples of the batch. Weights: CE 1,
  CC 0.02 (RepDistiller's ``--distill correlation -a 0 -b 0.02``, set for this form).
- ``gaussian``: the paper's Gaussian RBF kernel in its P-order Taylor expansion (section 3.3; for unit vectors
  ``exp(-gamma |x - y|^2) = exp(-2 gamma) exp(2 gamma x.y)``) on L2-normalised embeddings (the CRD-style
  ``Embed``)::

      C_ij = sum_{p=0..P} exp(-2 gamma) (2 gamma)^p / p! (x_i . x_j)^p

  with ``gamma = 0.4`` and ``P = 2`` (the paper's choice), and the loss ``||C_s - C_t||_F^2 / B^2`` (the paper's
  equation 6). No reference publishes a weight for this form: torchdistill's ``CCKDLoss`` (weight 0.003 in its
  ImageNet sample config) takes the kernel of unnormalised embeddings and the unsquared norm. For unit vectors
  every entry of ``C`` lies in [exp(-0.8), 1], so the term is small: at RepDistiller's weight 0.02 it is about
  1e-6 at a student's start (against about 1 for the ``repdistiller`` form), practically cross-entropy training;
  give it a weight of its own (``cc.feat_weight``) if you use it.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import Distiller, register_distiller
from .crd import Embed


def rbf_taylor_correlation(x: torch.Tensor, gamma: float, order: int) -> torch.Tensor:
    """B x B correlation of the (unit) rows of ``x``: the P-order Taylor expansion of the Gaussian RBF kernel."""
    sim = x @ x.t()
    out = torch.zeros_like(sim)
    for p in range(order + 1):
        out = out + math.exp(-2 * gamma) * (2 * gamma) ** p / math.factorial(p) * sim.pow(p)
    return out


def repdistiller_correlation_loss(v_s: torch.Tensor, v_t: torch.Tensor) -> torch.Tensor:
    """RepDistiller's ``Correlation``: ``mean_i sum_d |d_i| |d_{i+1}|`` of the differences ``d = v_s - v_t``."""
    delta = (v_s - v_t).abs()
    return (delta[:-1] * delta[1:]).sum(1).mean()


class LinearEmbed(nn.Module):
    """A linear map of the flattened feature (RepDistiller's ``LinearEmbed``, no normalisation)."""

    def __init__(self, dim_in: int, dim_out: int = 128):
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.flatten(1))


def cc_loss(v_s: torch.Tensor, v_t: torch.Tensor, gamma: float = 0.4, order: int = 2) -> torch.Tensor:
    """``||C(v_s) - C(v_t)||_F^2 / B^2`` on embedded, unit-norm features."""
    diff = rbf_taylor_correlation(v_s, gamma, order) - rbf_taylor_correlation(v_t, gamma, order)
    return diff.pow(2).sum() / v_s.shape[0] ** 2


@register_distiller("cc")
class CC(Distiller):
    """CC (Peng et al., ICCV 2019) distils the teacher's instance-to-instance correlations within a batch.

    They are computed on learnable embeddings of the penultimate features: RepDistiller's kernel-free form, or the
    paper's Taylor-expanded Gaussian RBF kernel (``cc.form: gaussian``).

    Extra parts: ``embed_s`` and ``embed_t``, linear heads to ``cc.feat_dim`` (followed by L2 normalisation for
    ``cc.form: gaussian``).
    """

    display_name = "CC"
    report_order = 43
    DEFAULTS = {"cc": {"ce_weight": 1.0, "feat_weight": 0.02, "feat_dim": 128, "gamma": 0.4, "order": 2,
                       "form": "repdistiller"}}
    #: each setting's kind and range, checked before anything is built (lakd.settings; plain data)
    SETTINGS = {
        "cc.ce_weight": {"kind": "number", "ge": 0},
        "cc.feat_weight": {"kind": "number", "ge": 0},
        "cc.feat_dim": {"kind": "int", "ge": 1, "about": "the embedding's width"},
        "cc.gamma": {"kind": "number", "gt": 0, "about": "the RBF kernel's width parameter"},
        "cc.order": {"kind": "int", "ge": 0, "about": "the Taylor expansion's order"},
        "cc.form": {"kind": "choice", "choices": ["gaussian", "repdistiller"]},
    }
    #: checks over several settings, or a setting and the run (lakd.settings)
    CHECKS = [
        {"rule": "not_all_zero", "keys": ["cc.ce_weight", "cc.feat_weight"]},
        {"rule": "compare", "key": "@smallest_batch", "op": ">=", "than": 2, "about":
            "CC correlates the images of a batch with each other"},
    ]

    def __init__(self, student, teacher, cfg, num_data=0):
        super().__init__(student, teacher, cfg, num_data)
        s = self.section("cc")
        self.ce_weight, self.feat_weight = float(s["ce_weight"]), float(s["feat_weight"])
        self.gamma, self.order, self.form = float(s["gamma"]), int(s["order"]), s["form"]
        dim = int(s["feat_dim"])
        head = Embed if self.form == "gaussian" else LinearEmbed
        self.embed_s = head(student.feature_info()["embedding_dim"], dim)
        self.embed_t = head(teacher.feature_info()["embedding_dim"], dim)

    def teacher_pass(self, image, **batch):
        return self.teacher_forward(image, features=True)[1]["embedding"]

    def student_losses(self, image, target, f_t, **batch):
        logits, feats = self.student(image, features=True)
        f_s = feats["embedding"]
        with torch.autocast(device_type=f_s.device.type, enabled=False):
            v_s, v_t = self.embed_s(f_s.float()), self.embed_t(f_t.float())
            loss = (cc_loss(v_s, v_t, self.gamma, self.order) if self.form == "gaussian"
                    else repdistiller_correlation_loss(v_s, v_t))
        return logits, {"ce": self.ce_weight * F.cross_entropy(logits, target), "cc": self.feat_weight * loss}
