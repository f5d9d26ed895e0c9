"""The feature interface every model of the zoo implements.

A model is cut into an ordered list of *blocks* (the units between which SDM may cut), preceded by a
*stem* and followed by a *head*:

    x --stem--> h0 --block 1--> h1 --block 2--> ... --block n--> hn --pre_pool--> last map --pool/fc--> logits

Subclasses implement a few small methods (``stem_forward``, ``num_blocks``, ``block_forward``,
``block_modules``, ``pre_pool``) and declare ``stage_ends`` (1-based indices
of the blocks that end a stage) and ``classifier`` (the final ``nn.Linear``). The state-dict layout stays the
one of the original code base (mdistiller / RepDistiller / torchvision), so published checkpoints load.

Distillers and the trainer only use the generic methods defined here: ``forward(x, features=True)``,
``run_blocks``, ``head_forward``, ``feature_info``, ``class_maps``. They never look at a model's internals.

What passes from one block to the next (the *state*) is the block's output tensor for the zoo. A model adapted
from an arbitrary network (``lakd.models.adapter``) passes a ``Carry`` instead: the cut's tensor plus every
other value a later block still needs (a skip connection spanning the cut). Code outside the model takes the
block output with ``feature(state)`` and cuts the gradient with ``detach_state(state)``; both are the identity /
``.detach()`` on a plain tensor.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from ..errors import LakdError


class Carry:
    """The state between two blocks of an adapted network: every value that crosses the cut, in a fixed order,
    which of them is the block's output (``feature``), and how that output is laid out: a B x H x W x C map
    (``nhwc``, Swin-style networks), handed out permuted to B x C x H x W; or a token sequence B x N x C
    (``tokens``: ``(P, h, w)``, ViT-style networks: ``P`` class/distillation tokens first, then the patch tokens
    of an ``h`` x ``w`` grid), whose patch tokens are handed out as a B x C x H x W grid (``token_grid``) and its
    first ``P`` tokens as ``prefix``."""

    __slots__ = ("values", "main", "nhwc", "tokens")

    def __init__(self, values: tuple, main: int, nhwc: bool = False, tokens: tuple | None = None):
        self.values, self.main, self.nhwc, self.tokens = tuple(values), main, nhwc, tokens

    @property
    def feature(self) -> torch.Tensor:
        v = self.values[self.main]
        if self.tokens is not None:
            return token_grid(v, self.tokens)
        return v.permute(0, 3, 1, 2) if self.nhwc else v

    @property
    def prefix(self) -> torch.Tensor | None:
        """The class/distillation tokens (B x P x C) of a token sequence; None for maps or without such tokens."""
        if self.tokens is None or self.tokens[0] == 0:
            return None
        return self.values[self.main][:, :self.tokens[0]]


def token_grid(tokens: torch.Tensor, layout: tuple) -> torch.Tensor:
    """The patch tokens of a B x N x C sequence as a B x C x H x W grid. ``layout`` is ``(P, h, w)``: ``P`` leading
    class/distillation tokens, dropped, and the grid the network had at the size it was traced at; at another image
    size (N changed) the grid keeps that aspect ratio."""
    p, h, w = layout
    b, n, c = tokens.shape
    n -= p
    if n != h * w:
        hh = max(1, round(math.sqrt(n * h / w)))
        if n % hh:
            raise LakdError(f"{n} patch tokens do not fill a grid of aspect {h}:{w}; train at the image size the "
                            f"network was built for (data.image_size)")
        h, w = hh, n // hh
    return tokens[:, p:].transpose(1, 2).reshape(b, c, h, w)


def token_sequence(state) -> torch.Tensor | None:
    """A state's block output as a B x N x C token sequence, as a transformer holds it: a ViT's tokens (class and
    distillation tokens first), a Swin-style B x H x W x C map's positions row by row; None for a B x C x H x W
    map."""
    if not isinstance(state, Carry):
        return None
    v = state.values[state.main]
    if state.tokens is not None:
        return v
    return v.flatten(1, 2) if state.nhwc else None


def prefix_tokens(state) -> torch.Tensor | None:
    """The class/distillation tokens of a state (B x P x C), or None (maps, or a sequence without such tokens)."""
    return state.prefix if isinstance(state, Carry) else None


def feature(state) -> torch.Tensor:
    """The block output held by a state (the state itself for the zoo's plain tensors)."""
    return state.feature if isinstance(state, Carry) else state


def detach_state(state):
    """The state with every carried value detached from the graph (LAKD's cut between local modules)."""
    if isinstance(state, Carry):
        return Carry(tuple(v.detach() if isinstance(v, torch.Tensor) else v for v in state.values), state.main,
                     state.nhwc, state.tokens)
    return state.detach()


@contextlib.contextmanager
def _buffers_kept(modules):
    """Every buffer of ``modules`` (and their submodules) as it was on entry, restored in place on exit (also
    when the block raises, e.g. checkpoint's early stop of a recomputation): a recomputed forward in training
    mode must not update BatchNorm running statistics (or ``num_batches_tracked``) a second time."""
    kept, seen = [], set()
    for top in modules:
        for m in top.modules():
            for name, b in m._buffers.items():
                if b is not None and (id(m), name) not in seen:
                    seen.add((id(m), name))
                    kept.append((m, name, b, b.detach().clone()))
    try:
        yield
    finally:
        with torch.no_grad():
            for m, name, b, saved in kept:
                m._buffers[name] = b  # a module that rebinds its buffer gets the original tensor back
                b.copy_(saved)


def _checkpointed(fn, modules, *inputs):
    """``fn(*inputs)`` under ``torch.utils.checkpoint`` (non-reentrant), the buffers of ``modules`` kept as they
    were across the recomputation (``_buffers_kept``). A ``Carry`` result is passed out of the checkpoint as its
    fields and rebuilt."""
    carry = {}

    def context():
        return contextlib.nullcontext(), _buffers_kept(modules)

    def run(*args):
        out = fn(*args)
        carry["is"] = isinstance(out, Carry)
        return (out.values, out.main, out.nhwc, out.tokens) if carry["is"] else out

    out = torch.utils.checkpoint.checkpoint(run, *inputs, use_reentrant=False, context_fn=context)
    return Carry(*out) if carry["is"] else out


def replace_children(root: nn.Module, mapping: dict) -> None:
    """Point every child slot under ``root`` that holds a key of ``mapping`` (by identity) at its value."""
    for m in list(root.modules()):
        for name, child in list(m.named_children()):
            if any(child is k for k in mapping):
                setattr(m, name, next(v for k, v in mapping.items() if k is child))


@dataclass(frozen=True)
class FeatureShape:
    channels: int
    height: int
    width: int


class FeatureNet(nn.Module):
    """Base class of all models: logits from ``forward(x)``, features on request."""

    #: 1-based indices of the blocks that end each stage (e.g. [3, 6, 9] for resnet20).
    stage_ends: list[int]
    #: default input size (square) used to infer feature shapes.
    input_size: int = 32
    #: whether stage outputs have a pre-activation (the tensor before their last ReLU), for methods that distil
    #: it (OFD). A model whose stages end without an activation (MobileNetV2's linear bottlenecks) has none.
    has_preact: bool = True
    #: is training this family faster in channels_last on a CPU? (``train.channels_last: auto``; each family
    #: sets it from ``benchmarks/bench_layout.py``'s measurement, see docs/performance.md)
    CHANNELS_LAST_CPU: bool = False
    #: the device types ("cpu", "cuda") on which a training step of this family was measured faster with bf16
    #: autocast (``train.amp: auto``; unmeasured families get fp32; docs/performance.md has the figures)
    BF16_FASTER: frozenset[str] = frozenset()

    #: the ordered block modules (a plain list: the modules stay registered under their original names, so
    #: the state-dict layout is the original code base's). The defaults below use it.
    _blocks: list[nn.Module]

    # ----- what a model implements -------------------------------------------------------------
    def stem_forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @property
    def num_blocks(self) -> int:
        return len(self._blocks)

    def block_forward(self, i: int, h: torch.Tensor, preact: bool = False):
        """Run block ``i`` (0-based). Returns the output, or ``(output, pre-activation)`` if ``preact``.

        Default: the block module itself takes ``preact`` (as the zoo's residual blocks do)."""
        return self._blocks[i](h, preact=preact)

    def block_modules(self, i: int) -> list[nn.Module]:
        return [self._blocks[i]]

    def pre_pool(self, h: torch.Tensor) -> torch.Tensor:
        """The last feature map (input of global pooling) from the last block's output."""
        return h

    @property
    def classifier(self) -> nn.Linear:
        raise NotImplementedError

    def class_maps(self, fmap: torch.Tensor) -> torch.Tensor:
        """Class activation maps (B x K x H x W) of the last feature map: the classifier's weights applied as a
        1x1 convolution (bias excluded)."""
        return torch.einsum("bchw,kc->bkhw", fmap, self.classifier.weight)

    def block_layout(self, i: int) -> tuple[str, int]:
        """How block ``i`` (0-based) holds its output: ``("maps", 0)`` (B x C x H x W), ``("tokens", P)`` (a ViT's
        B x N x C sequence with ``P`` class/distillation tokens first) or ``("nhwc", 0)`` (a Swin-style
        B x H x W x C map). The zoo's blocks give maps."""
        return "maps", 0

    def replace_modules(self, mapping: dict) -> None:
        """Replace each submodule that is a key of ``mapping`` (by identity) with its value, wherever it is held
        (``lakd.models.fold`` swaps a frozen teacher's convolutions and BatchNorms this way)."""
        replace_children(self, mapping)

    def missing(self, need: str) -> str | None:
        """Why this model cannot provide ``need`` (``"features"``: feature maps B x C x H x W; ``"class_maps"``,
        ``"preact"``; ``"heads"``: a class head and a distillation head) and how to do without, or None when it
        can. Methods declare what they need (``Distiller.requirements``). Every model of the zoo has the first three
        (but MobileNetV2 pre-activations) and one head; an adapted network may lack some (a class-token ViT has no
        class maps, a network without a pooled map or token grid gives only logits) and refuses them with one
        line."""
        if need == "preact" and not self.has_preact:
            return no_preact_message(self)
        if need == "heads":
            return (f"{type(self).__name__} has one classifier head (a distilled network has two, a class head and "
                    f"a distillation head, whose mean is its output: e.g. timm:deit_tiny_distilled_patch16_224)")
        return None

    # ----- generic machinery ---------------------------------------------------------------------
    def run_blocks(self, h: torch.Tensor, start: int, end: int, recompute: bool = False) -> torch.Tensor:
        """Run blocks ``start`` .. ``end - 1`` (0-based, half-open). With ``recompute`` (and grad enabled) each
        block runs under activation checkpointing (``recompute_block``)."""
        for i in range(start, end):
            h = self.recompute_block(i, h) if recompute and torch.is_grad_enabled() else self.block_forward(i, h)
        return h

    def recompute_block(self, i: int, h):
        """Block ``i`` under ``torch.utils.checkpoint`` (non-reentrant): only the block's input is kept for
        backward, and its forward runs a second time in the backward to rebuild its internals.

        Saves: the block's internal activations (everything but its input and output) no longer stay alive
        between the forward and the backward, so a run of such blocks holds only the block-boundary tensors,
        plus one block's internals while that block is backpropagated. Costs: one extra forward of the block.
        The recomputation does not touch the block's buffers (those of ``block_modules(i)``, which must hold
        every module the block runs): they are saved before and restored after it (``_buffers_kept``), so BatchNorm running statistics and ``num_batches_tracked`` are updated once, as
        without recomputation. The RNG state of the forward is replayed (dropout draws the same masks). A
        ``Carry`` state (adapted networks) is passed as its values and rebuilt."""
        mods = self.block_modules(i)
        if isinstance(h, Carry):
            main, nhwc, tokens = h.main, h.nhwc, h.tokens
            return _checkpointed(lambda *values: self.block_forward(i, Carry(values, main, nhwc, tokens)), mods,
                                 *h.values)
        if not isinstance(h, torch.Tensor):
            raise LakdError(f"{type(self).__name__} passes a {type(h).__name__} between blocks, which activation "
                            f"recomputation cannot checkpoint; set sdm.recompute=false")
        return _checkpointed(lambda x: self.block_forward(i, x), mods, h)

    def stem_modules(self) -> list[nn.Module]:
        """Every module the stem runs (``recompute_stem`` keeps their buffers). Default: the whole network,
        whose buffers outside the stem the recomputation leaves alone anyway (restoring them is a no-op)."""
        return [self]

    def recompute_stem(self, x: torch.Tensor):
        """The stem under ``torch.utils.checkpoint``, as ``recompute_block`` does for a block: the stem of an
        ImageNet network (a stride-2 convolution at full resolution, BatchNorm, activation, pooling) holds the
        largest maps of the network, and they would otherwise stay alive through module 1's whole backward."""
        if not torch.is_grad_enabled():
            return self.stem_forward(x)
        return _checkpointed(self.stem_forward, self.stem_modules(), x)

    def pool(self, fmap: torch.Tensor) -> torch.Tensor:
        return torch.flatten(F.adaptive_avg_pool2d(fmap, 1), 1)

    def head_forward(self, h: torch.Tensor, return_map: bool = False):
        """From the last block's output to logits (and the last map and pooled embedding on request)."""
        fmap = self.pre_pool(h)
        emb = self.pool(fmap)
        logits = self.classifier(emb)
        if return_map:
            return logits, fmap, emb
        return logits

    def head_features(self, h) -> tuple[torch.Tensor, dict]:
        """``(logits, {"last": map, "embedding": pooled vector, ...})`` from the last block's output: what
        ``forward(features=True)`` adds to its features after the blocks. A network with two classifier heads
        whose mean is its output (DeiT's distillation token) adds ``"heads"``: each head's logits (class head
        first)."""
        logits, fmap, emb = self.head_forward(h, return_map=True)
        return logits, {"last": fmap, "embedding": emb}

    def forward(self, x: torch.Tensor, features: bool = False, preact: bool = False, blocks: bool = False):
        """Logits, or ``(logits, feats)`` when ``features`` is true.

        ``feats`` holds: ``stem`` (stem output), ``stages`` (post-activation output of each stage),
        ``stages_preact`` (pre-activation stage outputs, if ``preact``), ``blocks`` (every block output, if
        ``blocks``), ``last`` (the map fed to global pooling, for class activation maps),
        ``embedding`` (the pooled vector fed to the classifier) and ``prefix`` (for each stage, the class and
        distillation tokens, B x P x C, of a token network such as a ViT -- whose ``stages`` are its patch tokens
        as B x C x H x W grids -- else None); ``heads`` for a network with two classifier heads
        (``head_features``).
        """
        if preact and (why := self.missing("preact")):
            raise LakdError(why)
        h = self.stem_forward(x)
        if not features:
            h = self.run_blocks(h, 0, self.num_blocks)
            return self.head_forward(h)
        feats: dict = {"stem": feature(h), "stages": [], "blocks": [], "prefix": []}
        if preact:
            feats["stages_preact"] = []
        ends = set(self.stage_ends)
        for i in range(self.num_blocks):
            is_end = (i + 1) in ends
            if preact and is_end:
                h, pre = self.block_forward(i, h, preact=True)
                feats["stages_preact"].append(pre)
            else:
                h = self.block_forward(i, h)
            if blocks:
                feats["blocks"].append(feature(h))
            if is_end:
                feats["stages"].append(feature(h))
                feats["prefix"].append(prefix_tokens(h))
        logits, more = self.head_features(h)
        feats.update(more)
        return logits, feats

    # ----- shapes ----------------------------------------------------------------------------------
    @torch.no_grad()
    def feature_info(self, input_size: int | None = None) -> dict:
        """Channels and spatial size of the stem, every block, every stage and the last map.

        Computed once by a forward pass on a zero image (in eval mode, on the model's device), then cached.
        """
        size = input_size or self.input_size
        cache = self.__dict__.setdefault("_feature_info_cache", {})
        if size in cache:
            return cache[size]
        p = next(self.parameters())
        was_training = self.training
        self.eval()
        try:
            x = torch.zeros(1, 3, size, size, device=p.device, dtype=p.dtype)
            h = self.stem_forward(x)
            stem = _shape(feature(h))
            blocks = []
            for i in range(self.num_blocks):
                h = self.block_forward(i, h)
                blocks.append(_shape(feature(h)))
            logits, fmap, emb = self.head_forward(h, return_map=True)
        finally:
            self.train(was_training)
        info = {
            "stem": stem,
            "blocks": blocks,
            "stages": [blocks[e - 1] for e in self.stage_ends],
            "last": _shape(fmap),
            "embedding_dim": emb.shape[1],
            "num_classes": int(logits.shape[1]),
        }
        cache[size] = info
        return info


def no_preact_message(model: FeatureNet) -> str:
    return (f"{type(model).__name__} has no pre-activation stage outputs (its stages end without an activation); "
            f"use a method that does not distil pre-activations, or another model")


def _shape(t: torch.Tensor) -> FeatureShape:
    if t.dim() != 4:
        raise LakdError(f"a block output has shape {tuple(t.shape)}, not B x C x H x W; cut the network where its "
                        f"features are 4-D maps (list the candidates with `lakd models --blocks NAME`)")
    return FeatureShape(int(t.shape[1]), int(t.shape[2]), int(t.shape[3]))
