"""A tiny name -> object registry (the pattern of timm and torchdistill)."""
from __future__ import annotations

from collections.abc import Callable

from .errors import LakdError, close_matches


class Registry:
    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, Callable] = {}

    def register(self, name: str | None = None):
        def deco(obj):
            key = (name or obj.__name__).lower()
            if key in self._items:
                raise ValueError(f"{self.kind} {key!r} registered twice")
            self._items[key] = obj
            return obj

        return deco

    def get(self, name: str):
        key = str(name).lower()
        if key not in self._items:
            raise LakdError(
                f"unknown {self.kind} {name!r}{close_matches(key, self._items)}; "
                f"run `lakd {self.kind}s` or see the list: {', '.join(sorted(self._items))}"
            )
        return self._items[key]

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name) -> bool:
        return str(name).lower() in self._items
