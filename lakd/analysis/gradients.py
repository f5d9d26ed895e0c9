"""How hard each loss term pulls on a fresh student: the scale check before a long run.

A method's weights are set by its authors for their data set. Moved to another one (10 classes instead of 100, a
teacher that is more or less confident), a term can start at many times the gradient of cross-entropy or KD and
wreck the run in its first epoch (MLKD at its CIFAR-100 weights on CIFAR-10 ends at 27%, WKD-L at 35%;
docs/methods.md). ``start_gradients`` measures that in seconds: for a config, the norm of the gradient of each
of the method's losses (as weighted in the run) and of their sum over the student's trainable parameters, at the
seed's fresh student, averaged over the first training batches of epoch 1. The student is never stepped: every
batch sees the same initial weights. A method's own stage (SSKD's SS head, FT's paraphraser, AB's
initialisation) is not run first: this is the main loss at the first step.
"""
from __future__ import annotations

import logging

import torch

from ..engine.build import build
from ..errors import LakdError
from ..runtime.seeding import seed_everything

log = logging.getLogger(__name__)

TOTAL = "total"


def start_gradients(cfg: dict, batches: int = 4, device: str = "cpu") -> dict[str, float]:
    """``{loss name: mean gradient norm, ..., "total": ...}`` over the student's trainable parameters, on the
    first ``batches`` training batches of epoch 1 of ``cfg`` (a resolved config, ``lakd.config.load_config``).

    A term with no path to the student's parameters (a loss on a module of the teacher's side only) reads 0."""
    if batches < 1:
        raise LakdError(f"batches={batches}: average over at least one training batch (e.g. 4)")
    seed_everything(int(cfg["seed"]))
    built = build(cfg, device=device, warn=False)
    d = built.distiller
    d.set_epoch(0, int(cfg["solver"]["epochs"]))
    d.train()
    params = [p for p in d.student.parameters() if p.requires_grad]
    loader = built.data.train
    loader.set_epoch(0)
    sums: dict[str, float] = {}
    n = 0
    for batch in loader:  # on ``device`` already: the loader of ``build`` moves its batches there
        _, losses = d.forward_train(**batch)
        for name, loss in [*losses.items(), (TOTAL, sum(losses.values()))]:
            grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
            sq = [(g.float() ** 2).sum() for g in grads if g is not None]
            sums[name] = sums.get(name, 0.0) + (torch.sqrt(sum(sq)).item() if sq else 0.0)
        n += 1
        if n == batches:
            break
    if n < batches:
        log.warning("the training set gave %d batch(es), not %d: the figures are their mean", n, batches)
    return {k: v / n for k, v in sums.items()}

