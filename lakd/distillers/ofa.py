"""OFA-KD (Hao, Guo, Han, Tang, Hu, Wang, Xu: "One-for-All: Bridge the Gap Between Heterogeneous Architectures in
Knowledge Distillation", NeurIPS 2023; the authors' code: Hao840/OFAKD ``distillers/ofa.py``): for CNN / ViT /
MLP pairs in any direction. Each chosen student stage gets its own small branch to the class space (a projector
ending in a linear classifier), trained on the teacher's logits, so no feature of the teacher is matched and the
architectures never meet; the student's own logits learn the same target:

    L = ce_weight * CE(z_s, y) + kd_weight * L_ofa(z_s, eps_last) + ofa_weight * sum_k L_ofa(proj_k(F_k), eps_k)

    L_ofa(z, eps) = mean_b sum_c -((p_t + 1[c = y])^eps - 1[c = y]) * log p_s      (p = softmax(z / T))

the adaptive target enhancement: with ``eps > 1`` the target class's weight ``(p_t + 1)^eps - 1`` grows beyond
``p_t`` where the teacher is confident, the others (``p_t^eps``) shrink; ``eps = 1`` is the teacher's probabilities
plus nothing (cross-entropy with the teacher's soft labels).

The projectors, as the authors build them (``ofa.branch: auto`` picks by the student's block outputs):

- ``cnn`` (a student whose blocks give B x C x H x W maps): stage k of n gets ``n - k`` depthwise-separable
  stride-2 conv blocks (``SepConv``: dw 3x3 s2, pw 1x1, BN, ReLU, dw 3x3, pw 1x1, BN, ReLU), each doubling the
  channels, the last to ``max(d_s, d_t)`` (the two networks' embedding widths); the last stage a 1x1 conv to that
  width; then global average pooling and a Linear to the classes.
- ``vit`` (a student whose blocks give token sequences: a ViT, or a Swin-style B x H x W x C map read row by row):
  the patch tokens go through ``floor(log2(grid / 7))`` patch-merging layers (2x2 neighbours concatenated,
  LayerNorm, Linear to ``d_s``; GELU but after the last of several), the class tokens are put back in front, then
  ``max(n - k, 1)`` transformer blocks (timm's ``Block``: 4 heads, MLP ratio 4, no qkv bias), then the class token
  (or, without one, the mean of the tokens) and a Linear to the classes.

Initialisation as theirs: convolutions Kaiming-normal (fan-out, ReLU), BatchNorm 1 / 0, Linear truncated normal
(std 0.02) with zero bias.

Deviations from the authors' code, each where theirs does not apply: stages are lakd's (``ofa.stages``, 1-based, of
the student's ``stage_ends``; default all; their ``--ofa-stage`` default is 1 2 3 4 of four), and the feature of a
stage is its last block's output unless ``ofa.points`` names other blocks (their ViT features for DeiT-T / ViT-S
are blocks 2, 4, 10, 12 of 12: ``ofa.points=[2,4,10,12]``); ``n`` is the student's number of stages (4 in all their
pairs); a network with two class tokens (a distilled DeiT) gives its first token to the classifier (theirs
flattens all of them, a width their Linear does not take); where no patch merging runs and the stage width is not
``d_s`` a Linear maps the tokens to ``d_s`` (theirs would fail). Their cross-entropy is label-smoothed (0.1 in their
configs): ``ofa.label_smoothing``; their mixup / CutMix recipes are not carried (a one-hot target is used for the
mask, as theirs does with the argmax of mixed labels).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import LakdError
from ..models.base import feature, token_sequence
from .base import Distiller, register_distiller

BRANCHES = ("auto", "cnn", "vit")
#: the patch grid the authors merge down to (7 x 7: a 224 px ViT/16 after one merge)
FINAL_GRID = 7


def ofa_loss(logits_s: torch.Tensor, logits_t: torch.Tensor, target_mask: torch.Tensor, eps: float,
             T: float = 1.0) -> torch.Tensor:
    """OFA's adaptive target enhancement loss: ``mean_b sum_c -((p_t + mask)^eps - mask) * log p_s`` with
    ``p = softmax(logits / T)`` and ``mask`` the one-hot label."""
    log_p_s = F.log_softmax(logits_s.float() / T, dim=1)
    p_t = F.softmax(logits_t.float() / T, dim=1)
    weight = (p_t + target_mask) ** eps - target_mask
    return (-weight * log_p_s).sum(dim=1).mean()


class SepConv(nn.Module):
    """The authors' down-sampling block: depthwise 3x3 stride 2, pointwise, BN, ReLU, depthwise 3x3, pointwise, BN,
    ReLU (``op.0`` .. ``op.7``, their layout)."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.op = nn.Sequential(
            nn.Conv2d(c_in, c_in, 3, stride=2, padding=1, groups=c_in, bias=False),
            nn.Conv2d(c_in, c_in, 1, bias=False), nn.BatchNorm2d(c_in), nn.ReLU(),
            nn.Conv2d(c_in, c_in, 3, stride=1, padding=1, groups=c_in, bias=False),
            nn.Conv2d(c_in, c_out, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())

    def forward(self, x):
        return self.op(x)


def map_projector(channels: int, downs: int, width: int, num_classes: int) -> nn.Sequential:
    """The CNN branch of one stage: ``downs`` SepConv blocks doubling the channels (the last to ``width``), or a
    1x1 conv without any, then global average pooling and the classifier."""
    layers: list[nn.Module] = []
    if downs == 0:
        layers.append(nn.Conv2d(channels, width, 1))
    for i in range(downs):
        layers.append(SepConv(channels, width if i == downs - 1 else 2 * channels))
        channels *= 2
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes))


class PatchMerging(nn.Module):
    """2 x 2 neighbouring patch tokens concatenated (Swin's order: (0,0), (1,0), (0,1), (1,1)), LayerNorm, Linear
    (no bias) to ``dim_out``, activation: B x (H*W) x C -> B x (H/2 * W/2) x dim_out."""

    def __init__(self, grid: tuple[int, int], dim: int, dim_out: int, act: bool):
        super().__init__()
        self.grid = grid
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, dim_out, bias=False)
        self.act = nn.GELU() if act else nn.Identity()

    def forward(self, x):
        (h, w), (b, n, c) = self.grid, x.shape
        if n != h * w or h % 2 or w % 2:
            raise LakdError(f"OFA's patch merging expects an even {h} x {w} grid of {h * w} tokens, got {n}; train at "
                            f"the image size the distiller was built for (data.image_size)")
        x = x.view(b, h, w, c)
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.act(self.reduction(self.norm(x.view(b, -1, 4 * c))))


class Attention(nn.Module):
    """Multi-head self-attention as timm's ``Attention`` (``qkv`` and ``proj`` Linear layers)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class TransformerBlock(nn.Module):
    """A pre-norm transformer block with timm's ``Block`` layout and defaults as OFA builds it (LayerNorm eps 1e-5,
    no qkv bias, MLP ratio 4, GELU): its state dict loads into timm's ``Block(dim, num_heads)`` and back."""

    def __init__(self, dim: int, heads: int = 4, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim, heads)
        self.norm2, self.mlp = nn.LayerNorm(dim), Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TokenProjector(nn.Module):
    """The ViT branch of one stage (module doc): patch merging of the patch tokens, the ``prefix`` class tokens
    put back in front, ``blocks`` transformer blocks, the class token (or the tokens' mean) and the classifier."""

    def __init__(self, prefix: int, grid: tuple[int, int], dim: int, dim_out: int, blocks: int, num_classes: int):
        super().__init__()
        self.prefix = prefix
        merges = max(int(math.log2(min(grid) / FINAL_GRID)), 0)
        layers: list[nn.Module] = []
        for i in range(merges):
            g = (grid[0] // 2 ** i, grid[1] // 2 ** i)
            layers.append(PatchMerging(g, dim if i == 0 else dim_out, dim_out, act=i == 0 or i != merges - 1))
        self.merge = nn.Sequential(*layers)
        # without a merge to change it, a width other than dim_out is mapped by a Linear (the authors' would fail)
        self.proj = nn.Linear(dim, dim_out) if not merges and dim != dim_out else None
        heads = 4 if dim_out % 4 == 0 else 1
        self.blocks = nn.Sequential(*[TransformerBlock(dim_out, heads) for _ in range(blocks)])
        self.fc = nn.Linear(dim_out, num_classes)

    def forward(self, x):
        cls, patches = x[:, :self.prefix], x[:, self.prefix:]
        patches = self.merge(patches)
        if self.proj is not None:
            patches, cls = self.proj(patches), self.proj(cls)
        x = self.blocks(torch.cat([cls, patches], dim=1) if self.prefix else patches)
        return self.fc(x[:, 0] if self.prefix else x.mean(1))


def init_weights(module: nn.Module) -> None:
    """The authors' initialisation of the projectors."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


@register_distiller("ofa")
class OFA(Distiller):
    """OFA-KD (Hao et al., NeurIPS 2023) trains a classifier branch on every student stage, and the student's
    logits, on the teacher's logits with adaptive target enhancement: any CNN/ViT pair, no feature matched.

    The branches are the authors' (SepConv blocks for maps, patch merging and transformer blocks for tokens)."""

    display_name = "OFA-KD"
    report_order = 61
    DEFAULTS = {"ofa": {"ce_weight": 1.0, "kd_weight": 1.0, "ofa_weight": 1.0, "eps": [1.0], "T": 1.0,
                        "stages": None, "points": None, "branch": "auto", "label_smoothing": 0.0}}
    #: each setting's kind and range, checked before anything is built (lakd.settings; plain data)
    SETTINGS = {
        "ofa.ce_weight": {"kind": "number", "ge": 0},
        "ofa.kd_weight": {"kind": "number", "ge": 0, "about": "the OFA loss on the student's logits"},
        "ofa.ofa_weight": {"kind": "number", "ge": 0, "about": "the OFA losses of the stage branches"},
        "ofa.eps": {"kind": "numbers", "gt": 0, "nonempty": True, "about":
                    "the target enhancement exponent: one, or one per stage plus one for the logits", "example": [1.5]},
        "ofa.T": {"kind": "number", "gt": 0, "about": "the temperature"},
        "ofa.stages": {"kind": "ints", "ge": 1, "nonempty": True, "increasing": True, "null": True, "about":
                       "1-based student stages with a branch; null: all", "example": [1, 2, 3, 4]},
        "ofa.points": {"kind": "ints", "ge": 1, "nonempty": True, "null": True, "about":
                       "1-based student blocks feeding the branches; null: the stages' ends", "example": [2, 4, 10, 12]},
        "ofa.branch": {"kind": "choice", "choices": list(BRANCHES), "about":
                       "the projector kind; auto: cnn for maps, vit for token sequences"},
        "ofa.label_smoothing": {"kind": "number", "ge": 0, "lt": 1, "about": "of the cross-entropy (theirs: 0.1)"},
    }
    #: checks over several settings (lakd.settings)
    CHECKS = [{"rule": "not_all_zero", "keys": ["ofa.ce_weight", "ofa.kd_weight", "ofa.ofa_weight"]}]

    def __init__(self, student, teacher, cfg, num_data=0):
        super().__init__(student, teacher, cfg, num_data)
        s = self.section("ofa")  # kinds and ranges checked by the base class (SETTINGS)
        self.ce_weight, self.kd_weight, self.ofa_weight = (float(s[k]) for k in ("ce_weight", "kd_weight",
                                                                                 "ofa_weight"))
        self.T, self.label_smoothing = float(s["T"]), float(s["label_smoothing"])
        ends = list(student.stage_ends)
        n = len(ends)
        stages = s["stages"] if s["stages"] is not None else list(range(1, n + 1))
        if stages[-1] > n:
            raise LakdError(f"ofa.stages={stages} names a stage the student does not have: it has {n} (1..{n}), "
                            f"e.g. ofa.stages={list(range(1, n + 1))}")
        points = s["points"] if s["points"] is not None else [ends[k - 1] for k in stages]
        nb = student.num_blocks
        if len(points) != len(stages) or max(points) > nb:
            raise LakdError(f"ofa.points must give one 1-based student block index (1..{nb}) per stage of "
                            f"ofa.stages ({len(stages)}), e.g. ofa.points={[ends[k - 1] for k in stages]}, "
                            f"got {points!r}")
        eps = list(s["eps"])
        if len(eps) not in (1, len(stages) + 1):
            raise LakdError(f"ofa.eps must hold one value or one per stage plus one for the logits "
                            f"({len(stages) + 1} values), e.g. ofa.eps=[1.5], got {eps!r}")
        self.eps = [float(e) for e in (eps * (len(stages) + 1) if len(eps) == 1 else eps)]
        s_info, t_info = student.feature_info(), teacher.feature_info()
        classes = t_info["num_classes"]
        if s_info["num_classes"] != classes:
            raise LakdError("OFA-KD's branches learn the teacher's classes: give the student the teacher's number of "
                            "classes (model.num_classes)")
        d_s, d_t = int(s_info["embedding_dim"]), int(t_info["embedding_dim"])
        self.stages, self.points = list(stages), list(points)
        self.branches: list[str] = []
        self.projector = nn.ModuleList()
        for k, p in zip(stages, points):
            layout, prefix = student.block_layout(p - 1)
            branch = s["branch"] if s["branch"] != "auto" else ("cnn" if layout == "maps" else "vit")
            shape = s_info["blocks"][p - 1]
            if branch == "cnn":
                proj = map_projector(shape.channels, n - k, max(d_s, d_t), classes)
            else:
                proj = TokenProjector(prefix, (shape.height, shape.width), shape.channels, d_s, max(n - k, 1),
                                      classes)
            self.branches.append(branch)
            self.projector.append(proj)
        init_weights(self.projector)

    def stage_features(self, image):
        """The student's logits and, for each projector, its input: a B x C x H x W map (``cnn``) or a B x N x C
        token sequence (``vit``; a map's positions row by row when the student gives maps)."""
        s = self.student
        want = {p: [j for j, q in enumerate(self.points) if q == p] for p in self.points}
        out: list = [None] * len(self.points)
        h = s.stem_forward(image)
        for i in range(s.num_blocks):
            h = s.block_forward(i, h)
            for j in want.get(i + 1, ()):
                if self.branches[j] == "cnn":
                    out[j] = feature(h)
                else:
                    seq = token_sequence(h)
                    out[j] = seq if seq is not None else feature(h).flatten(2).transpose(1, 2)
        return s.head_forward(h), out

    def student_losses(self, image, target, t_logits, **batch):
        logits, feats = self.stage_features(image)
        mask = F.one_hot(target, logits.shape[1]).to(torch.float32)
        branch = sum(ofa_loss(proj(f), t_logits, mask, e, self.T)
                     for proj, f, e in zip(self.projector, feats, self.eps[:-1]))
        return logits, {
            "ce": self.ce_weight * F.cross_entropy(logits, target, label_smoothing=self.label_smoothing),
            "kd": self.kd_weight * ofa_loss(logits, t_logits, mask, self.eps[-1], self.T),
            "ofa": self.ofa_weight * branch,
        }
