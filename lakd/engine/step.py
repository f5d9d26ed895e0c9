"""One optimisation step, shared by the trainer and the benchmarks, and the multi-process set-up it runs in."""
from __future__ import annotations

import torch

from ..errors import LakdError
from ..runtime import distributed as dist


def prepare_distributed(distiller, device: torch.device) -> list[torch.nn.Module]:
    """Under torchrun: wrap each of the distiller's backward-pass groups (``Distiller.trainable_groups``) in
    ``DistributedDataParallel`` (``runtime.distributed.data_parallel``) and route the method's passes through
    them (``Distiller.use_group_wrappers``). Returns the wrappers ([] in one process, where nothing changes).

    A group without a trainable parameter runs unwrapped. A parameter in two groups would be reduced twice
    per step: a LakdError (the method's ``trainable_groups`` must partition its parameters)."""
    if not dist.is_enabled():
        return []
    groups = distiller.trainable_groups()
    seen: dict[int, int] = {}
    for i, g in enumerate(groups):
        for p in g.parameters():
            if id(p) in seen and seen[id(p)] != i:
                raise LakdError(f"method {distiller.name}: a parameter belongs to backward groups {seen[id(p)]} and "
                                f"{i} (trainable_groups must give each parameter to one group)")
            seen[id(p)] = i
    wrappers = [dist.data_parallel(g, device) if any(p.requires_grad for p in g.parameters()) else g
                for g in groups]
    distiller.use_group_wrappers(wrappers)
    return wrappers


def training_step(distiller, optimizer, scaler, batch: dict, amp_dtype=None):
    """zero_grad -> the method's forward/backward passes (under autocast) -> step.

    Under torchrun the gradients are averaged during the backward passes by the DistributedDataParallel
    wrappers that ``prepare_distributed`` installed (one per backward pass).

    The method receives ``backward(loss)`` which applies the fp16 loss scale, so a method with several
    backward passes (LAKD's local modules) is scaled correctly; all passes share one scale and the gradients
    are unscaled, checked for inf/NaN and stepped once (an overflow in any pass skips the whole step, on every
    rank alike: the checked gradients are the averaged ones). ``backward`` leaves autocast for the backward
    pass itself, as PyTorch's AMP recipe asks (the backward ops still run in the dtypes autocast chose for
    their forward ops).
    """
    device_type = batch["image"].device.type
    optimizer.zero_grad(set_to_none=True)

    def backward(loss: torch.Tensor, retain_graph: bool = False) -> None:
        with torch.autocast(device_type=device_type, enabled=False):
            scaler.scale(loss).backward(retain_graph=retain_graph)

    with torch.autocast(device_type=device_type, dtype=amp_dtype, enabled=amp_dtype is not None):
        logits, losses = distiller.train_step(batch, backward)
    scaler.step(optimizer)
    scaler.update()
    return logits, losses
