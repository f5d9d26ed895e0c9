"""One optimisation step, shared by the trainer and the benchmarks."""
from __future__ import annotations

import torch

from ..runtime import distributed as dist


def training_step(distiller, optimizer, scaler, batch: dict, params, amp_dtype=None):
    """zero_grad -> the method's forward/backward passes (under autocast) -> gradient all-reduce -> step.

    The method receives ``backward(loss)`` which applies the fp16 loss scale, so a method with several
    backward passes (LAKD's local modules) is scaled correctly; all passes share one scale and the gradients
    are unscaled, checked for inf/NaN and stepped once (an overflow in any pass skips the whole step).
    ``backward`` leaves autocast for the backward pass itself, as PyTorch's AMP recipe asks (the backward ops
    still run in the dtypes autocast chose for their forward ops).
    """
    device_type = batch["image"].device.type
    optimizer.zero_grad(set_to_none=True)

    def backward(loss: torch.Tensor) -> None:
        with torch.autocast(device_type=device_type, enabled=False):
            scaler.scale(loss).backward()

    with torch.autocast(device_type=device_type, dtype=amp_dtype, enabled=amp_dtype is not None):
        logits, losses = distiller.train_step(batch, backward)
    dist.average_gradients(params)
    scaler.step(optimizer)
    scaler.update()
    return logits, losses
