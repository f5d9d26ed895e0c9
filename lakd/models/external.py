"""Networks from outside the zoo, by name: ``torchvision:<name>``, ``timm:<name>`` and
``module:<package.module>:<callable>``, built and adapted to the feature interface (``adapter.adapt``).

Weights never download: ``torchvision:`` and ``timm:`` models start from random init, or from a local file
(``model.checkpoint`` / ``teacher.checkpoint``) holding the plain network's state dict.
"""
from __future__ import annotations

import importlib
import inspect
import os
import sys

import torch.nn as nn

from ..errors import LakdError, close_matches
from .adapter import adapt
from .base import FeatureNet

PREFIXES = ("torchvision", "timm", "module")


def is_external(name: str) -> bool:
    return isinstance(name, str) and name.split(":", 1)[0] in PREFIXES and ":" in name


def _torchvision(name: str, num_classes: int, kwargs: dict) -> nn.Module:
    import torchvision.models as tvm

    names = tvm.list_models(module=tvm)
    if name not in names:
        raise LakdError(f"torchvision has no classification model {name!r}{close_matches(name, names)}; "
                        f"see torchvision.models.list_models()")
    if kwargs.get("weights") not in (None,):
        raise LakdError("torchvision weights never download here: leave model.kwargs.weights unset and give the "
                        "local weights file as model.checkpoint (or teacher.checkpoint)")
    return tvm.get_model(name, weights=None, num_classes=num_classes, **kwargs)


def _timm(name: str, num_classes: int, kwargs: dict) -> nn.Module:
    try:
        import timm
    except ImportError:
        raise LakdError(f"timm:{name} needs timm: pip install -e '.[timm]'") from None
    if kwargs.get("pretrained"):
        raise LakdError("timm weights never download here: drop pretrained and give the local weights file as "
                        "model.checkpoint (or teacher.checkpoint)")
    names = timm.list_models()
    if name not in names:
        raise LakdError(f"timm has no model {name!r}{close_matches(name, names)}; see timm.list_models()")
    return timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)


def _module(spec: str, num_classes: int, kwargs: dict) -> nn.Module:
    mod_name, _, attr = spec.partition(":")
    if not mod_name or not attr:
        raise LakdError(f"module:{spec} must look like module:<package.module>:<callable>, e.g. "
                        f"module:mynets.small:build")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())  # a user's own package in the current folder, as `python -m` would see it
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as e:
        raise LakdError(f"cannot import {mod_name!r} for module:{spec} ({e}); run from the folder that holds it or "
                        f"add it to PYTHONPATH") from None
    fn = getattr(mod, attr, None)
    if not callable(fn):
        public = [n for n in dir(mod) if not n.startswith("_")]
        raise LakdError(f"{mod_name} has no callable {attr!r}{close_matches(attr, public)}")
    kw = dict(kwargs)
    try:
        params = inspect.signature(fn).parameters
        if "num_classes" in params and "num_classes" not in kw:
            kw["num_classes"] = num_classes
    except (TypeError, ValueError):
        pass
    try:
        model = fn(**kw)
    except TypeError as e:
        raise LakdError(f"module:{spec} does not take these keyword arguments {sorted(kw)}: {e}") from None
    if not isinstance(model, nn.Module):
        raise LakdError(f"module:{spec} returned a {type(model).__name__}, not an nn.Module")
    return model


def build_network(name: str, num_classes: int, kwargs: dict | None = None) -> nn.Module:
    """The plain network a ``torchvision:``/``timm:``/``module:`` name stands for (not adapted)."""
    kind, _, rest = name.partition(":")
    kwargs = dict(kwargs or {})
    if kind == "torchvision":
        return _torchvision(rest, num_classes, kwargs)
    if kind == "timm":
        return _timm(rest, num_classes, kwargs)
    if kind == "module":
        return _module(rest, num_classes, kwargs)
    raise LakdError(f"model name {name!r}: the prefix must be one of {', '.join(p + ':' for p in PREFIXES)}")


def default_input_size(name: str) -> int:
    """The image size shapes are inferred at when the data does not say: 32 for ``module:``, else 224."""
    return 32 if name.startswith("module:") else 224


def build_external(name: str, num_classes: int, checkpoint: str | None = None, *, kwargs: dict | None = None,
                   blocks: list[str] | None = None, stem: str | None = None, classifier: str | None = None,
                   leaf_modules=(), input_size: int | None = None) -> FeatureNet:
    """Build ``torchvision:``/``timm:``/``module:`` network ``name``, load ``checkpoint`` (the plain network's
    state dict) and adapt it at the cut points ``blocks`` (default per family)."""
    from .checkpoint import load_weights

    model = build_network(name, num_classes, kwargs)
    if checkpoint:
        load_weights(model, checkpoint, arch=name)
    size = input_size or default_input_size(name)
    return adapt(model, blocks=blocks, stem=stem, classifier=classifier, leaf_modules=tuple(leaf_modules or ()),
                 input_size=size, name=name)
