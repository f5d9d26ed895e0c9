"""Learning-rate schedules as a pure function of progress (so resuming needs no scheduler state).

- ``linear``: the paper's linear decay from ``lr`` to ``min_lr`` over the run, per iteration.
- ``multistep``: mdistiller's steps (x ``gamma`` at each milestone epoch, e.g. 150/180/210 of 240).
- ``cosine``: cosine decay from ``lr`` to ``min_lr``, per iteration.
- ``constant``.
``warmup_epochs`` > 0 ramps linearly from 0 over that many epochs (per iteration), then the schedule runs.
"""
from __future__ import annotations

import math


def lr_at(solver: dict, epoch: int, step: int = 0, steps_per_epoch: int = 1) -> float:
    """Learning rate at 0-based ``epoch`` and 0-based ``step`` within it."""
    base, total = float(solver["lr"]), int(solver["epochs"])
    min_lr = float(solver.get("min_lr", 0.0))
    warm = float(solver.get("warmup_epochs", 0) or 0)
    t = epoch + step / max(steps_per_epoch, 1)  # fractional epochs done
    if warm > 0 and t < warm:
        return base * (t + 1.0 / max(steps_per_epoch, 1)) / warm
    kind = solver["schedule"]
    if kind == "constant":
        return base
    if kind == "multistep":
        n = sum(1 for m in solver.get("milestones", []) if epoch >= int(m))
        return base * float(solver.get("gamma", 0.1)) ** n
    span = max(total - warm, 1e-8)
    frac = min(max((t - warm) / span, 0.0), 1.0)
    if kind == "linear":
        return min_lr + (base - min_lr) * (1.0 - frac)
    if kind == "cosine":
        return min_lr + (base - min_lr) * 0.5 * (1.0 + math.cos(math.pi * frac))
    raise ValueError(f"unknown schedule {kind!r}")
