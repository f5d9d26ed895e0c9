"""KDSVD, knowledge distillation with singular value decomposition (Lee et al., ECCV 2018): the student keeps
the teacher's relations between the dominant singular vectors of consecutive stage outputs.

As mdistiller's ``KDSVD``: for every stage output (``feats["stages"]``, mdistiller's ``feats[1:]``) each sample's
map is reshaped to a matrix (``layout: mdistiller`` = mdistiller's ``view(B, C*H, W)``; ``layout: channels`` =
the paper's HW x C, right singular vectors over channels) and decomposed; the teacher keeps its first ``k``
right singular vectors, the student its first ``k + 3``, each vector and the singular values L2-normalised.
Each teacher vector picks the student vector of largest absolute cosine, sign-aligned (``align``); both sides'
vectors are scaled by the teacher's normalised singular values. Between consecutive stages ``i - 1, i`` the
relation is the Gaussian RBF ``exp(-(v_i[a] - v_{i-1}[b])^2 / 8)`` of every pair of entries (per singular
vector), and the loss is ``sum over stage pairs of sum (R_s - R_t)^2 / B`` (non-finite entries dropped, as the
reference does; non-finite gradient entries of the SVD, which blow up at repeated singular values, are dropped
too). Weights: CE 1, KDSVD 1, ``k = 1``
(mdistiller's ``KDSVD.K``). The SVD runs in float32 (``torch.linalg.svd``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import LakdError
from .base import Distiller, register_distiller


def finite(x: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isfinite(x), x, torch.zeros_like(x))


def right_singular(feat: torch.Tensor, n: int, layout: str = "mdistiller") -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` right singular vectors (B x D x n, each unit-norm) and singular values (B x n, the
    vector unit-norm) of each sample's map as a matrix (``layout``: module docstring)."""
    b, c, h, w = feat.shape
    x = feat.float().reshape(b, c * h, w) if layout == "mdistiller" else feat.float().reshape(b, c, h * w).transpose(1, 2)
    if x.requires_grad:
        # SVD's backward divides by differences of singular values: repeated ones (e.g. the zero singular values
        # of a rank-deficient post-ReLU map) give inf/nan, which would reach and destroy the student's weights.
        # The reference drops non-finite values in the forward only; here the gradient's are dropped as well.
        x.register_hook(lambda g: torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0))
    _, s, vh = torch.linalg.svd(x, full_matrices=False)
    v = finite(vh.transpose(1, 2))[:, :, :n]
    s = finite(s)[:, :n]
    return F.normalize(v, dim=1), F.normalize(s, dim=1)


def align_vectors(v_s: torch.Tensor, v_t: torch.Tensor) -> torch.Tensor:
    """For each teacher vector (column of ``v_t``, B x D x k) the student column (of ``v_s``, B x D x m) with the
    largest absolute cosine, times the cosine's sign: B x D x k."""
    cos = v_s.transpose(1, 2) @ v_t  # B x m x k
    best = cos.abs().amax(dim=1, keepdim=True)
    mask = torch.where(cos.abs() == best, torch.sign(cos), torch.zeros_like(cos))
    return v_s @ mask


def svd_relation(v: torch.Tensor, v_prev: torch.Tensor) -> torch.Tensor:
    """B x D_i x D_{i-1} x k: ``exp(-(v[a] - v_prev[b])^2 / 8)`` per singular vector."""
    return torch.exp(-(v.unsqueeze(2) - v_prev.unsqueeze(1)).pow(2) / 8)


def kdsvd_loss(g_s: list, g_t: list, k: int = 1, layout: str = "mdistiller") -> torch.Tensor:
    losses = []
    prev_s = prev_t = None
    for f_s, f_t in zip(g_s, g_t):
        with torch.no_grad():
            v_t, s_t = right_singular(f_t, k, layout)
        v_s, _ = right_singular(f_s, k + 3, layout)
        v_s = align_vectors(v_s, v_t)
        v_t, v_s = v_t * s_t.unsqueeze(1), v_s * s_t.unsqueeze(1)
        if prev_s is not None:
            diff = (svd_relation(v_s, prev_s) - svd_relation(v_t, prev_t)).pow(2)
            losses.append(finite(diff).sum())
        prev_s, prev_t = v_s, v_t
    return sum(losses) / g_s[0].shape[0]


@register_distiller("kdsvd")
class KDSVD(Distiller):
    """KDSVD (Lee et al., ECCV 2018) distils relations between the singular vectors of consecutive stage outputs.

    Loss ``ce_weight * CE + feat_weight * KDSVD`` (module docstring); no learnable part. Student and teacher must
    have as many stages, of the same spatial sizes.
    """

    display_name = "KDSVD"
    report_order = 45
    DEFAULTS = {"kdsvd": {"ce_weight": 1.0, "feat_weight": 1.0, "k": 1, "layout": "mdistiller"}}
    #: each setting's kind and range, checked before anything is built (lakd.settings; plain data)
    SETTINGS = {
        "kdsvd.ce_weight": {"kind": "number", "ge": 0},
        "kdsvd.feat_weight": {"kind": "number", "ge": 0},
        "kdsvd.k": {"kind": "int", "ge": 1, "about": "singular vectors kept"},
        "kdsvd.layout": {"kind": "choice", "choices": ["mdistiller", "channels"]},
    }
    #: checks over several settings, or a setting and the run (lakd.settings)
    CHECKS = [
        {"rule": "not_all_zero", "keys": ["kdsvd.ce_weight", "kdsvd.feat_weight"]},
    ]

    def __init__(self, student, teacher, cfg, num_data=0):
        super().__init__(student, teacher, cfg, num_data)
        s = self.section("kdsvd")
        self.ce_weight, self.feat_weight = float(s["ce_weight"]), float(s["feat_weight"])
        self.k, self.layout = int(s["k"]), s["layout"]
        st_s, st_t = student.feature_info()["stages"], teacher.feature_info()["stages"]
        sizes = [(a.height, a.width) for a in st_s], [(a.height, a.width) for a in st_t]
        if len(st_s) < 2 or sizes[0] != sizes[1]:
            raise LakdError(f"KDSVD relates consecutive stage outputs of equal sizes in student and teacher, but "
                            f"the student's stages are {sizes[0]} and the teacher's {sizes[1]}; pair models with "
                            f"the same stage layout (at least two stages)")

    def teacher_pass(self, image, **batch):
        return self.teacher_forward(image, features=True)[1]["stages"]

    def student_losses(self, image, target, g_t, **batch):
        logits, feats = self.student(image, features=True)
        with torch.autocast(device_type=logits.device.type, enabled=False):
            loss = kdsvd_loss(feats["stages"], g_t, self.k, self.layout)
        return logits, {"ce": self.ce_weight * F.cross_entropy(logits, target), "kdsvd": self.feat_weight * loss}
