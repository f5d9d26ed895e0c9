"""What the adapter reads off a traced graph's nodes: global pooling (and its NCHW / NHWC layout), ReLUs (for
pre-activations), ops that only reshape, and the B x C x H x W shape of a cut.

The head is everything after the last cut. Its global pooling (adaptive/average pooling to 1x1 or a mean over
H x W) gives the last feature map (its input); the classifier is the last ``nn.Linear`` after it (or the module
named by ``classifier=``; timm models: the module ``get_classifier()`` returns). Class activation maps apply the
classifier to the map at every position -- through the layers between pooling and the classifier when there are
any (e.g. MobileNetV3's hidden ``Linear``) -- which is the usual CAM (bias excluded) when the classifier follows
the pooling directly.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ...errors import LakdError
from ..base import FeatureShape
from .tracing import tensor_shape

_POOL_MODULES = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.AvgPool2d, nn.MaxPool2d)
_POOL_2D_FUNCTIONS = (F.adaptive_avg_pool2d, F.adaptive_max_pool2d, F.avg_pool2d, F.max_pool2d)
_REDUCE_FUNCTIONS = (torch.mean, torch.amax)  # reductions over named dims, as the methods below
_POOL_FUNCTIONS = _POOL_2D_FUNCTIONS + _REDUCE_FUNCTIONS
_POOL_METHODS = ("mean", "amax")
_RELU = (F.relu, torch.relu, torch.relu_)
#: ops that only reshape or drop out: a classifier behind only these sees the pooled map itself
_TRIVIAL_MODULES = (nn.Flatten, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d)
_TRIVIAL_FUNCTIONS = (torch.flatten, F.dropout, torch.squeeze, torch.reshape)
_TRIVIAL_METHODS = ("flatten", "view", "reshape", "squeeze", "contiguous")


def fshape(node: fx.Node, label: str, nhwc: bool = False) -> FeatureShape:
    shape = tensor_shape(node)
    if shape is None or len(shape) != 4:
        raise LakdError(f"{label}: the cut {node.name!r} gives {'a non-tensor' if shape is None else shape}, not a "
                        f"B x C x H x W map; cut where the features are 4-D maps (see `lakd models --blocks`)")
    if nhwc:  # B x H x W x C (Swin-style): the distillers see it permuted to B x C x H x W
        return FeatureShape(int(shape[3]), int(shape[1]), int(shape[2]))
    return FeatureShape(int(shape[1]), int(shape[2]), int(shape[3]))


def is_relu(gm: fx.GraphModule, n: fx.Node) -> bool:
    if n.op == "call_module":
        return isinstance(gm.get_submodule(n.target), nn.ReLU)
    if n.op == "call_function":
        return n.target in _RELU
    return n.op == "call_method" and n.target in ("relu", "relu_")


def is_trivial(gm: fx.GraphModule, n: fx.Node) -> bool:
    if n.op == "call_module":
        return isinstance(gm.get_submodule(n.target), _TRIVIAL_MODULES)
    if n.op == "call_function":
        return n.target in _TRIVIAL_FUNCTIONS
    return n.op == "call_method" and n.target in _TRIVIAL_METHODS


def _reduced_dims(n: fx.Node) -> set[int] | None:
    """The dimensions (0..3) a ``mean``/``amax`` over a 4-D input reduces, when the call names them."""
    dims = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim", n.kwargs.get("axis"))
    if isinstance(dims, int):
        dims = (dims,)
    if not isinstance(dims, (tuple, list)) or not all(isinstance(d, int) for d in dims):
        return None
    return {d % 4 for d in dims}


def pool_layout(gm: fx.GraphModule, n: fx.Node) -> str | None:
    """``"nchw"`` or ``"nhwc"`` when ``n`` is global pooling -- a pooling / mean op whose input is a 4-D map and
    whose output is one value per channel -- else None. A mean (or amax) over dims (1, 2) pools a B x H x W x C
    map, as timm's Swin heads do; pooling modules and functions, and a mean over (2, 3), pool B x C x H x W."""
    if n.op == "call_module":
        kind = isinstance(gm.get_submodule(n.target), _POOL_MODULES)
    elif n.op == "call_function":
        kind = n.target in _POOL_FUNCTIONS
    else:
        kind = n.op == "call_method" and n.target in _POOL_METHODS
    if not kind or not n.args or not isinstance(n.args[0], fx.Node):
        return None
    inp, out = tensor_shape(n.args[0]), tensor_shape(n)
    if inp is None or out is None or len(inp) != 4:
        return None
    reduction = n.op == "call_method" or (n.op == "call_function" and n.target in _REDUCE_FUNCTIONS)
    dims = _reduced_dims(n) if reduction else None
    if dims == {1, 2}:
        ok = (len(out) == 4 and out[3] == inp[3] and out[1] == out[2] == 1) or (len(out) == 2 and out[1] == inp[3])
        return "nhwc" if ok else None
    if dims is not None and dims != {2, 3}:
        return None
    ok = (len(out) == 4 and out[1] == inp[1] and out[2] == out[3] == 1) or (len(out) == 2 and out[1] == inp[1])
    return "nchw" if ok else None


def is_global_pool(gm: fx.GraphModule, n: fx.Node) -> bool:
    return pool_layout(gm, n) is not None



# ----- in-place ops (pieces clone the inputs such ops would rewrite) ------------------------------------------------
_INPLACE_OPERATORS = (operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv,
                      operator.ipow, operator.iand, operator.ior, operator.ixor, operator.setitem)
#: ops whose result may share its input's storage: an in-place op on the result rewrites the input too
_VIEW_METHODS = ("view", "view_as", "reshape", "reshape_as", "permute", "transpose", "t", "flatten", "unflatten",
                 "squeeze", "unsqueeze", "expand", "expand_as", "narrow", "select", "contiguous", "detach", "to",
                 "type_as", "float", "chunk", "split", "unbind", "as_strided", "movedim", "__getitem__")
_VIEW_FUNCTIONS = (torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze, torch.permute, torch.transpose,
                   torch.narrow, torch.chunk, torch.split, torch.unbind, torch.movedim, torch.detach, operator.getitem)
_VIEW_MODULES = (nn.Identity, nn.Flatten, nn.Unflatten, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)


def mutated(gm: fx.GraphModule, n: fx.Node) -> fx.Node | None:
    """The node whose tensor ``n`` rewrites in place (``nn.ReLU(inplace=True)``, ``x.add_(y)``, ``x += y``,
    ``F.relu(x, inplace=True)``, ``torch.relu_(x)``, ``x[i] = v``), or None."""
    first = n.args[0] if n.args and isinstance(n.args[0], fx.Node) else None
    if first is None:
        return None
    if n.op == "call_module":
        return first if getattr(gm.get_submodule(n.target), "inplace", False) is True else None
    if n.op == "call_function":
        name = getattr(n.target, "__name__", "")
        hit = (n.kwargs.get("inplace") is True or n.target in _INPLACE_OPERATORS
               or (name.endswith("_") and not name.startswith("_")))
        return first if hit else None
    if n.op == "call_method":
        t = n.target
        hit = (t.endswith("_") and not t.startswith("_")) or t in ("__setitem__", "__iadd__", "__imul__", "__isub__")
        return first if hit else None
    return None


def aliases(gm: fx.GraphModule, n: fx.Node) -> fx.Node | None:
    """The input whose storage ``n``'s result may share (a view, an in-place op's result), or None."""
    first = n.args[0] if n.args and isinstance(n.args[0], fx.Node) else None
    if first is None:
        return None
    if mutated(gm, n) is not None:
        return first
    if n.op == "call_module":
        return first if isinstance(gm.get_submodule(n.target), _VIEW_MODULES) else None
    if n.op == "call_function":
        return first if n.target in _VIEW_FUNCTIONS else None
    return first if n.op == "call_method" and n.target in _VIEW_METHODS else None


def timm_classifier(model: nn.Module) -> str | None:
    """The module path of a timm model's classifier (``get_classifier()``), when it is an ``nn.Linear`` that the
    traced graph calls; None otherwise (the last ``nn.Linear`` after global pooling is taken then)."""
    get = getattr(model, "get_classifier", None)
    if not callable(get) or not hasattr(model, "default_cfg"):
        return None
    try:
        c = get()
    except Exception:  # a model whose get_classifier needs more than this: fall back to the graph's last Linear
        return None
    if not isinstance(c, nn.Linear):
        return None
    return next((path for path, m in model.named_modules() if m is c and path), None)
