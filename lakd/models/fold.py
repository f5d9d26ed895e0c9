"""Folding a frozen network's eval-mode BatchNorm layers into the convolutions before them.

A teacher runs in eval mode with frozen weights, so each ``BatchNorm`` right after a convolution is a fixed
per-channel affine map that the convolution can absorb: ``bn(conv(x)) == conv'(x)`` with
``W' = W * g / sqrt(v + eps)`` and ``b' = (b - m) * g / sqrt(v + eps) + beta``. The arithmetic is PyTorch's
(``torch.nn.utils.fusion.fuse_conv_bn_eval``); the folded BatchNorm becomes an ``nn.Identity``, so every feature
a distiller takes (a block output, a pre-activation, a BatchNorm's output) keeps its value up to float rounding.

Which pairs are safe is found on the network as it runs, not from its source: one forward in the richest mode the
distillers use (``features``, ``preact``, ``blocks``) with forward hooks on every convolution and BatchNorm and
the autograd graph of everything it returns. A pair folds only when the BatchNorm's input *is* the convolution's
output tensor, that tensor has no other consumer and is not itself returned, and each module runs once. Why not
``torch.fx``'s ``fuse``: it needs the whole network traceable in one graph, which the zoo's ``FeatureNet`` forward
(feature flags, Python control flow in VGG/ShuffleNetV2) is not, and it returns a new ``GraphModule`` where the
distillers need the original ``FeatureNet`` with its block interface.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from ..errors import LakdError
from .base import FeatureNet

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BNS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)
    elif hasattr(obj, "values") and isinstance(obj.values, tuple):  # a Carry
        yield from _tensors(obj.values)


def _consumers(outputs) -> dict:
    """How many times each autograd node is used: as an input of another node, or as a returned value."""
    count: dict = {}
    todo = []
    for t in outputs:
        if t.grad_fn is not None:
            count[t.grad_fn] = count.get(t.grad_fn, 0) + 1
            todo.append(t.grad_fn)
    seen = set()
    while todo:
        fn = todo.pop()
        if fn in seen:
            continue
        seen.add(fn)
        for nxt, _ in fn.next_functions:
            if nxt is not None:
                count[nxt] = count.get(nxt, 0) + 1
                todo.append(nxt)
    return count


def foldable_pairs(model: FeatureNet, example: torch.Tensor) -> list[tuple[nn.Module, nn.Module]]:
    """The (convolution, BatchNorm) pairs of ``model`` that fold exactly (see the module doc)."""
    calls: dict = {}
    conv_out: dict = {}
    bn_in: dict = {}

    def conv_hook(m, args, out):
        calls[m] = calls.get(m, 0) + 1
        conv_out[m] = (out, out.grad_fn)

    def bn_hook(m, args):
        calls[m] = calls.get(m, 0) + 1
        bn_in[m] = (args[0], args[0].grad_fn) if args and isinstance(args[0], torch.Tensor) else (None, None)

    handles = []
    for m in model.modules():
        if isinstance(m, _CONVS):
            handles.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, _BNS):
            handles.append(m.register_forward_pre_hook(bn_hook))
    was = model.training
    model.eval()
    try:
        x = example.detach().clone().requires_grad_(True)  # a graph even though the weights are frozen
        with torch.enable_grad():
            try:
                out = model(x, features=True, preact=True, blocks=True)
            except LakdError:  # no pre-activation outputs: the richest mode it has
                out = model(x, features=True, blocks=True)
        uses = _consumers(list(_tensors(out)))
    finally:
        for h in handles:
            h.remove()
        model.train(was)
    owner: dict = {}
    for m in model.modules():
        for p in m.parameters(recurse=False):
            owner[id(p)] = owner.get(id(p), 0) + 1
    pairs = []
    by_output = {id(t): c for c, (t, _) in conv_out.items()}
    for bn, (t, fn) in bn_in.items():
        conv = by_output.get(id(t)) if t is not None else None
        if conv is None or conv_out[conv][0] is not t or calls.get(conv) != 1 or calls.get(bn) != 1:
            continue
        # the tensor unchanged since the convolution (an in-place op in between changes its autograd node), used
        # by this BatchNorm alone and not returned as a feature
        if fn is None or fn is not conv_out[conv][1] or uses.get(fn, 0) != 1:
            continue
        if bn.running_mean is None or bn.running_var is None or bn.num_features != conv.out_channels:
            continue
        if any(owner.get(id(p), 0) != 1 for p in [*conv.parameters(), *bn.parameters()]):  # shared weights
            continue
        pairs.append((conv, bn))
    return pairs


@torch.no_grad()
def fold_batchnorm(model: FeatureNet, example: torch.Tensor) -> int:
    """Fold every safe eval-mode (convolution, BatchNorm) pair of a frozen ``model`` in place; the number folded.

    For a frozen teacher only: the folded model computes the same function in eval mode, but its BatchNorm
    layers are gone (``nn.Identity``), so it must not be trained or switched to training mode for its
    statistics. Parameters keep ``requires_grad=False``.
    """
    if any(p.requires_grad for p in model.parameters()):
        raise LakdError("fold_batchnorm folds a frozen network only (a teacher): its parameters require grad")
    pairs = foldable_pairs(model, example)
    mapping: dict[nn.Module, nn.Module] = {}
    for conv, bn in pairs:
        fused = fuse_conv_bn_eval(conv.eval(), bn.eval())
        for p in fused.parameters():
            p.requires_grad_(False)
        mapping[conv], mapping[bn] = fused, nn.Identity()
    if mapping:
        model.replace_modules(mapping)
    return len(pairs)
