"""What the adapter reads off a traced graph's nodes: global pooling (and its NCHW / NHWC layout), ReLUs (for
pre-activations), ops that only reshape, the B x C x H x W shape of a cut, what the logits depend on
(``live_nodes``), two averaged heads (``head_pair``), and class maps through any head (``FrozenHeadRun``).

The head is everything after the last cut. Its global pooling (adaptive/average pooling to 1x1 or a mean over
H x W; for token networks see ``tokens``) gives the last feature map (its input); the classifier is the last
``nn.Linear`` after it (or the module named by ``classifier=``; timm models: the module ``get_classifier()``
returns). Class activation maps apply the head after the pooling to the map at every position, its nonlinearities
frozen at the pooled vector, minus its output at zero: for a classifier right after the pooling that is the usual
CAM (its weights as a 1x1 convolution, bias excluded), and for any head the maps' mean plus that offset is the
logits.
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


# ----- the nodes that matter: what the logits depend on ------------------------------------------------------------
def live_nodes(gm: fx.GraphModule) -> set[fx.Node]:
    """The nodes the output depends on (its ancestors), and the in-place ops that rewrite one of them (with their
    own ancestors). What a network computes and then drops -- an auxiliary head whose output a wrapper discards
    (``return self.net(x)[0]``), a shape assertion -- is left out: it is not cut, not pooled, not a classifier,
    and the adapter's pieces do not run it."""
    out = next(n for n in gm.graph.nodes if n.op == "output")
    live: set[fx.Node] = set()

    def add(start):
        todo = [start]
        while todo:
            n = todo.pop()
            if n in live:
                continue
            live.add(n)
            todo.extend(n.all_input_nodes)

    add(out)
    changed = True
    while changed:
        changed = False
        for n in gm.graph.nodes:
            if n not in live and (m := mutated(gm, n)) is not None and m in live:
                add(n)
                changed = True
    return live


def head_pair(gm: fx.GraphModule, logits: fx.Node) -> list[fx.Node] | None:
    """The two classifier calls when the logits are their mean (``(head(x) + head_dist(x_dist)) / 2``: DeiT's
    distillation token, EfficientFormer(V2), LeViT): in the order of the sum (the class head first, as timm
    writes it), None otherwise."""
    n = logits
    if n.op != "call_function" or len(n.args) != 2:
        return None
    a, k = n.args
    if not ((n.target in (operator.truediv, torch.div, torch.true_divide) and k == 2)
            or (n.target in (operator.mul, torch.mul) and k == 0.5)):
        return None
    if not isinstance(a, fx.Node) or a.op != "call_function" or a.target not in (operator.add, torch.add) \
            or len(a.args) != 2:
        return None
    heads = list(a.args)
    if not all(isinstance(h, fx.Node) and h.op == "call_module" and isinstance(gm.get_submodule(h.target), nn.Linear)
               for h in heads):
        return None
    return heads  # in the order of the sum: timm's (head(x) + head_dist(x_dist)) / 2 puts the class head first


# ----- class maps through any head: its nonlinearities frozen at the pooled vector ---------------------------------
#: elementwise activations a head may hold after pooling (MobileNetV3's Hardswish, MaxViT's tanh pre-logits)
_ACT_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh,
                nn.ELU, nn.Mish, nn.Softplus, nn.PReLU)
_ACT_FUNCTIONS = (F.relu, F.relu6, F.leaky_relu, F.gelu, F.silu, F.hardswish, F.hardsigmoid, F.sigmoid, F.tanh,
                  F.elu, F.mish, F.softplus, torch.relu, torch.sigmoid, torch.tanh, F.hardtanh)
_ACT_METHODS = ("relu", "sigmoid", "tanh")
_AFFINE_FUNCTIONS = (operator.add, operator.sub, operator.mul, operator.truediv, operator.neg, torch.add, torch.sub,
                     torch.mul, torch.div, F.layer_norm, F.linear, F.batch_norm, operator.getitem, torch.cat)
_AFFINE_METHODS = ("add", "sub", "mul", "div", "permute", "transpose", "unsqueeze", "mean", "__getitem__")
_NORM_MODULES = (nn.LayerNorm, nn.modules.batchnorm._BatchNorm, nn.RMSNorm)


def unfreezable(gm: fx.GraphModule, nodes) -> fx.Node | None:
    """The first node of ``nodes`` that ``FrozenHeadRun`` cannot make affine (not a Linear layer or a 1x1
    convolution, a normalisation, an elementwise activation, a reshape or +-*/), or None."""
    for n in nodes:
        if n.op in ("get_attr", "placeholder", "output") or is_trivial(gm, n):
            continue
        if n.op == "call_module" and isinstance(gm.get_submodule(n.target),
                                                (nn.Linear, *_NORM_MODULES, *_ACT_MODULES, *_TRIVIAL_MODULES)):
            continue
        if n.op == "call_module" and _is_pointwise_conv(gm.get_submodule(n.target)):
            continue  # a 1x1 convolution on the pooled 1 x 1 map is a Linear over its channels (timm's conv_head)
        if n.op == "call_function" and (n.target in _AFFINE_FUNCTIONS or n.target in _ACT_FUNCTIONS
                                        or n.target in _TRIVIAL_FUNCTIONS or n.target in _VIEW_FUNCTIONS):
            continue
        if n.op == "call_method" and (n.target in _AFFINE_METHODS or n.target in _ACT_METHODS
                                      or n.target in _TRIVIAL_METHODS or n.target in _VIEW_METHODS):
            continue
        return n
    return None


def _is_pointwise_conv(m: nn.Module) -> bool:
    return isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and m.stride == (1, 1) and m.groups == 1 \
        and m.padding in ((0, 0), "valid") and m.dilation == (1, 1)


class FrozenHeadRun(fx.Interpreter):
    """Runs a head (the graph from the pooled vector to the logits) with every nonlinearity frozen at its state on a
    reference input: the first run (``frozen=None``) records, on the pooled vectors (B rows), each normalisation's
    statistics and each elementwise activation's gain (its output over its input); a run given that ``frozen``
    state applies it, each sample's to its ``repeat`` consecutive rows (its H x W positions). Frozen so, a head
    of Linear layers, normalisations, activations and reshapes is affine per sample and equals the real head at the
    pooled vector; so the positions' outputs minus the frozen head's output at zero, averaged over the positions,
    plus that offset, are the logits exactly. LayerNorm (module or ``F.layer_norm``), RMSNorm and training-mode
    BatchNorm keep the pooled vector's statistics (BatchNorm in eval mode is affine already); dropout is skipped.
    For a head that is affine already (a Linear classifier, two heads averaged) nothing is frozen."""

    def __init__(self, gm: fx.GraphModule, frozen: list | None = None, repeat: int = 1):
        super().__init__(gm)
        self.recording = frozen is None
        self.frozen = [] if frozen is None else list(frozen)
        self.k, self.repeat = 0, repeat

    def _take(self):
        state = self.frozen[self.k]
        self.k += 1
        if self.repeat > 1:
            state = tuple(None if t is None or t.shape[0] == 1 else t.repeat_interleave(self.repeat, 0)
                          for t in state)
        return state

    def _norm(self, x, dims, weight, bias, eps, rms=False, channel_dim=None):
        if self.recording:
            mu = None if rms else x.mean(dims, keepdim=True)
            var = x.pow(2).mean(dims, keepdim=True) if rms else x.var(dims, unbiased=False, keepdim=True)
            self.frozen.append((mu, var))
        else:
            mu, var = self._take()
        y = (x if mu is None else x - mu) * torch.rsqrt(var + eps)
        if channel_dim is not None:
            shape = [1] * x.dim()
            shape[channel_dim] = -1
            weight = None if weight is None else weight.view(shape)
            bias = None if bias is None else bias.view(shape)
        if weight is not None:
            y = y * weight
        if bias is not None:
            y = y + bias
        return y

    def _act(self, fn, x):
        if self.recording:
            safe = torch.where(x.abs() < 1e-6, torch.full_like(x, 1e-6), x)
            gain = fn(safe.clone()) / safe  # a copy: an in-place activation would rewrite safe
            self.frozen.append((gain,))
            return fn(x)
        (gain,) = self._take()
        return gain * x

    def call_function(self, target, args, kwargs):
        if target is F.layer_norm:
            x, shape = args[0], args[1]
            rest = list(args[2:]) + [None] * 3
            w = kwargs.get("weight", rest[0])
            b = kwargs.get("bias", rest[1])
            eps = kwargs.get("eps", rest[2] if rest[2] is not None else 1e-5)
            return self._norm(x, tuple(range(x.dim() - len(shape), x.dim())), w, b, eps)
        if target in (F.dropout, F.dropout1d, F.dropout2d):
            return args[0]
        if target in _ACT_FUNCTIONS:
            return self._act(lambda t: target(t, *args[1:], **{k: v for k, v in kwargs.items() if k != "inplace"}),
                             args[0])
        return super().call_function(target, args, kwargs)

    def call_method(self, target, args, kwargs):
        if target in _ACT_METHODS:
            return self._act(lambda t: getattr(t, target)(*args[1:], **kwargs), args[0])
        return super().call_method(target, args, kwargs)

    def call_module(self, target, args, kwargs):
        m = self.fetch_attr(target)
        x = args[0] if args else None
        if isinstance(m, nn.LayerNorm):
            dims = tuple(range(x.dim() - len(m.normalized_shape), x.dim()))
            return self._norm(x, dims, m.weight, m.bias, m.eps)
        if isinstance(m, nn.RMSNorm):
            dims = tuple(range(x.dim() - len(m.normalized_shape), x.dim()))
            eps = m.eps if m.eps is not None else torch.finfo(x.dtype).eps
            return self._norm(x, dims, m.weight, None, eps, rms=True)
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training:
            dims = tuple(d for d in range(x.dim()) if d != 1)
            return self._norm(x, dims, m.weight, m.bias, m.eps, channel_dim=1)
        if isinstance(m, (nn.Dropout, nn.Dropout1d, nn.Dropout2d)):
            return x
        if isinstance(m, _ACT_MODULES):
            return self._act(m.forward, x)
        return super().call_module(target, args, kwargs)
