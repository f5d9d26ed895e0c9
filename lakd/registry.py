"""Name -> object registries (the pattern of timm and torchdistill): models, methods and datasets.

Each registry knows the package whose modules register into it and imports that package the first time it is
asked for a name, so a lower layer (``lakd.config``) can look up methods by name without importing the
distillers itself, and the import graph keeps pointing one way.
"""
from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from .errors import LakdError, close_matches


class Registry:
    def __init__(self, kind: str, package: str | None = None, hint: str = "", sort: bool = True):
        self.kind = kind
        self.sort = sort  # names() sorted, or in registration order
        self.package = package
        self.hint = hint or f"run `lakd {kind}s` or see the list:"
        self._items: dict[str, Callable] = {}
        self._info: dict[str, dict[str, Any]] = {}
        self._loaded = package is None

    def _load(self) -> None:
        if not self._loaded:
            self._loaded = True  # before the import: the package's modules register while it runs
            importlib.import_module(self.package)

    def register(self, name: str | None = None, **info):
        """Decorator registering ``obj`` under ``name`` (default: its ``__name__``), with optional metadata."""

        def deco(obj):
            key = (name or obj.__name__).lower()
            if key in self._items:
                raise ValueError(f"{self.kind} {key!r} registered twice")
            self._items[key] = obj
            self._info[key] = dict(info)
            return obj

        return deco

    def get(self, name: str):
        self._load()
        key = str(name).lower()
        if key not in self._items:
            raise LakdError(
                f"unknown {self.kind} {name!r}{close_matches(key, self._items)}; "
                f"{self.hint} {', '.join(self.names())}"
            )
        return self._items[key]

    def info(self, name: str) -> dict[str, Any]:
        """The metadata ``name`` was registered with (a copy)."""
        self.get(name)
        return dict(self._info[str(name).lower()])

    def names(self) -> list[str]:
        self._load()
        return sorted(self._items) if self.sort else list(self._items)

    def __contains__(self, name) -> bool:
        self._load()
        return str(name).lower() in self._items


#: distillation methods (``method:`` in a config), one module each in ``lakd/distillers/``
DISTILLERS = Registry("method", package="lakd.distillers")
#: datasets (``data.dataset:``), registered by the modules of ``lakd/data/`` with their defaults
DATASETS = Registry("dataset", package="lakd.data", hint="data.dataset must be one of", sort=False)
