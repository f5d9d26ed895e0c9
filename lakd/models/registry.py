"""The model registry: ``create_model(name, num_classes)`` and ``list_models()``."""
from __future__ import annotations

from ..registry import Registry

MODELS = Registry("model")
FAMILY: dict[str, str] = {}


def register_model(name: str, family: str):
    def deco(fn):
        FAMILY[name] = family
        return MODELS.register(name)(fn)

    return deco
