"""``lakd models``, ``lakd methods``, ``lakd configs``: what ships."""
from __future__ import annotations

import argparse
import os

HELPS = {
    "models": "list the model zoo (name, family, parameters, stage shapes)",
    "methods": "list the distillation methods and their config sections",
    "configs": "list the shipped experiment configs",
}
HELP = HELPS["models"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    pass


def add_arguments_configs(p: argparse.ArgumentParser) -> None:
    p.add_argument("--root", default=None, help="configs folder (default: ./configs, else the package's)")


def run_models(args) -> int:
    from ..models import FAMILY, create_model, list_models

    print(f"{'name':<12} {'family':<9} {'params':>9}  blocks  stage outputs (C x H x W)")
    for name in list_models():
        m = create_model(name, 100 if FAMILY[name] == "cifar" else 1000)
        n = sum(p.numel() for p in m.parameters())
        info = m.feature_info()
        stages = ", ".join(f"{s.channels}x{s.height}x{s.width}" for s in info["stages"])
        print(f"{name:<12} {FAMILY[name]:<9} {n / 1e6:>8.2f}M  {m.num_blocks:>6}  {stages}")
    return 0


def run_methods(args) -> int:
    from ..distillers import DISTILLERS

    for name in DISTILLERS.names():
        cls = DISTILLERS.get(name)
        doc = (cls.__doc__ or cls.__module__ and __import__(cls.__module__, fromlist=["x"]).__doc__ or "").strip()
        first = doc.splitlines()[0] if doc else ""
        sections = ", ".join(f"{k}: {v}" for k, v in cls.DEFAULTS.items()) or "-"
        print(f"{name:<8} {first}\n         {sections}")
    return 0


def find_configs_root(root: str | None = None) -> str:
    if root:
        return root
    if os.path.isdir("configs"):
        return "configs"
    here = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "configs")
    return here


def run_configs(args) -> int:
    root = find_configs_root(args.root)
    found = []
    for dirpath, _, files in os.walk(root):
        for f in files:
            if f.endswith((".yaml", ".yml")) and not f.startswith("_"):
                found.append(os.path.join(dirpath, f))
    if not found:
        print(f"no configs under {root!r}")
        return 0
    for path in sorted(found):
        print(path)
    return 0


run = run_models
