"""The scale of each loss term's gradient on the student at the start of a run.

For a config (and ``key=value`` overrides), the norm of the gradient of each of the method's losses (as weighted
in the run) and of their sum over the student's parameters, at the fresh student of that seed, averaged over the
first training batches of epoch 1. A method whose distillation term outweighs cross-entropy many times over at the
start (MLKD at its CIFAR-100 weights on 10 classes) shows here in seconds, before a run shows it in hours.

    python benchmarks/start_gradients.py CONFIG [key=value ...] [--batches 4]

e.g. with the study's overrides (``sweeps/cifar10_seeds.yaml``: ``data.root=$DATA teacher.checkpoint=$TEACHER``),
``configs/cifar10/kd/resnet56_resnet20.yaml`` against ``configs/cifar10/wkd_l/resnet56_resnet20.yaml``.
"""
from __future__ import annotations

import argparse
import sys

import torch


def start_gradients(cfg: dict, batches: int = 4) -> dict[str, float]:
    """``{loss name: mean gradient norm, ..., "total": ...}`` over the student's parameters, on the first
    ``batches`` training batches of epoch 1 (the model is not stepped: every batch sees the fresh student)."""
    from lakd.engine.build import build

    built = build(cfg, device="cpu", warn=False)
    d = built.distiller
    d.set_epoch(0, int(cfg["solver"]["epochs"]))
    d.train()
    params = [p for p in d.student.parameters() if p.requires_grad]
    loader = built.data.train
    loader.set_epoch(0)
    sums: dict[str, float] = {}
    n = 0
    for batch in loader:
        _, losses = d.forward_train(**batch)
        names = list(losses) + ["total"]
        terms = list(losses.values()) + [sum(losses.values())]
        for name, loss in zip(names, terms):
            grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
            norm = torch.sqrt(sum((g.float() ** 2).sum() for g in grads if g is not None)).item()
            sums[name] = sums.get(name, 0.0) + norm
        n += 1
        if n == batches:
            break
    return {k: v / n for k, v in sums.items()}


def main(argv: list[str] | None = None) -> int:
    from lakd.config import load_config

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("config")
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--batches", type=int, default=4)
    a = ap.parse_args(argv)
    torch.manual_seed(0)
    cfg = load_config(a.config, a.overrides + ["device=cpu", "train.progress=false"])
    torch.manual_seed(int(cfg["seed"]))
    out = start_gradients(cfg, a.batches)
    print(f"{a.config} {' '.join(a.overrides)}")
    for k, v in out.items():
        print(f"  {k:>12s} {v:10.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
