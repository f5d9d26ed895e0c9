"""Token networks (ViT, DeiT, EfficientFormer's last stage): where a traced B x N x C sequence is a grid of patch
tokens, and how such a network's head pools it.

A sequence of ``N`` tokens of width ``C`` is read as ``P`` leading class/distillation (or register) tokens and an
``H`` x ``W`` grid of patch tokens when the graph made it from a B x C x H x W map (a patch embedding's
convolution, a flattened stage output) with ``H * W = N - P``: the latest such map among the sequence's ancestors
gives the grid, ``P`` is what is left (``token_layout``). The head pools the final sequence in one of two ways
(``token_pool``): the mean of its tokens (``x[:, P:].mean(1)``, or ``x.mean(1)`` without leading tokens), or one
token (``x[:, 0]``: the class token).
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from .tracing import tensor_shape

#: at most this many leading tokens (class, distillation, registers) before the patch tokens
MAX_PREFIX = 16


def token_layout(node: fx.Node) -> tuple[int, int, int] | None:
    """``(P, H, W)`` when ``node`` is a 1 x N x C sequence made from an H x W map (see the module doc), else
    None. The map is the latest ancestor in graph order that is 4-D with C channels (first or last dim: NCHW or
    NHWC) and ``0 <= N - H * W <= MAX_PREFIX``."""
    shape = tensor_shape(node)
    if shape is None or len(shape) != 3:
        return None
    _, n, c = shape
    pos = {m: i for i, m in enumerate(node.graph.nodes)}
    best, seen, todo = None, set(), [node]
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        todo.extend(m.all_input_nodes)
        s = tensor_shape(m)
        if s is None or len(s) != 4 or (best is not None and pos[m] <= pos[best[0]]):
            continue
        for h, w, ch in ((s[2], s[3], s[1]), (s[1], s[2], s[3])):
            if ch == c and 0 <= n - h * w <= MAX_PREFIX and h * w > 0:
                best = (m, (n - h * w, int(h), int(w)))
                break
    return best[1] if best else None


def _is_full(s) -> bool:
    return isinstance(s, slice) and s.start is None and s.stop is None and s.step is None


def token_pool(n: fx.Node) -> tuple[str, fx.Node, int] | None:
    """How ``n`` pools a B x N x C sequence: ``("mean", seq, start)`` for a mean over the token dimension of
    ``seq[:, start:]`` (``start`` 0: of every token), ``("select", seq, i)`` for the single token ``seq[:, i]``;
    None when ``n`` is neither."""
    if not n.args or not isinstance(n.args[0], fx.Node):
        return None
    src = n.args[0]
    shape, out = tensor_shape(src), tensor_shape(n)
    if shape is None or out is None or len(shape) != 3:
        return None
    is_mean = (n.op == "call_method" and n.target == "mean") or (n.op == "call_function" and n.target is torch.mean)
    if is_mean:
        dims = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim")
        dims = (dims,) if isinstance(dims, int) else tuple(dims) if isinstance(dims, (tuple, list)) else None
        if dims is None or {d % 3 for d in dims} != {1} or len(out) != 2:
            return None
        if src.op == "call_function" and src.target is operator.getitem and isinstance(src.args[0], fx.Node):
            inner, idx = src.args[0], src.args[1]
            full = tensor_shape(inner)
            if full is not None and len(full) == 3 and isinstance(idx, tuple) and len(idx) == 2 \
                    and _is_full(idx[0]) and isinstance(idx[1], slice) and idx[1].stop is None \
                    and idx[1].step is None and isinstance(idx[1].start, int):
                return "mean", inner, idx[1].start
        return "mean", src, 0
    if n.op == "call_function" and n.target is operator.getitem and len(n.args) == 2:
        idx = n.args[1]
        if isinstance(idx, tuple) and len(idx) == 2 and _is_full(idx[0]) and isinstance(idx[1], int) \
                and len(out) == 2:
            return "select", src, idx[1] % shape[1]
    return None
