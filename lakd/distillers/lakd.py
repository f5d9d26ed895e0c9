"""LAKD: Local Attention Knowledge Distillation (Separation-Decoupling Mechanism + NDAM + class attention).

The student's ordered blocks are cut at ``sdm.splits`` (1-based block indices, the last one = the last block)
into gradient-independent local modules. Module k = blocks (s_{k-1}, s_k]; module 1 also holds the stem, the
last module also holds pooling and the classifier. Module k+1 receives the *detached* output of module k.
Each module's output goes through its own connector ``phi_k`` (identity when shapes match, else 1x1 conv + BN
and a spatial resize) and is aligned to teacher alignment point k by

    L_k = mean( W_k * (phi_k(F_S^k) - F_T^k)^2 ),      W_k = NDAM map (all ones when NDAM is off)

    NDAM: A(F) = a * mean_c(|F|) + b * max_c(|F|),  normalised per sample to mean 1 over H x W

F is the teacher's feature at that point (``ndam.source: teacher``, default), the teacher block's
pre-activation there (``teacher_preact``: signed, so that ``ndam.abs`` matters on ReLU networks) or the
student's connector output, detached (``student``).

The last module adds cross-entropy and CAT-KD's class-attention loss:

    L_K = ce_weight * CE + att_weight * L_att + feat_weight * L_feat

With ``sdm.backward: local`` (default) each module's loss is backpropagated right after that module's forward
and its graph freed, so peak activation memory is the largest module's. ``joint`` does one backward over the
summed losses (same gradients). ``sdm.detach: false`` lets gradients cross modules (the paper's "no detach"
row; always a joint backward). ``sdm.recompute: true`` runs the student's stem and every block under activation
checkpointing (one extra forward of each, a lower peak; the same step, BatchNorm statistics included). See
docs/method.md for the reading of the paper behind each choice.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import LakdError
from ..models.base import FeatureShape, detach_state, feature
from .base import Distiller, StepGroup, register_distiller
from .losses import class_attention_loss, model_class_maps, ndam_map


class _WeightedMSE(torch.autograd.Function):
    """``mean(w * (s - t)^2)`` in float32, with ``t`` and ``w`` constants.

    Written by hand for memory: autograd's composition saves ``s - t`` (a full feature map) for the square's
    backward and runs three full-size backward ops (expand, mul, pow) at the start of each local module's
    backward, which is when the module's activations are all alive, i.e. at LAKD's peak. This saves only
    ``s``, ``t`` and ``w``, which the step holds anyway, and forms the gradient ``2 w (s - t) / n`` in one
    buffer. Same value and gradient up to float rounding (tested against the composition). (Saving the
    finished gradient instead, to skip that buffer, measured no lower for the local backward and higher for
    the joint one, which then keeps one such map per module.)
    """

    @staticmethod
    def forward(ctx, s, t, w):
        sq = s.float() - t.float()
        sq.square_()
        if w is not None:
            sq.mul_(w.float())
        ctx.save_for_backward(s, t, w)
        return sq.mean()

    @staticmethod
    def backward(ctx, g):
        s, t, w = ctx.saved_tensors
        grad = s.float() - t.float()
        grad.mul_(g * (2.0 / grad.numel()))
        if w is not None:
            grad.mul_(w.float())
        return grad.to(s.dtype), None, None


def weighted_mse(s: torch.Tensor, t: torch.Tensor, w: torch.Tensor | None = None) -> torch.Tensor:
    """``mean(w * (s - t)^2)`` (``w`` broadcast over channels; plain MSE without it); the gradient reaches
    ``s`` only."""
    return _WeightedMSE.apply(s, t.detach(), None if w is None else w.detach())


class Connector(nn.Module):
    """phi_k: 1x1 conv + BN when channels differ, then a resize to the teacher's spatial size.

    ``size`` records the teacher's size at the model's default input size; ``forward(x, size)`` resizes to the
    size given at run time (the teacher feature's), so training at another image size (e.g. ImageNet models at
    ``data.image_size=64``) aligns the maps that actually meet. Larger maps are average-pooled, smaller ones
    bilinearly upsampled.
    """

    def __init__(self, s: FeatureShape, t: FeatureShape):
        super().__init__()
        self.proj = None
        if s.channels != t.channels:
            self.proj = nn.Sequential(nn.Conv2d(s.channels, t.channels, 1, bias=False), nn.BatchNorm2d(t.channels))
        self.size = None if (s.height, s.width) == (t.height, t.width) else (t.height, t.width)

    def forward(self, x, size=None):
        if self.proj is not None:
            x = self.proj(x)
        size = tuple(size) if size is not None else self.size
        if size is not None and tuple(x.shape[-2:]) != size:
            if x.shape[-2] >= size[0] and x.shape[-1] >= size[1]:
                x = F.adaptive_avg_pool2d(x, size)
            else:
                x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        return x


def match_by_resolution(splits, s_info, t_ends, t_info):
    """Teacher stage ends for student splits whose stage counts differ: for each split the last teacher stage
    with the same map size; None unless every split finds one and they increase."""
    out = []
    for s in splits:
        b = s_info["blocks"][s - 1]
        same = [e for e in t_ends if (t_info["blocks"][e - 1].height, t_info["blocks"][e - 1].width)
                == (b.height, b.width)]
        if not same or (out and same[-1] <= out[-1]):
            return None
        out.append(same[-1])
    return out


#: how the hints below say what a stage is (lakd.models: FeatureNet.stage_ends)
STAGE_RULE = "a stage ends where the next block's feature map is smaller, and at the last block"


def _size(info, block: int) -> tuple[int, int]:
    b = info["blocks"][block - 1]
    return b.height, b.width


def _sizes(info, blocks) -> str:
    return ", ".join("{}x{}".format(*_size(info, b)) for b in blocks)


def suggest_points(student, teacher, s_info, t_info, splits=None) -> tuple[list[int], list[int]]:
    """A working ``(sdm.splits, sdm.teacher_points)`` for the hints: with ``splits`` (the user's), teacher block
    indices for them (the last teacher block of each split's map size, else evenly spaced), when the teacher has
    blocks enough; else one local module per teacher stage (as many as both have): the teacher's last stage ends,
    each paired with the student's last stage end of the same map size where there is one (else the student's
    last stage ends), the last one the student's last block."""
    nt = teacher.num_blocks
    if splits and len(splits) <= nt:
        pts: list[int] = []
        for s in splits:
            same = [b for b in range(1, nt + 1) if _size(t_info, b) == _size(s_info, s) and (not pts or b > pts[-1])]
            if not same:
                break
            pts.append(same[-1])
        if len(pts) == len(splits):
            return list(splits), pts
        k = len(splits)
        return list(splits), [max(1, round((i + 1) * nt / k)) for i in range(k)]
    s_ends, t_ends, n = list(student.stage_ends), list(teacher.stage_ends), student.num_blocks
    k = min(len(s_ends), len(t_ends))
    points = t_ends[-k:]
    chosen: list[int] = []
    for p in points[:-1]:
        same = [e for e in s_ends if e < n and _size(s_info, e) == _size(t_info, p) and (not chosen or e > chosen[-1])]
        if not same:
            return s_ends[-k:], points
        chosen.append(same[-1])
    return chosen + [n], points


def _name(model, cfg_name) -> str:
    return getattr(model, "label", None) or cfg_name or type(model).__name__


def _stem_note(model, role: str) -> str:
    """How the adapter cut a network it was given when that is a surprise: its first top-level module taken as the
    stem (the rule for the first of three or more), so the blocks start at the second. "" otherwise."""
    cuts = getattr(model, "cut_names", None) or {}
    stem, blocks = cuts.get("stem"), list(cuts.get("blocks") or [])
    root = getattr(model, "_root", None)
    top = [c for c, _ in root.named_children()] if root is not None else []
    if not stem or not blocks or not top or stem != top[0]:
        return ""
    return (f"; lakd.adapt took the {role}'s first top-level module {stem!r} as its stem (as it does with the first "
            f"of three or more), so its blocks are {', '.join(map(repr, blocks))}")


def _layout(model, role: str, cfg_name) -> str:
    """'the teacher SmallCNN has 3 blocks, stages ending at blocks [1, 2, 3]' (and the stem note) for the hints."""
    return (f"the {role} {_name(model, cfg_name)} has {model.num_blocks} blocks, stages ending at blocks "
            f"{list(model.stage_ends)}{_stem_note(model, role)}")


def _example(splits, points) -> str:
    return (f"sdm.splits={list(splits)} sdm.teacher_points={list(points)} (Python: options={{\"sdm\": "
            f"{{\"splits\": {list(splits)}, \"teacher_points\": {list(points)}}}}})")


def _stem_as_block(teacher, t_info, wanted: int) -> str:
    """The other fix when the adapter made the teacher's first module its stem and that costs one stage: cut the
    teacher so the stem is block 1 (only when that gives exactly ``wanted`` stages)."""
    cuts = getattr(teacher, "cut_names", None) or {}
    stem, blocks = cuts.get("stem"), list(cuts.get("blocks") or [])
    if not stem or not blocks or len(teacher.stage_ends) + 1 != wanted:
        return ""
    st = t_info["stem"]
    if (st.height, st.width) == _size(t_info, 1):
        return ""  # the stem's map is block 1's size: as a block it would not end a stage of its own
    cut = [stem] + blocks
    return (f"; or make its stem a block: teacher.blocks={cut} (Python: teacher_options={{\"blocks\": {cut}}}), "
            f"{len(cut)} blocks and {wanted} stages")


#: where NDAM's map comes from (``ndam.source``)
NDAM_SOURCES = ("teacher", "teacher_preact", "student")


@register_distiller("lakd")
class LAKD(Distiller):
    display_name = "LAKD"
    report_order = 10_000  # the proposed method: the last row
    bench_default = True
    #: the same gradients with one backward over the summed losses (the memory comparison of Table 4)
    variants = {"lakd_joint": ["sdm.backward=joint"], "lakd_recompute": ["sdm.recompute=true"]}
    DEFAULTS = {
        "sdm": {
            "splits": None,  # 1-based student block indices ending each local module; None: the stage ends
            "teacher_points": None,  # 1-based teacher block indices to align with; None: the teacher's stages
            "detach": True,  # cut the gradient between modules (False: the paper's "no detach" row)
            "backward": "local",  # local: backward per module right after its forward | joint: one backward
            # recompute the student's stem and blocks in the backward (torch.utils.checkpoint, one per piece):
            # lower peak memory (only block boundaries stay alive) for one extra forward of each. Off on every
            # model family: measured per family (results/performance/recompute_by_family.json), it costs 10-34%
            # of the CPU step's speed on each family but ShuffleV2, whose two rounds did not settle it
            "recompute": False,
        },
        "ndam": {
            "enabled": True,
            # whose feature the attention map is computed from: teacher (its block output at the alignment
            # point; after a ReLU, so >= 0 and abs changes nothing) | teacher_preact (that block's output before
            # its last activation: signed) | student (the connector output, detached)
            "source": "teacher",
            "abs": True,  # |F| (non-directional) or F
            "avg": 1.0,  # a: weight of the channel-average map
            "max": 2.0,  # b: weight of the channel-max map
        },
        "lakd": {
            "ce_weight": 1.0,
            "att_weight": 1.0,  # class-attention (CAT-KD) loss weight; configs set CAT-KD's per-pair beta
            "feat_weight": 1.0,  # weight of every module's feature loss (scalar) ...
            "feat_weights": None,  # ... or one weight per module (list), overriding feat_weight
            "resolution": 2,  # R: CAMs pooled to R x R
            "normalize": False,  # L2-normalise the pooled CAMs over space
        },
    }
    #: each setting's kind and range, checked before anything is built (lakd.settings; plain data)
    SETTINGS = {
        "sdm.splits": {"kind": "ints", "ge": 1, "nonempty": True, "increasing": True, "null": True, "about":
            "1-based student block indices ending each local module; null: the stage ends", "example": [1, 4, 9]},
        "sdm.teacher_points": {"kind": "ints", "ge": 1, "nonempty": True, "null": True, "about":
            "1-based teacher block indices to align with; null: the teacher's stage ends", "example": [3, 6, 9]},
        "sdm.detach": {"kind": "bool"},
        "sdm.backward": {"kind": "choice", "choices": ["local", "joint"]},
        "sdm.recompute": {"kind": "bool"},
        "ndam.enabled": {"kind": "bool"},
        "ndam.source": {"kind": "choice", "choices": list(NDAM_SOURCES)},
        "ndam.abs": {"kind": "bool"},
        "ndam.avg": {"kind": "number", "ge": 0, "about": "the channel-average map's weight"},
        "ndam.max": {"kind": "number", "ge": 0, "about": "the channel-max map's weight"},
        "lakd.ce_weight": {"kind": "number", "ge": 0},
        "lakd.att_weight": {"kind": "number", "ge": 0},
        "lakd.feat_weight": {"kind": "number", "ge": 0},
        "lakd.feat_weights": {"kind": "numbers", "ge": 0, "nonempty": True, "null": True, "about":
            "one weight per local module"},
        "lakd.resolution": {"kind": "int", "ge": 1, "about": "class activation maps pooled to R x R"},
        "lakd.normalize": {"kind": "bool"},
    }
    #: checks over several settings, or a setting and the run (lakd.settings)
    CHECKS = [
        {"rule": "not_all_zero",
         "keys": ["lakd.ce_weight", "lakd.att_weight", ["lakd.feat_weights", "lakd.feat_weight"]]},
    ]

    @classmethod
    def analysis_points(cls, cfg: dict) -> str:
        """The ends of the local modules (``sdm.splits`` of the run config); the stages when not set."""
        splits = (cfg.get("sdm") or {}).get("splits")
        return ",".join(str(int(s)) for s in splits) if splits else "stages"

    @staticmethod
    def _pairing_hint(student, teacher, s_info, t_info, splits, chosen: bool, cfg) -> str:
        """The error when the local modules (``sdm.splits``) and the teacher's stages do not pair up: what the
        values are and where they come from (the default or the user's), the rule, and values that work for
        these two models."""
        t_ends = list(teacher.stage_ends)
        s_name, t_name = _name(student, cfg["model"].get("name")), _name(teacher, cfg["teacher"].get("name"))
        teacher_has = (f"the teacher {t_name} has {len(t_ends)} stages (ending at blocks {t_ends} of its "
                       f"{teacher.num_blocks}; maps {_sizes(t_info, t_ends)})")
        if chosen:
            why = f"sdm.splits={splits} makes {len(splits)} local modules, but {teacher_has}"
        else:
            why = (f"sdm.splits is not set (default: one local module per student stage), so the student {s_name}'s "
                   f"{len(splits)} stages make {len(splits)} modules (sdm.splits={splits}; maps "
                   f"{_sizes(s_info, splits)}), but {teacher_has}, and the map sizes do not pair up")
        eg_s, eg_p = suggest_points(student, teacher, s_info, t_info, splits if chosen else None)
        fix = ("name the teacher block for each module, e.g. " if chosen and eg_s == splits else
               "as many local modules as the teacher has stages, each with its teacher block, e.g. ")
        return (f"LAKD pairs each local module of the student with a teacher block (sdm.teacher_points; default: the "
                f"teacher's stage ends; {STAGE_RULE}): {why}{_stem_note(student, 'student')}"
                f"{_stem_note(teacher, 'teacher')}; fix: {fix}{_example(eg_s, eg_p)}"
                f"{_stem_as_block(teacher, t_info, len(splits))}")

    def requirements(self):
        req = super().requirements()
        att = self.section("lakd")["att_weight"]
        if att != 0:  # the class-attention loss needs class maps of both networks (a ViT's class token has none)
            for role in req:
                req[role] += (("class_maps", "lakd.att_weight", att),)
        nd = self.section("ndam")
        if nd["source"] == "teacher_preact" and nd["enabled"]:
            req["teacher"] += (("preact", "ndam.source", "teacher_preact"),)
        return req

    def __init__(self, student, teacher, cfg, num_data=0):
        super().__init__(student, teacher, cfg, num_data)
        sdm, nd, lk = self.section("sdm"), self.section("ndam"), self.section("lakd")
        n = student.num_blocks
        splits = list(sdm["splits"] or student.stage_ends)
        if not splits or splits != sorted(set(splits)) or splits[0] < 1 or splits[-1] != n:
            raise LakdError(f"sdm.splits={splits} does not fit {cfg['model']['name']} ({n} blocks): give increasing "
                            f"1-based block indices ending with {n}, e.g. sdm.splits={student.stage_ends} (its "
                            f"stage ends: {STAGE_RULE})")
        self.splits = splits
        s_info, t_info = student.feature_info(), teacher.feature_info()
        points = sdm["teacher_points"]
        if points is None:
            points = list(teacher.stage_ends)
            if len(splits) != len(points):
                # default splits (the student's stages) against a teacher with more or fewer stages: pair the
                # stages of equal map size; splits the user chose need teacher_points chosen as well
                points = None if sdm["splits"] else match_by_resolution(splits, s_info, points, t_info)
            if points is None:
                raise LakdError(self._pairing_hint(student, teacher, s_info, t_info, splits, bool(sdm["splits"]),
                                                   cfg))
        points = list(points)
        if len(points) != len(splits) or any(not 1 <= p <= teacher.num_blocks for p in points):
            eg_s, eg_p = suggest_points(student, teacher, s_info, t_info, splits)
            raise LakdError(f"sdm.teacher_points={points} must hold {len(splits)} teacher block indices "
                            f"in 1..{teacher.num_blocks}, one per local module of sdm.splits={splits}"
                            + ("" if sdm["splits"] else " (not set: the student's stage ends)")
                            + f"; {_layout(teacher, 'teacher', cfg['teacher'].get('name'))}; e.g. "
                            f"{_example(eg_s, eg_p)}")
        self.teacher_points = points
        self.connectors = nn.ModuleList(
            Connector(s_info["blocks"][s - 1], t_info["blocks"][p - 1]) for s, p in zip(splits, points)
        )
        self.detach = bool(sdm["detach"])
        self.local_backward = sdm["backward"] == "local" and self.detach
        self.recompute = sdm["recompute"]
        self.teacher_preact = nd["source"] == "teacher_preact" and bool(nd["enabled"])
        self.ndam = nd
        fw = lk["feat_weights"]
        if fw is None:
            fw = [float(lk["feat_weight"])] * len(splits)
        if len(fw) != len(splits):
            raise LakdError(f"lakd.feat_weights has {len(fw)} values for {len(splits)} local modules")
        self.feat_weights = [float(w) for w in fw]
        self.ce_weight, self.att_weight = float(lk["ce_weight"]), float(lk["att_weight"])
        self.resolution, self.normalize = int(lk["resolution"]), bool(lk["normalize"])

    # ------------------------------------------------------------------------------------------------
    def attention(self, s_feat: torch.Tensor, t_feat: torch.Tensor,
                  t_pre: torch.Tensor | None = None) -> torch.Tensor | None:
        """NDAM weights for one alignment point from ``ndam.source``'s feature (``t_pre``: the teacher block's
        pre-activation, given when the source is ``teacher_preact``)."""
        if not self.ndam["enabled"]:
            return None
        source = self.ndam["source"]
        src = t_feat if source == "teacher" else t_pre if source == "teacher_preact" else s_feat.detach()
        return ndam_map(src, float(self.ndam["avg"]), float(self.ndam["max"]), bool(self.ndam["abs"]))

    def feature_loss(self, k: int, out: torch.Tensor, t_feat: torch.Tensor,
                     t_pre: torch.Tensor | None = None) -> torch.Tensor:
        s = self.connectors[k](out, t_feat.shape[-2:])
        return weighted_mse(s, t_feat, self.attention(s, t_feat, t_pre))

    @torch.no_grad()
    def teacher_targets(self, image):
        """The teacher's targets at the alignment points (``(feature, pre-activation or None)`` each) and its
        CAMs, in one no-grad pass."""
        walk = self.teacher_walk(image)
        feats = [next(walk) for _ in self.teacher_points]
        return feats, next(walk)

    def teacher_walk(self, image):
        """The teacher's pass in pieces, under no_grad: yields ``(feature, pre-activation)`` at alignment point
        1, 2, ... (the pre-activation only for ``ndam.source: teacher_preact``, else None; each computed only
        when asked for, the teacher's running state kept in between), then its CAMs. Points need not increase:
        a target passed on the way to a later one is kept until its module asks for it."""
        t = self.teacher
        points = set(self.teacher_points)
        with torch.no_grad():
            h, done = t.stem_forward(image), 0
        kept: dict[int, tuple] = {}
        target: tuple = (None, None)  # (feature, pre-activation) of the last block run
        pre = None
        for k, p in enumerate(self.teacher_points):
            later = set(self.teacher_points[k + 1:])
            with torch.no_grad():
                while done < p:
                    if self.teacher_preact and done + 1 in points:
                        h, pre = t.block_forward(done, h, preact=True)
                    else:
                        h, pre = t.block_forward(done, h), None
                    done += 1
                    target = (feature(h), pre)
                    if done in later and done != p:
                        kept[done] = target
            yield kept.pop(p) if p < done else target  # target: the block output of ``done`` (== p)
        with torch.no_grad():
            while done < t.num_blocks:
                h = t.block_forward(done, h)
                done += 1
            cam = None
            if self.att_weight:
                _, fmap, _ = t.head_forward(h, return_map=True)
                cam = model_class_maps(t, fmap)
                del fmap
        del h, target, pre  # the suspended generator would keep the last point's maps alive
        yield cam  # outside no_grad: a generator suspended inside it would leave grad mode off for the caller

    def module_forward(self, k: int, h: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        start = 0 if k == 0 else self.splits[k - 1]
        if k == 0:
            h = self.student.recompute_stem(image) if self.recompute else self.student.stem_forward(image)
        # sdm.recompute: the stem and every block under activation checkpointing (FeatureNet.recompute_stem /
        # recompute_block): during module k's backward only the block boundaries and one block's (or the stem's)
        # internals are alive, for one extra forward of each
        return self.student.run_blocks(h, start, self.splits[k], recompute=self.recompute)

    def last_losses(self, out, target, t_cam):
        if not self.att_weight:  # lakd.att_weight=0: no class maps needed (a class-token ViT has none)
            logits = self.student.head_forward(out)
            return logits, {"ce": self.ce_weight * F.cross_entropy(logits, target)}
        logits, fmap, _ = self.student.head_forward(out, return_map=True)
        cam = model_class_maps(self.student, fmap)
        losses = {
            "ce": self.ce_weight * F.cross_entropy(logits, target),
            "att": self.att_weight * class_attention_loss(cam, t_cam, self.resolution, self.normalize),
        }
        return logits, losses

    def module_losses(self, image, target, t_feats, t_cam):
        """Run the local modules in order and return the losses for one joint backward (the local backward is
        ``train_step``)."""
        losses: dict[str, torch.Tensor] = {}
        h, logits = None, None
        last = len(self.splits) - 1
        for k in range(len(self.splits)):
            out = self.module_forward(k, h, image)
            losses[f"feat{k + 1}"] = self.feat_weights[k] * self.feature_loss(k, feature(out), *t_feats[k])
            if k == last:
                logits, extra = self.last_losses(out, target, t_cam)
                losses.update(extra)
            h = detach_state(out) if self.detach else out
        return logits, losses

    def teacher_pass(self, image, **batch):
        return self.teacher_targets(image)

    def student_losses(self, image, target, teacher_out, **batch):
        t_feats, t_cam = teacher_out
        return self.module_losses(image, target, t_feats, t_cam)

    def local_pass(self, k: int, h, image, t_feat, t_pre, target, t_cam):
        """Local module ``k``'s forward and losses (the forward of its backward pass, ``call_group(k, ...)``):
        ``(module output, {loss_name: loss}, logits or None)``."""
        out = self.module_forward(k, h, image)
        mod = {f"feat{k + 1}": self.feat_weights[k] * self.feature_loss(k, feature(out), t_feat, t_pre)}
        logits = None
        if k == len(self.splits) - 1:
            logits, extra = self.last_losses(out, target, t_cam)
            mod.update(extra)
        return out, mod, logits

    def train_step(self, batch, backward):
        """Local backward, interleaved with the teacher: the teacher runs up to alignment point k, then student
        module k, its loss and its backward; module k's graph and the teacher's feature k are released before
        the teacher continues to point k+1. The peak is the largest module's activations plus one teacher
        feature map, instead of every module's teacher target held from the start. The teacher still runs
        before the student part that uses it, and the numbers are those of ``module_losses``."""
        if not self.local_backward:
            return super().train_step(batch, backward)
        image, target = batch["image"], batch["target"]
        walk = self.teacher_walk(image)
        losses: dict[str, torch.Tensor] = {}
        h, logits = None, None
        last = len(self.splits) - 1
        for k in range(len(self.splits)):
            t_feat, t_pre = next(walk)
            t_cam = next(walk) if k == last else None
            out, mod, lg = self.call_group(k, self.local_pass, k, h, image, t_feat, t_pre, target, t_cam)
            logits = lg if lg is not None else logits
            backward(sum(mod.values()))
            losses.update({n: v.detach() for n, v in mod.items()})
            h = detach_state(out)
            del out, mod, t_feat, t_pre, t_cam
        return logits.detach(), losses

    def trainable_groups(self):
        """With the local backward, one group per local module (its blocks, its connector, the stem for the
        first and the head for the last), each the forward of one ``local_pass``; otherwise the default single
        group. Which parameters a module trains is found by autograd: one pass of each module on a
        zero image (eval mode, so no BatchNorm statistic moves), ``torch.autograd.grad`` of its outputs with
        respect to every trainable parameter. Written so because a model names its blocks' modules but not its
        stem's and head's apart (``FeatureNet.stem_modules`` may be the whole network). A parameter no module
        uses (none in the zoo) belongs to no group: it never gets a gradient, so it needs no reduction."""
        if not self.local_backward:
            return super().trainable_groups()
        params = self.trainable_parameters()
        p0 = next(self.student.parameters())
        size = self.student.input_size
        image = torch.zeros(1, 3, size, size, dtype=p0.dtype, device=p0.device)
        was = self.training
        self.eval()
        groups, taken, h = [], set(), None
        try:
            with torch.enable_grad():
                for k in range(len(self.splits)):
                    out = self.module_forward(k, h, image)
                    f = feature(out)
                    outs = [self.connectors[k](f)]
                    if k == len(self.splits) - 1 and self.att_weight:
                        logits, fmap, _ = self.student.head_forward(out, return_map=True)
                        outs += [logits, model_class_maps(self.student, fmap)]
                    elif k == len(self.splits) - 1:
                        outs.append(self.student.head_forward(out))
                    total = sum(o.float().sum() for o in outs)
                    grads = torch.autograd.grad(total, params, allow_unused=True)
                    mine = [p for p, g in zip(params, grads) if g is not None and id(p) not in taken]
                    taken.update(id(p) for p in mine)
                    groups.append(StepGroup(self.local_pass, mine))
                    h = detach_state(out)
        finally:
            self.train(was)
        return groups
