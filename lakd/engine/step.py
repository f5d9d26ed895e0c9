"""One optimisation step, shared by the trainer and the benchmarks."""
from __future__ import annotations

import weakref

import torch

from ..runtime import distributed as dist

#: one gradient reducer per optimizer (multi-process runs only): it owns hooks on the optimizer's parameters
_REDUCERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _reducer(optimizer, params):
    if not dist.is_enabled():
        return None
    r = _REDUCERS.get(optimizer)
    if r is None:
        r = _REDUCERS[optimizer] = dist.GradReducer(params)
    return r


def training_step(distiller, optimizer, scaler, batch: dict, params, amp_dtype=None, overlap: bool = True):
    """zero_grad -> the method's forward/backward passes (under autocast) -> gradient all-reduce -> step.

    Under torchrun the all-reduce is ``runtime.distributed.GradReducer``'s: started bucket by bucket from
    gradient hooks during the backward passes, completed before the optimizer step (``overlap=False``: one
    synchronous all-reduce after all backward passes, the former behaviour, kept for comparison).

    The method receives ``backward(loss)`` which applies the fp16 loss scale, so a method with several
    backward passes (LAKD's local modules) is scaled correctly; all passes share one scale and the gradients
    are unscaled, checked for inf/NaN and stepped once (an overflow in any pass skips the whole step).
    ``backward`` leaves autocast for the backward pass itself, as PyTorch's AMP recipe asks (the backward ops
    still run in the dtypes autocast chose for their forward ops).
    """
    device_type = batch["image"].device.type
    optimizer.zero_grad(set_to_none=True)
    reducer = _reducer(optimizer, params) if overlap else None  # multi-process: reductions overlap the backward
    if reducer is not None:
        reducer.start()

    def backward(loss: torch.Tensor, retain_graph: bool = False) -> None:
        with torch.autocast(device_type=device_type, enabled=False):
            scaler.scale(loss).backward(retain_graph=retain_graph)
        if reducer is not None:
            reducer.backward_done()

    with torch.autocast(device_type=device_type, dtype=amp_dtype, enabled=amp_dtype is not None):
        logits, losses = distiller.train_step(batch, backward)
    if reducer is not None:
        reducer.finish()
    else:
        dist.average_gradients(params)  # the synchronous reference (a no-op in one process)
    scaler.step(optimizer)
    scaler.update()
    return logits, losses
