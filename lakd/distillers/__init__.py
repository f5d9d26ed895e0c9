"""Distillation methods, one file each, registered by name (``method:`` in a config).

Every module in this package is imported here, so adding a method is adding a file. What other layers need to
know about the methods (table order, benchmark variants, which feature maps to show) is read from the classes
through the helpers below; nothing outside this package keeps a list of methods.
"""
from __future__ import annotations

import importlib
import pkgutil

from .base import DISTILLERS, Distiller, register_distiller

for _m in pkgutil.iter_modules(__path__):
    if _m.name not in ("base", "catalog"):  # catalog.py writes the plain-data index of the others
        importlib.import_module(f"{__name__}.{_m.name}")


def build_distiller(cfg: dict, student, teacher, num_data: int = 0) -> Distiller:
    return DISTILLERS.get(cfg["method"])(student, teacher, cfg, num_data=num_data)


def method_variants() -> dict[str, tuple[str, list[str]]]:
    """Every runnable method name -> (registered method, config overrides): the registered methods, in table
    order, each followed by its declared variants (e.g. ``lakd_joint`` -> ``("lakd", ["sdm.backward=joint"])``)."""
    out: dict[str, tuple[str, list[str]]] = {}
    for name in sorted(DISTILLERS.names(), key=lambda n: (DISTILLERS.get(n).report_order, n)):
        cls = DISTILLERS.get(name)
        out[name] = (name, [])
        for variant, overrides in cls.variants.items():
            out[variant] = (name, list(overrides))
    return out


def resolve_method(name: str) -> tuple[str, list[str]]:
    """``(registered method, config overrides)`` for a method or variant name; a clear error when unknown."""
    variants = method_variants()
    if name in variants:
        return variants[name]
    DISTILLERS.get(name)  # raises the registry's one-line error
    return variants[str(name).lower()]


def bench_default_methods() -> list[str]:
    """The methods (and their variants) ``lakd bench`` measures by default: those declaring ``bench_default``."""
    out = []
    for v, (m, _) in method_variants().items():
        cls = DISTILLERS.get(m)
        if cls.bench_default and (v == m or cls.bench_variants is None or v in cls.bench_variants):
            out.append(v)
    return out


def cost_reference() -> str:
    """The method the cost benchmarks compare every method with (the one declaring ``cost_reference``)."""
    return next(n for n in DISTILLERS.names() if DISTILLERS.get(n).cost_reference)


def report_order(method: str) -> int:
    """A method's row position in result tables (``report_order`` of its class; unknown names: 9999)."""
    return DISTILLERS.get(method).report_order if method in DISTILLERS else Distiller.report_order


def display_name(method: str) -> str:
    """How tables and figures write a method (its class's ``display_name``; else the name itself)."""
    return (DISTILLERS.get(method).display_name or method) if method in DISTILLERS else method


def analysis_points(cfg: dict) -> str:
    """Which block outputs of a trained student analyses show by default, from its run config."""
    method = cfg.get("method") if isinstance(cfg, dict) else None
    return DISTILLERS.get(method).analysis_points(cfg) if method and method in DISTILLERS else "stages"


__all__ = ["DISTILLERS", "Distiller", "register_distiller", "build_distiller", "method_variants", "resolve_method",
           "bench_default_methods", "cost_reference", "report_order", "display_name", "analysis_points"]
