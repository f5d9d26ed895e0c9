"""Any ``nn.Module`` behind the feature interface (``FeatureNet``), so every method -- LAKD's local backward
included -- runs on torchvision, timm and user-defined networks unchanged.

The network is traced with ``torch.fx`` by torchvision's feature-extraction tracer (``NodePathTracer``: its node
names -- ``layer1.0``, ``features.3``, ``stages.2.blocks.1`` -- name the cut points, and its leaf-module handling
keeps torchvision.ops and timm's untraceable layers whole). A cut named by a module path is the last node inside
that module, as in ``torchvision.models.feature_extraction.create_feature_extractor``. The graph is then split,
in its own node order, into a stem, one piece per block and a head: each piece is an ``fx.GraphModule`` that calls
the network's own modules, so the parameters are shared, the network's ``state_dict`` names stay valid (the
adapter registers the network's top-level children as its own) and a checkpoint of the plain network loads.

Every value that crosses a cut is carried to the next piece (``Carry``), so a skip connection spanning a cut
works, and LAKD's ``detach_state`` detaches all of them. The pieces are built here rather than with
``torch.fx.passes.split_module`` because the distillers run them one at a time, with the block output named and
the carried values detached between LAKD modules, which ``split_module``'s parent graph would hide.

The head is everything after the last cut. Its global pooling (adaptive/average pooling to 1x1 or a mean over
H x W) gives the last feature map (its input); the classifier is the last ``nn.Linear`` after it (or the module
named by ``classifier=``). Class activation maps apply the classifier to the map at every position -- through the
layers between pooling and the classifier when there are any (e.g. MobileNetV3's hidden ``Linear``) -- which is
the usual CAM (bias excluded) when the classifier follows the pooling directly.
"""
from __future__ import annotations

import contextlib
import inspect
import io
import math
import os
import sys
import traceback

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torchvision.models.feature_extraction import NodePathTracer

from ..errors import LakdError, close_matches
from .base import Carry, FeatureNet, FeatureShape, feature

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


class _Tracer(NodePathTracer):
    """torchvision's tracer, plus leaves named by class name or module path, and a record of the module being
    traced when tracing fails (for the error message)."""

    def __init__(self, leaf_names=(), **kw):
        super().__init__(**kw)
        self.leaf_names = set(leaf_names)
        self.stack: list[str] = []

    def is_leaf_module(self, m, qualname):
        if qualname in self.leaf_names or type(m).__name__ in self.leaf_names:
            return True
        if isinstance(m, nn.Linear):  # subclasses too (timm's Linear), so the classifier stays one module call
            return True
        return super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        self.stack.append(self.path_of_module(m))
        out = super().call_module(m, forward, args, kwargs)
        self.stack.pop()  # left in place when tracing raises: the top names the module that failed
        return out


def _tracer_kwargs(leaf_modules) -> tuple[dict, set]:
    """torchvision's defaults (torchvision.ops as leaves, math autowrapped), timm's registered untraceable
    modules and functions when timm is loaded, and the user's leaves (types, class names or module paths)."""
    types = [m for m in leaf_modules if isinstance(m, type)]
    names = {m for m in leaf_modules if isinstance(m, str)}
    kw: dict = {"leaf_modules": types, "autowrap_functions": []}
    if "timm" in sys.modules:
        try:
            from timm.layers import get_notrace_functions, get_notrace_modules

            kw["leaf_modules"] += list(get_notrace_modules())
            kw["autowrap_functions"] += list(get_notrace_functions())
        except ImportError:  # an old timm: its defaults are missed, the user's leaves still apply
            pass
    try:
        from torchvision.models.feature_extraction import _set_default_tracer_kwargs

        kw = _set_default_tracer_kwargs(kw)
    except ImportError:  # the private helper moved: the same defaults by hand
        kw["autowrap_modules"] = (math, torchvision.ops)
    return kw, names


def _where(tb) -> str:
    """The innermost frame of the traceback that is not torch's own: the line of the model that failed."""
    torch_dir = os.path.dirname(torch.__file__)
    frames = [f for f in traceback.extract_tb(tb) if not f.filename.startswith(torch_dir)
              and not f.filename.startswith(os.path.dirname(__file__))]
    if not frames:
        return ""
    f = frames[-1]
    return f" at {os.path.basename(f.filename)}:{f.lineno} `{(f.line or '').strip()}`"


def trace(model: nn.Module, leaf_modules=(), name: str | None = None) -> tuple[fx.GraphModule, dict]:
    """Trace ``model`` in its current mode. Returns the ``GraphModule`` and ``{node: qualified name}``."""
    kw, names = _tracer_kwargs(leaf_modules)
    tracer = _Tracer(leaf_names=names, **kw)
    label = name or type(model).__name__
    sig = inspect.signature(model.forward)
    params = list(sig.parameters.values())[1:]
    concrete = {p.name: p.default for p in params if p.default is not inspect.Parameter.empty
                and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    try:
        graph = tracer.trace(model, concrete_args=concrete or None)
    except Exception as e:  # fx raises TraceError, TypeError, RuntimeError... for what it cannot follow
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        inside = tracer.stack[-1] if tracer.stack else ""
        mod = model.get_submodule(inside) if inside else model
        where = f"module {inside!r} ({type(mod).__name__})" if inside else f"the top-level forward of {label}"
        raise LakdError(f"cannot trace {label} with torch.fx: {first}{_where(e.__traceback__)} in {where}; make "
                        f"that module a leaf (model.leaf_modules=[{type(mod).__name__}]) so it runs as one call, "
                        f"or wrap the network with module:<package.module>:<callable> and an explicit model.blocks "
                        f"list that cuts around it") from None
    gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
    return gm, dict(tracer.node_to_qualname)


def _propagate(gm: fx.GraphModule, x: torch.Tensor, label: str) -> None:
    """Record every node's output shape (``ShapeProp``) by running the graph on ``x``, a zero image."""
    from torch.fx.passes.shape_prop import ShapeProp

    try:  # ShapeProp prints the traceback of a failing node itself: keep it off the user's console
        with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):
            ShapeProp(gm).propagate(x)
    except Exception as e:  # the network's own error on this input (too small, asserted size...)
        cause = e.__cause__ or e
        first = (str(cause).strip().splitlines() or [type(cause).__name__])[0][:160]
        raise LakdError(f"{label} fails on a {tuple(x.shape[-2:])} image: {first}; give the image size it takes "
                        f"(data.image_size, --image-size, input_size=)") from None


def _value_nodes(graph: fx.Graph) -> list[fx.Node]:
    return [n for n in graph.nodes if n.op in ("placeholder", "call_module", "call_function", "call_method")]


def _tensor_shape(node: fx.Node):
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _fshape(node: fx.Node, label: str, nhwc: bool = False) -> FeatureShape:
    shape = _tensor_shape(node)
    if shape is None or len(shape) != 4:
        raise LakdError(f"{label}: the cut {node.name!r} gives {'a non-tensor' if shape is None else shape}, not a "
                        f"B x C x H x W map; cut where the features are 4-D maps (see `lakd models --blocks`)")
    if nhwc:  # B x H x W x C (Swin-style): the distillers see it permuted to B x C x H x W
        return FeatureShape(int(shape[3]), int(shape[1]), int(shape[2]))
    return FeatureShape(int(shape[1]), int(shape[2]), int(shape[3]))


def _is_relu(gm: fx.GraphModule, n: fx.Node) -> bool:
    if n.op == "call_module":
        return isinstance(gm.get_submodule(n.target), nn.ReLU)
    if n.op == "call_function":
        return n.target in _RELU
    return n.op == "call_method" and n.target in ("relu", "relu_")


def _is_trivial(gm: fx.GraphModule, n: fx.Node) -> bool:
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


def _pool_layout(gm: fx.GraphModule, n: fx.Node) -> str | None:
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
    inp, out = _tensor_shape(n.args[0]), _tensor_shape(n)
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


def _is_global_pool(gm: fx.GraphModule, n: fx.Node) -> bool:
    return _pool_layout(gm, n) is not None


class _Split:
    """One traced graph cut into stem, blocks and head pieces (one per mode when train and eval graphs differ)."""

    def __init__(self, gm: fx.GraphModule, qualnames: dict, stem: str | None, blocks: list[str],
                 classifier: str | None, label: str):
        self.gm, self.label = gm, label
        nodes = _value_nodes(gm.graph)
        pos = {n: i for i, n in enumerate(gm.graph.nodes)}
        out_node = next(n for n in gm.graph.nodes if n.op == "output")
        logits = out_node.args[0]
        if not isinstance(logits, fx.Node) or (logits.op == "call_function" and isinstance(logits.target, type)):
            kind = logits.target.__name__ if isinstance(logits, fx.Node) else type(logits).__name__
            raise LakdError(f"{label} returns {kind} (in training or eval mode), not one tensor of logits; turn its extra outputs off with constructor options (e.g. "
                            f"model.kwargs={{aux_logits: false}}) or wrap it with module:<package.module>:<callable> "
                            f"returning a module whose forward gives logits")
        placeholders = [n for n in nodes if n.op == "placeholder"]
        cuts = [resolve_cut(c, qualnames, label) for c in blocks]
        stem_node = resolve_cut(stem, qualnames, label) if stem else placeholders[0]
        order = [stem_node, *cuts]
        names = [stem or "input", *blocks]
        for a, b, na, nb in zip(order, order[1:], names, names[1:]):
            if pos[b] <= pos[a]:
                raise LakdError(f"cut points out of order for {label}: {nb!r} runs before (or is) {na!r}; list "
                                f"model.blocks in the order the network runs them (see `lakd models --blocks`)")
        # the head: global pooling after the last cut; its input is the last feature map
        # the last one: squeeze-excitation layers pool too, inside the blocks
        pools = [n for n in nodes if _is_global_pool(gm, n)]
        pool = pools[-1] if pools and pos[pools[-1]] > pos[order[-1]] else None
        earlier = pools[-1] if pools and pool is None else None
        if pool is None and earlier is not None:
            raise LakdError(f"cut point {names[-1]!r} of {label} lies after the last feature map (the input of global "
                            f"pooling {qualnames.get(earlier, earlier.name)!r}); end model.blocks at or before it")
        if not pools:
            raise LakdError(f"{label} has no global pooling (adaptive/average pooling to 1x1 or a mean over H x W) "
                            f"before its classifier (it may classify a flattened map, as VGG does, or tokens); the "
                            f"adapter needs a network that pools its last feature map, then classifies")
        if pool is None:
            raise LakdError(f"{label}: found no global pooling (adaptive/average pooling to 1x1 or a mean over "
                            f"H x W) after the last cut {names[-1]!r}; the adapter needs a convolutional network "
                            f"that pools its last feature map before classifying")
        fmap = pool.args[0]
        if pos[fmap] < pos[order[-1]]:
            raise LakdError(f"cut point {names[-1]!r} of {label} lies after the last feature map (the input of "
                            f"global pooling {qualnames.get(pool, pool.name)!r}); end model.blocks at or before it")
        self.pool_shape = _tensor_shape(pool)
        # the layout of the network's maps, read from its final pooling: a B x H x W x C network (Swin) has every
        # cut in that layout but the input image; its features are handed to the distillers permuted to NCHW
        self.nhwc = _pool_layout(gm, pool) == "nhwc"
        cls_node = None
        if classifier:
            cls_node = resolve_cut(classifier, qualnames, label)
            if cls_node.op != "call_module" or not isinstance(gm.get_submodule(cls_node.target), nn.Linear):
                raise LakdError(f"model.classifier={classifier!r} of {label} is not an nn.Linear call")
            if pos[cls_node] < pos[pool]:
                raise LakdError(f"model.classifier={classifier!r} of {label} runs before global pooling")
        else:
            linears = [n for n in nodes if pos[n] > pos[pool] and n.op == "call_module"
                       and isinstance(gm.get_submodule(n.target), nn.Linear)]
            cls_node = linears[-1] if linears else None
        self.classifier_path = cls_node.target if cls_node is not None else None
        self.cam_problem = None if cls_node is not None else (
            f"{label} has no nn.Linear after global pooling; name its classifier with model.classifier=<module path>")
        emb = cls_node.args[0] if cls_node is not None else pool
        # the layers between pooling and the classifier, for dense class maps
        mid = self._ancestors(emb, stop=pool) if cls_node is not None else []
        if any(pos[n] < pos[pool] for n in mid if n.op != "get_attr"):
            self.cam_problem = (f"the classifier {cls_node.target!r} of {label} sees more than the pooled map; "
                                f"name another with model.classifier=<module path>")
            mid = []
        self.mid_trivial = all(_is_trivial(gm, n) for n in mid if n.op != "get_attr")
        # segments: 0 = stem, 1..n = blocks, n+1 = head
        seg: dict[fx.Node, int] = {}
        bounds = [pos[n] for n in order]
        for n in nodes:
            seg[n] = 0 if n.op == "placeholder" else sum(pos[n] > b for b in bounds)
        head = len(order)
        carry: list[list[fx.Node]] = []
        for s in range(head):
            live = [v for v in nodes if seg[v] <= s and (v is order[s] or any(
                seg.get(u, head) > s for u in v.users))]
            carry.append(live)
        self.mains = [carry[s].index(order[s]) for s in range(head)]
        self.nhwc_cuts = [self._nhwc_at(n) for n in order]
        self.inputs = placeholders
        self.defaults = [p.args[0] if p.args else None for p in placeholders]
        self.pieces_spec = []
        for s in range(head + 1):
            ins = placeholders if s == 0 else carry[s - 1]
            body = [n for n in nodes if seg[n] == s and n.op != "placeholder"]
            if s < head:
                outs = list(carry[s])
                relu_cut = order[s] if s > 0 and _is_relu(gm, order[s]) else None
                pre = (order[s].args[0] if relu_cut is not None else order[s]) if s > 0 else None
                self.pieces_spec.append((ins, body, outs + ([pre] if pre is not None else []), relu_cut))
            else:
                self.pieces_spec.append((ins, body, [logits, fmap, emb], None))
        self.mid_spec = ([pool], mid, [emb], None) if cls_node is not None and not self.mid_trivial else None
        self.cuts = order
        self.build()

    def _nhwc_at(self, node: fx.Node) -> bool:
        """Is this value B x H x W x C? Every map of an NHWC network is, but the input image."""
        return self.nhwc and node.op != "placeholder"

    def shape(self, node: fx.Node) -> FeatureShape:
        """A cut's (or the last map's) shape as the distillers see it: channels, height, width."""
        return _fshape(node, self.label, self._nhwc_at(node))

    @staticmethod
    def _ancestors(node: fx.Node, stop: fx.Node) -> list[fx.Node]:
        seen, todo = {}, [node]
        while todo:
            n = todo.pop()
            if n is stop or n in seen:
                continue
            seen[n] = True
            todo.extend(n.all_input_nodes)
        return [n for n in node.graph.nodes if n in seen]

    def _piece(self, ins, body, outs, relu_cut, flatten_emb=False) -> fx.GraphModule:
        g = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        for n in ins:
            env[n] = g.placeholder(n.name)

        def arg(a):
            if a not in env and a.op == "get_attr":  # parameters used functionally: fetched where used
                env[a] = g.get_attr(a.target)
            return env[a]

        for n in body:
            if n.op == "get_attr":
                continue
            if n is relu_cut:  # out of place, so the pre-activation (the ReLU's input) survives for OFD
                env[n] = g.call_function(torch.relu, (arg(n.args[0]),))
            else:
                env[n] = g.node_copy(n, arg)
        g.output(tuple(arg(n) for n in outs))
        return fx.GraphModule(self.gm, g, "Piece")

    def build(self) -> None:
        """(Re)create the pieces from the original modules (after ``.to()`` replaced buffer tensors)."""
        self.pieces = [self._piece(*spec) for spec in self.pieces_spec]
        self.mid = self._piece(*self.mid_spec) if self.mid_spec else None


def _last_nodes(qualnames: dict) -> dict[str, fx.Node]:
    """Every module path (and each of its parents) -> the last traced node inside it, in graph order."""
    last: dict[str, fx.Node] = {}
    for node, q in qualnames.items():
        parts = q.split(".")
        for i in range(1, len(parts) + 1):
            last[".".join(parts[:i])] = node
    return last


def resolve_cut(name: str, qualnames: dict, label: str) -> fx.Node:
    """The node a cut point names: a traced node's name, or a module path (its last node, as torchvision's
    ``create_feature_extractor`` does)."""
    if not isinstance(name, str) or not name:
        raise LakdError(f"cut points of {label} are module paths or node names (strings), got {name!r}")
    hit = None
    for node, q in qualnames.items():
        if q == name or q.startswith(name + "."):
            hit = node  # graph order: the last one wins
    if hit is None:
        known = set(qualnames.values())
        for q in list(known):
            parts = q.split(".")
            known.update(".".join(parts[:i]) for i in range(1, len(parts)))
        raise LakdError(f"{label} has no cut point {name!r}{close_matches(name, sorted(known), n=5)}; list them with "
                        f"`lakd models --blocks {label}`")
    return hit


def _modes_differ(a: dict, b: dict) -> bool:
    return list(a.values()) != list(b.values())


class AdaptedNet(FeatureNet):
    """A ``FeatureNet`` over any traceable network (see the module doc). Build it with ``adapt``."""

    def __init__(self, model: nn.Module, blocks: list[str] | None = None, stem: str | None = None,
                 classifier: str | None = None, leaf_modules=(), input_size: int = 224, name: str | None = None):
        nn.Module.__init__(self)
        # the network's own children (and top-level tensors) become the adapter's: same state_dict names
        # (assigned directly: a child may be called like a FeatureNet attribute, e.g. torchvision's `classifier`)
        self._modules.update(model._modules)
        self._parameters.update(model._parameters)
        self._buffers.update(model._buffers)
        self._non_persistent_buffers_set.update(model._non_persistent_buffers_set)
        object.__setattr__(self, "_root", model)
        self.input_size = int(input_size)
        self.label = name or type(model).__name__
        was = model.training
        graphs = {}
        try:
            for mode in (True, False):
                model.train(mode)
                graphs[mode] = trace(model, leaf_modules, self.label)
            p = next(model.parameters(), None)
            x = torch.zeros(1, 3, self.input_size, self.input_size,
                            device=p.device if p is not None else None, dtype=p.dtype if p is not None else None)
            differ = _modes_differ(graphs[True][1], graphs[False][1])
            model.eval()  # the train-mode graph too: shapes without touching BatchNorm statistics
            for mode in (False, True) if differ else (False,):
                _propagate(graphs[mode][0], x, self.label)
        finally:
            model.train(was)
        gm, qn = graphs[False]
        if blocks is None:
            dstem, blocks = default_cuts(model, gm, qn)
            stem = stem if stem is not None else dstem
        blocks = list(blocks)
        if not blocks:
            raise LakdError(f"model.blocks for {self.label} is empty; give at least one cut point")
        self.cut_names = {"stem": stem, "blocks": blocks, "classifier": classifier}
        eval_split = _Split(gm, qn, stem, blocks, classifier, self.label)
        train_split = eval_split
        if differ:
            train_split = _Split(*graphs[True], stem, blocks, classifier, self.label)
        object.__setattr__(self, "_splits", {True: train_split, False: eval_split})
        self.train(was)
        # stages end where the resolution changes (next block's map is smaller), and at the last block
        self.stage_ends = list(range(1, len(blocks) + 1))
        b = [eval_split.shape(n) for n in eval_split.cuts[1:]]
        self.stage_ends = [i + 1 for i in range(len(b))
                           if i == len(b) - 1 or (b[i].height, b[i].width) != (b[i + 1].height, b[i + 1].width)]

    # ----- plumbing ------------------------------------------------------------------------------
    @property
    def _split(self) -> _Split:
        return self._splits[self.training]

    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        root = self._root
        for n in list(root._buffers):
            if n in self._buffers:
                root._buffers[n] = self._buffers[n]
        for sp in {id(s): s for s in self._splits.values()}.values():
            sp.build()  # pieces hold references to buffer tensors that _apply replaced
        return self

    def __deepcopy__(self, memo):
        import copy

        cls = type(self)
        new = cls.__new__(cls)
        memo[id(self)] = new
        for k, v in self.__dict__.items():
            if k != "_splits":
                new.__dict__[k] = copy.deepcopy(v, memo)
        splits = {}
        for mode, sp in self._splits.items():
            if id(sp) not in memo:
                c = copy.copy(sp)
                c.gm = copy.deepcopy(sp.gm, memo)  # shares the copied modules through memo
                nodes = {o: n for o, n in zip(sp.gm.graph.nodes, c.gm.graph.nodes)}
                c.pieces_spec = [_remap(s, nodes) for s in sp.pieces_spec]
                c.mid_spec = _remap(sp.mid_spec, nodes) if sp.mid_spec else None
                c.cuts = [nodes[n] for n in sp.cuts]
                c.inputs = [nodes[n] for n in sp.inputs]
                c.build()
                memo[id(sp)] = c
            splits[mode] = memo[id(sp)]
        new.__dict__["_splits"] = splits
        return new

    def feature_info(self, input_size: int | None = None) -> dict:
        """As ``FeatureNet.feature_info``; at the adapter's own input size, read from the traced shapes."""
        size = input_size or self.input_size
        cache = self.__dict__.setdefault("_feature_info_cache", {})
        if size != self.input_size or size in cache:
            return super().feature_info(size)
        sp = self._splits[False]
        blocks = [sp.shape(n) for n in sp.cuts[1:]]
        logits, fmap, emb = sp.pieces_spec[-1][2]
        cache[size] = {
            "stem": sp.shape(sp.cuts[0]),
            "blocks": blocks,
            "stages": [blocks[e - 1] for e in self.stage_ends],
            "last": sp.shape(fmap),
            "embedding_dim": math.prod(_tensor_shape(emb)[1:]),
            "num_classes": int(_tensor_shape(logits)[1]),
        }
        return cache[size]

    # ----- the feature interface -------------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return len(self.cut_names["blocks"])

    def stem_forward(self, x):
        sp = self._split
        vals = [x] + sp.defaults[1:]
        return Carry(sp.pieces[0](*vals), sp.mains[0], sp.nhwc_cuts[0])

    def block_forward(self, i, h, preact=False):
        sp = self._split
        out = sp.pieces[i + 1](*h.values)
        nhwc = sp.nhwc_cuts[i + 1]
        carry = Carry(out[:-1], sp.mains[i + 1], nhwc)
        if not preact:
            return carry
        return carry, (out[-1].permute(0, 3, 1, 2) if nhwc else out[-1])

    def head_forward(self, h, return_map=False):
        sp = self._split
        logits, fmap, emb = sp.pieces[-1](*h.values)
        if sp.nhwc:
            fmap = fmap.permute(0, 3, 1, 2)
        if emb.dim() > 2:
            emb = torch.flatten(emb, 1)
        return (logits, fmap, emb) if return_map else logits

    def _pieces(self, j: int) -> list[nn.Module]:
        # both modes' pieces (one module when the train and eval graphs agree): train.compile compiles each,
        # so a network whose graph depends on self.training also evaluates compiled; recomputation keeps the
        # buffers of both, which are the same tensors
        return list({id(sp.pieces[j]): sp.pieces[j] for sp in self._splits.values()}.values())

    def stem_modules(self):
        return self._pieces(0)

    def block_modules(self, i):
        return self._pieces(i + 1)

    @property
    def classifier(self) -> nn.Linear:  # type: ignore[override]
        sp = self._split
        if sp.classifier_path is None:
            raise LakdError(sp.cam_problem)
        return self._root.get_submodule(sp.classifier_path)

    def class_maps(self, fmap):
        sp = self._split
        if sp.cam_problem:
            raise LakdError(sp.cam_problem)
        w = self.classifier.weight
        if sp.mid is None:
            return torch.einsum("bchw,kc->bkhw", fmap, w)
        # the layers between pooling and the classifier applied at every position of the map
        b, c, hh, ww = fmap.shape
        x = fmap.permute(0, 2, 3, 1).reshape(b * hh * ww, c)
        if len(sp.pool_shape) == 4:  # the layers after pooling take the pooled map's own 4-D shape
            x = x[:, None, None, :] if sp.nhwc else x[:, :, None, None]
        (e,) = sp.mid(x)
        return torch.einsum("bhwc,kc->bkhw", e.reshape(b, hh, ww, -1), w)

    def missing(self, need):
        if need == "class_maps":
            return self._split.cam_problem
        return super().missing(need)

    def forward(self, x, features=False, preact=False, blocks=False):
        return FeatureNet.forward(self, x, features=features, preact=preact, blocks=blocks)


def _remap(spec, nodes):
    ins, body, outs, relu = spec
    return ([nodes[n] for n in ins], [nodes[n] for n in body], [nodes[n] for n in outs],
            nodes[relu] if relu is not None else None)


# ----- default cut points ---------------------------------------------------------------------------------
def default_cuts(model: nn.Module, gm: fx.GraphModule, qualnames: dict) -> tuple[str | None, list[str]]:
    """(stem, blocks) when the user names none: torchvision ResNets' residual blocks; timm's ``feature_info``
    stages, each cut after every block inside it (``within``); otherwise the top-level children that run in
    sequence before global pooling (opening the largest container while fewer than three do, e.g. ``features`` or
    ``trunk_output``), the first of three or more being the stem."""
    from torchvision.models.resnet import ResNet

    if isinstance(model, ResNet):
        blocks = [f"layer{i}.{j}" for i in range(1, 5) for j in range(len(getattr(model, f"layer{i}")))]
        return "maxpool", blocks
    pos = {n: i for i, n in enumerate(gm.graph.nodes)}
    pools = [n for n in _value_nodes(gm.graph) if _is_global_pool(gm, n)]
    pool = pools[-1] if pools else None
    limit = pos[pool.args[0]] if pool is not None else len(pos)
    last_node = _last_nodes(qualnames)

    def in_sequence(paths: list[str]) -> list[str]:
        """The paths whose nodes all run before pooling, ordered, each ending after the previous one."""
        spans = []
        for path in paths:
            ps = [pos[n] for n, q in qualnames.items() if q == path or q.startswith(path + ".")]
            if ps and max(ps) <= limit:
                spans.append((min(ps), max(ps), path))
        out, last = [], -1
        for _, hi, path in sorted(spans):
            if hi > last:
                out.append(path)
                last = hi
        return out

    def children(path: str) -> list[str]:
        mod = model.get_submodule(path) if path else model
        return [f"{path}.{c}" if path else c for c, _ in mod.named_children()]

    def size(path: str) -> int:
        return sum(p.numel() for p in model.get_submodule(path).parameters())

    def within(stage: str) -> list[str]:
        """A timm stage cut after each of its blocks: its children in sequence, opening the largest while it is
        a plain container (``nn.Sequential``/``nn.ModuleList``: ResNet's ``layer1``, ConvNeXt's and Swin's
        ``blocks``) -- as torchvision ResNets are cut per residual block. The stage's own end stays a cut."""
        seq = [c for c in in_sequence(children(stage)) if not isinstance(model.get_submodule(c), nn.Identity)]
        while seq:
            big = max(seq, key=size)
            inner = in_sequence(children(big))
            if not isinstance(model.get_submodule(big), (nn.Sequential, nn.ModuleList)) or len(inner) < 2:
                break
            k = seq.index(big)
            seq = seq[:k] + inner + seq[k + 1:]
        if len(seq) < 2:
            return [stage]
        if last_node.get(seq[-1]) is not last_node.get(stage):  # the stage runs more after its last child
            seq[-1] = stage
        return seq

    fi = getattr(model, "feature_info", None)
    if isinstance(fi, list) and fi and all(isinstance(d, dict) and "module" in d for d in fi):
        mods = [d["module"] for d in fi]
        stem = None
        if len(fi) > 1 and fi[0].get("reduction", 4) <= 2:
            stem, mods = mods[0], mods[1:]
        # the modules that run between two stages (EfficientNet's blocks.3 between feature stages blocks.2
        # and blocks.4) are cut after each of their blocks too, rather than joined to the next stage's first
        order, prev = [], last_node.get(stem) if stem else None
        for m in mods:
            parent = m.rpartition(".")[0]
            gap = []
            if prev is not None and m in children(parent):
                gap = [c for c in in_sequence(children(parent)) if pos[prev] < pos[last_node[c]] < pos[last_node[m]]]
            if gap and not order:  # between the stem and the first stage (ResNet's maxpool): the stem's end
                stem, gap = gap[-1], []
            order += gap + [m]
            prev = last_node.get(m)
        return stem, [b for m in order for b in within(m)]

    seq = in_sequence(children(""))
    # open the largest container while fewer than three pieces run in sequence (`features`, `trunk_output`)
    while len(seq) < 3:
        opened = [p for p in seq if len(in_sequence(children(p))) >= 2]
        if not opened:
            break
        big = max(opened, key=size)
        k = seq.index(big)
        seq = seq[:k] + in_sequence(children(big)) + seq[k + 1:]
    if not seq:
        raise LakdError(f"found no module that runs before global pooling in {type(model).__name__}; name the cut "
                        f"points with model.blocks (see `lakd models --blocks`)")
    if len(seq) >= 3:
        return seq[0], seq[1:]
    return None, seq


def cut_candidates(model: nn.Module, input_size: int = 224, leaf_modules=()) -> list[tuple[str, tuple | None]]:
    """Every module path that can be a cut point, in run order, with its output shape at ``input_size``."""
    was = model.training
    model.eval()
    try:
        gm, qn = trace(model, leaf_modules)
        p = next(model.parameters(), None)
        _propagate(gm, torch.zeros(1, 3, input_size, input_size, dtype=p.dtype if p is not None else None),
                   type(model).__name__)
    finally:
        model.train(was)
    last = _last_nodes(qn)
    pos = {n: i for i, n in enumerate(gm.graph.nodes)}
    modules = {n for n, _ in model.named_modules() if n}
    rows = [(path, _tensor_shape(node)) for path, node in last.items() if path in modules]
    rows.sort(key=lambda r: (pos[last[r[0]]], -r[0].count(".")))
    return rows


def adapt(model: nn.Module, blocks: list[str] | None = None, stem: str | None = None,
          classifier: str | None = None, leaf_modules=(), input_size: int = 224,
          name: str | None = None) -> FeatureNet:
    """``model`` behind the feature interface. A ``FeatureNet`` is returned as it is.

    ``blocks``: cut points ending each block (module paths or traced node names, in run order; default per
    family, see ``default_cuts``); ``stem``: the cut ending the stem (default: none, or the family's);
    ``classifier``: the module path of the classifier used for class activation maps (default: the last
    ``nn.Linear`` after global pooling); ``leaf_modules``: module types, class names or paths that fx must not
    trace into; ``input_size``: the square image size used to infer feature shapes.
    """
    if isinstance(model, FeatureNet):
        return model
    if not isinstance(model, nn.Module):
        raise LakdError(f"expected an nn.Module to distil, got {type(model).__name__}")
    return AdaptedNet(model, blocks=blocks, stem=stem, classifier=classifier, leaf_modules=leaf_modules,
                      input_size=input_size, name=name)


__all__ = ["AdaptedNet", "adapt", "cut_candidates", "default_cuts", "trace", "feature"]
