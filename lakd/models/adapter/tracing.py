"""Tracing a network with ``torch.fx`` for the adapter, and the one-line diagnostics when that fails.

The tracer is torchvision's public ``NodePathTracer`` (``torchvision.models.feature_extraction``): its node names
-- ``layer1.0``, ``features.3``, ``stages.2.blocks.1`` -- name the cut points, as in ``get_graph_node_names`` and
``create_feature_extractor``, and a cut named by a module path is the last node inside that module, as there.
Its defaults are those of ``create_feature_extractor`` (``math`` and ``torchvision.ops`` autowrapped,
torchvision.ops' modules as leaves), built here from public names; timm's registered untraceable modules and
functions are leaves too when timm is loaded.
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
import torchvision
from torchvision.models.feature_extraction import NodePathTracer

from ...errors import LakdError, close_matches


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


def _ops_leaf_modules() -> list[type]:
    """torchvision.ops' module classes (``DeformConv2d``, ``StochasticDepth``...), which
    ``create_feature_extractor`` keeps as leaves by default."""
    ops = (getattr(torchvision.ops, n) for n in dir(torchvision.ops))
    return [c for c in ops if isinstance(c, type) and issubclass(c, nn.Module)]


def _tracer_kwargs(leaf_modules) -> tuple[dict, set]:
    """``create_feature_extractor``'s defaults (torchvision.ops as leaves, ``math`` and ``torchvision.ops``
    autowrapped), timm's registered untraceable modules and functions when timm is loaded, and the user's leaves
    (types, class names or module paths)."""
    types = [m for m in leaf_modules if isinstance(m, type)]
    names = {m for m in leaf_modules if isinstance(m, str)}
    kw: dict = {"leaf_modules": types + _ops_leaf_modules(), "autowrap_functions": [],
                "autowrap_modules": (math, torchvision.ops)}
    if "timm" in sys.modules:
        try:
            from timm.layers import get_notrace_functions, get_notrace_modules

            kw["leaf_modules"] += list(get_notrace_modules())
            kw["autowrap_functions"] += list(get_notrace_functions())
        except ImportError:  # an old timm: its defaults are missed, the user's leaves still apply
            pass
    kw["leaf_modules"] = list(dict.fromkeys(kw["leaf_modules"]))
    return kw, names


def _where(tb) -> str:
    """The innermost frame of the traceback that is not torch's own: the line of the model that failed."""
    torch_dir = os.path.dirname(torch.__file__)
    frames = [f for f in traceback.extract_tb(tb) if not f.filename.startswith(torch_dir)
              and not f.filename.startswith(os.path.dirname(os.path.dirname(__file__)))]
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
        if not inside:  # the network's own forward: a leaf there is the whole network, which gives logits only
            raise LakdError(f"cannot trace {label} with torch.fx: {first}{_where(e.__traceback__)} in the top-level "
                            f"forward of {label}; model.leaf_modules=[{type(mod).__name__}] runs it as one call, "
                            f"for methods that need only the logits (e.g. method=kd); for feature methods move that "
                            f"code into a submodule and make the submodule a leaf") from None
        raise LakdError(f"cannot trace {label} with torch.fx: {first}{_where(e.__traceback__)} in module {inside!r} "
                        f"({type(mod).__name__}); make that module a leaf (model.leaf_modules=[{type(mod).__name__}]) "
                        f"so it runs as one call, or wrap the network with module:<package.module>:<callable> and an "
                        f"explicit model.blocks list that cuts around it") from None
    gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
    return gm, dict(tracer.node_to_qualname)


def propagate(gm: fx.GraphModule, x: torch.Tensor, label: str) -> None:
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


def value_nodes(graph: fx.Graph) -> list[fx.Node]:
    return [n for n in graph.nodes if n.op in ("placeholder", "call_module", "call_function", "call_method")]


def tensor_shape(node: fx.Node):
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def last_nodes(qualnames: dict) -> dict[str, fx.Node]:
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


def modes_differ(a: dict, b: dict) -> bool:
    return list(a.values()) != list(b.values())

