"""Multi-process training (torchrun) helpers: process group set-up, gradient and metric reduction.

Gradients are averaged with one explicit bucketed all-reduce per step over every trainable parameter,
after the method's backward passes (however many: LAKD backwards once per local module). This keeps every
local module's gradients synchronised exactly once per step without one DDP wrapper per module, and works the
same for methods with extra parts (connectors, embeddings).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as tdist


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def is_enabled() -> bool:
    return tdist.is_available() and tdist.is_initialized() and tdist.get_world_size() > 1


def init_from_env(device_kind: str) -> DistInfo:
    """Initialise the process group when launched by torchrun (WORLD_SIZE > 1 in the environment)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not tdist.is_initialized():
        backend = "nccl" if device_kind == "cuda" else "gloo"
        if device_kind == "cuda":
            torch.cuda.set_device(local_rank)
        tdist.init_process_group(backend=backend)
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank)


def cleanup() -> None:
    if tdist.is_available() and tdist.is_initialized():
        tdist.destroy_process_group()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if is_enabled():
        t = t.clone()
        tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
    return t


def barrier() -> None:
    if is_enabled():
        tdist.barrier()


def average_gradients(params, bucket_bytes: int = 25 * 2**20) -> None:
    """Average ``.grad`` of ``params`` over all ranks, in flat buckets (one all-reduce per bucket).

    A parameter without a gradient on this rank contributes zeros, so every rank takes part in every
    all-reduce (no hang when a rank's step skipped a part of the model).
    """
    if not is_enabled():
        return
    world = tdist.get_world_size()
    params = [p for p in params if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    buckets: list[list[torch.Tensor]] = []
    size, cur, cur_dtype = 0, [], None
    for p in params:
        nbytes = p.grad.numel() * p.grad.element_size()
        if cur and (size + nbytes > bucket_bytes or p.grad.dtype != cur_dtype):
            buckets.append(cur)
            cur, size = [], 0
        cur.append(p.grad)
        cur_dtype = p.grad.dtype
        size += nbytes
    if cur:
        buckets.append(cur)
    for grads in buckets:
        flat = torch.cat([g.reshape(-1) for g in grads])
        tdist.all_reduce(flat, op=tdist.ReduceOp.SUM)
        flat /= world
        offset = 0
        for g in grads:
            n = g.numel()
            g.copy_(flat[offset: offset + n].view_as(g))
            offset += n


def broadcast_module(module: torch.nn.Module, src: int = 0) -> None:
    """Make every rank hold rank ``src``'s parameters and buffers."""
    if not is_enabled():
        return
    for t in list(module.parameters()) + list(module.buffers()):
        tdist.broadcast(t.data, src=src)
