"""Distillation methods, one file each, registered by name (``method:`` in a config).

Every module in this package is imported here, so adding a method is adding a file.
"""
from __future__ import annotations

import importlib
import pkgutil

from .base import DISTILLERS, Distiller, register_distiller

for _m in pkgutil.iter_modules(__path__):
    if _m.name not in ("base",):
        importlib.import_module(f"{__name__}.{_m.name}")


def build_distiller(cfg: dict, student, teacher, num_data: int = 0) -> Distiller:
    return DISTILLERS.get(cfg["method"])(student, teacher, cfg, num_data=num_data)


__all__ = ["DISTILLERS", "Distiller", "register_distiller", "build_distiller"]
