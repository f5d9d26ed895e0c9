"""Name -> object registries (the pattern of timm and torchdistill): models, methods and datasets.

Each registry knows the package whose modules register into it and imports that package the first time it is
asked for a name, so a lower layer (``lakd.config``) can look up methods by name without importing the
distillers itself, and the import graph keeps pointing one way.
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import os
import re
from collections.abc import Callable
from typing import Any

from .errors import LakdError, close_matches


class Registry:
    def __init__(self, kind: str, package: str | None = None, hint: str = "", sort: bool = True,
                 catalog: str | None = None):
        self.kind = kind
        #: a JSON file in ``package``'s folder indexing what its modules register (generated from them and checked
        #: by a test), read instead of importing the package where plain data is enough (``light``)
        self.catalog_file = catalog
        self._catalog: dict[str, dict[str, Any]] | None = None
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

    @property
    def loaded(self) -> bool:
        """Whether the package's modules have registered (imported): then the live objects are authoritative."""
        return self._loaded or bool(self._items)

    def catalog(self) -> dict[str, dict[str, Any]] | None:
        """The package's catalog (name -> declared data), or None where it has none or it cannot be read."""
        if self.catalog_file is None or self.package is None:
            return None
        if self._catalog is None:
            spec = importlib.util.find_spec(self.package)
            folder = os.path.dirname(spec.origin) if spec and spec.origin else None
            try:
                with open(os.path.join(folder or "", self.catalog_file), encoding="utf-8") as f:
                    self._catalog = json.load(f)["entries"]
            except (OSError, ValueError, KeyError, TypeError):
                self._catalog = {}
        return self._catalog or None

    def light(self) -> dict[str, dict[str, Any]] | None:
        """The catalog while the package is not imported (so that a lower layer can check names and settings
        without importing torch); None once it is (then ask the live objects: ``get``, ``names``)."""
        return None if self._loaded or self._items else self.catalog()

    def check_name(self, name: str) -> str:
        """``name`` (lower-case) if it is registered, else the registry's one-line error; from the catalog
        while the package is not imported."""
        entries = self.light()
        if entries is None:
            self.get(name)
            return str(name).lower()
        key = str(name).lower()
        if key not in entries:
            names = sorted(entries) if self.sort else list(entries)
            raise LakdError(f"unknown {self.kind} {name!r}{close_matches(key, entries)}; {self.hint} "
                            f"{', '.join(names)}")
        return key


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z(`\"'])")


def first_sentences(doc: str, min_chars: int = 40) -> str:
    """The first whole sentence of ``doc``'s first paragraph (more while they are shorter than ``min_chars``): how
    listings summarise a registered object from its docstring.

    The paragraph's lines are joined first, so a sentence that wraps in the docstring is printed whole.
    """
    paragraph = " ".join(doc.strip().split("\n\n", 1)[0].split())
    out = ""
    for sentence in _SENTENCE_END.split(paragraph):
        out = f"{out} {sentence}".strip()
        if len(out) >= min_chars:
            break
    return out


#: distillation methods (``method:`` in a config), one module each in ``lakd/distillers/``
DISTILLERS = Registry("method", package="lakd.distillers", catalog="catalog.json")
#: datasets (``data.dataset:``), registered by the modules of ``lakd/data/`` with their defaults
DATASETS = Registry("dataset", package="lakd.data", hint="data.dataset must be one of", sort=False)
