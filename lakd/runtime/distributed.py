"""Multi-process training (torchrun) helpers: process group set-up, gradient and metric reduction.

Gradients are averaged by PyTorch's ``DistributedDataParallel`` (``data_parallel``), one instance per backward
pass of a step (``Distiller.trainable_groups``, wrapped by ``lakd.engine.step.prepare_distributed``): methods
with one backward get one over the student and the method's extra parts; LAKD one per local module, so each
module's backward starts its own bucketed, overlapped reduction and every module's gradients are averaged
exactly once per step.

What is per rank and what is shared (``W`` processes, global batch ``B``, see ``lakd.data.sampling``):

- parameters: broadcast from rank 0 at the start, then moved by identical averaged gradients, so they stay
  bitwise identical on every rank;
- BatchNorm: each rank normalises its ``B/W`` images with their own statistics (PyTorch DDP without
  SyncBatchNorm); the running statistics drift apart during an epoch and are averaged over the ranks at the
  end of it (``average_norm_buffers``), before evaluation and checkpoints, so every rank evaluates and saves the
  same model. ``train.sync_bn=true`` uses ``torch.nn.SyncBatchNorm`` (CUDA only: PyTorch's implementation
  refuses CPU tensors, so on CPU it is a ``LakdError``);
- other state (CRD's memory banks) is kept identical by the method itself (it gathers the batch from all ranks);
- metrics: sums all-reduced; only rank 0 writes files.
"""
from __future__ import annotations

import datetime
import os
import signal
import threading
import time
from dataclasses import dataclass

import torch
import torch.distributed as tdist

from ..errors import LakdError


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


#: the process group's rendezvous store (torchrun's agent hosts it; without torchrun, rank 0's process), where
#: the ranks that survive a failed collective check in, so that each can name the ranks that did not
_store = None


def split_timeout(timeout_s: float) -> tuple[float, float]:
    """``train.dist_timeout_s`` split into (how long a collective waits, how long the ranks then wait for each
    other to check in): a lost rank is named within the whole ``timeout_s``. The check-in gets a fifth of it,
    at least 1 s and at most 60 s."""
    check_in = min(max(0.2 * float(timeout_s), 1.0), 60.0)
    return max(float(timeout_s) - check_in, 1.0), check_in


def init_from_env(device_kind: str, timeout_s: float = 600.0) -> DistInfo:
    """Initialise the process group when launched by torchrun (WORLD_SIZE > 1 in the environment).

    ``timeout_s`` bounds how long a rank waits for the others: a rank that stops answering (hung, stopped, dead)
    makes a collective fail after most of it (``split_timeout``) instead of PyTorch's default 30 minutes, and
    ``unresponsive_ranks`` names it in the rest."""
    global _store
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not tdist.is_initialized():
        backend = "nccl" if device_kind == "cuda" else "gloo"
        if device_kind == "cuda":
            torch.cuda.set_device(local_rank)
        collective, _ = split_timeout(timeout_s)
        tdist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=collective))
        from torch.distributed import distributed_c10d

        _store = distributed_c10d._get_default_store()
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank)


def unresponsive_ranks(wait_s: float, settle_s: float = 5.0) -> list[int] | None:
    """After a collective failed on this rank: the ranks that do not check in within ``wait_s``.

    Every rank that saw the failure writes a key in the rendezvous store and waits for the others' keys; the
    ranks whose keys do not appear are the ones that stopped answering (killed, hung, stopped). The ranks that
    survive see the failure at about the same moment (a dead peer's connection closes at once; a hung one makes
    every collective time out together), so the wait ends when ``settle_s`` pass without a new key, or after
    ``wait_s`` in all. When the store itself is gone (without torchrun it lives in rank 0's process) that is
    rank 0. ``[]`` when every rank checks in (the failure was something else); None when it cannot be told. Under
    torchrun a SIGTERM from its agent (which stops the other ranks when one has died) ends the wait early with
    the ranks missing by then."""
    if _store is None or not tdist.is_initialized():
        return None
    rank, world = tdist.get_rank(), tdist.get_world_size()
    prefix = f"lakd_check_in/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    stopping: list[int] = []
    old = None
    if threading.current_thread() is threading.main_thread():
        old = signal.signal(signal.SIGTERM, lambda signum, frame: stopping.append(signum))
    try:
        try:
            _store.set(f"{prefix}/{rank}", "1")
        except Exception:  # the store's process is gone: without torchrun, that is rank 0
            return [0] if rank != 0 else None
        start = last_change = time.monotonic()
        seen = world + 1
        while True:
            try:
                missing = [r for r in range(world) if not _store.check([f"{prefix}/{r}"])]
            except Exception:
                return [0] if rank != 0 else None
            now = time.monotonic()
            if len(missing) < seen:
                seen, last_change = len(missing), now
            if not missing or stopping or now - start >= wait_s or now - last_change >= min(settle_s, wait_s):
                return missing
            time.sleep(0.05)
    finally:
        if old is not None:
            signal.signal(signal.SIGTERM, old)


def cleanup() -> None:
    global _store
    if tdist.is_available() and tdist.is_initialized():
        tdist.destroy_process_group()
    _store = None


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if is_enabled():
        t = t.clone()
        tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
    return t


def barrier() -> None:
    if is_enabled():
        tdist.barrier()


def data_parallel(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``module`` (one backward pass's parameters, see ``Distiller.trainable_groups``) in PyTorch's
    ``DistributedDataParallel``: its gradients are averaged over the ranks in buckets whose all-reduces start
    from the backward pass itself, as soon as each bucket is ready.

    - ``broadcast_buffers=False`` (``forward_sync_buffers`` in newer PyTorch): the buffers are not overwritten by rank 0's at every forward. BatchNorm
      statistics are averaged over the ranks at the end of each epoch instead (``average_norm_buffers``), and
      CRD's memory banks are kept identical by the method (it gathers every rank's batch), so no bank is sent
      at every step;
    - ``init_sync=False``: the trainer has already broadcast rank 0's whole distiller (``broadcast_module``);
    - ``gradient_as_bucket_view=True``: the gradients are views of the reduction buckets (no copy back);
    - ``find_unused_parameters=False``: every parameter of a group gets a gradient in its pass (a group is
      built from the parameters the pass uses).
    """
    import inspect

    ddp = torch.nn.parallel.DistributedDataParallel
    kw = {"device_ids": [device.index if device.index is not None else torch.cuda.current_device()]} \
        if device.type == "cuda" else {}
    # newer PyTorch names the per-forward buffer sync forward_sync_buffers (broadcast_buffers is deprecated)
    no_sync = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(ddp).parameters \
        else "broadcast_buffers"
    kw[no_sync] = False
    return ddp(module, init_sync=False, gradient_as_bucket_view=True, find_unused_parameters=False, **kw)


def broadcast_module(module: torch.nn.Module, src: int = 0) -> None:
    """Make every rank hold rank ``src``'s parameters and buffers."""
    if not is_enabled():
        return
    for t in list(module.parameters()) + list(module.buffers()):
        tdist.broadcast(t.data, src=src)


def broadcast_object(obj, src: int = 0):
    """Rank ``src``'s value of a picklable object on every rank (the object itself without DDP)."""
    if not is_enabled():
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Concatenate (dim 0, rank order) a tensor that has the same shape on every rank; no gradient flows."""
    if not is_enabled():
        return t
    t = t.detach().contiguous()
    parts = [torch.empty_like(t) for _ in range(tdist.get_world_size())]
    tdist.all_gather(parts, t)
    return torch.cat(parts, dim=0)


def _norm_buffers(module: torch.nn.Module, skip: tuple[str, ...]) -> list[torch.Tensor]:
    out = []
    for name, m in module.named_modules():
        if skip and name.startswith(skip):
            continue
        if isinstance(m, torch.nn.modules.batchnorm._NormBase) and m.track_running_stats:
            out += [b for b in (m.running_mean, m.running_var) if b is not None and b.is_floating_point()]
    return out


@torch.no_grad()
def average_norm_buffers(module: torch.nn.Module, skip: tuple[str, ...] = ("teacher",)) -> None:
    """Average the running mean/var of every normalisation layer of ``module`` over the ranks (one all-reduce
    per dtype); modules whose name starts with one of ``skip`` are left alone (the frozen teacher)."""
    if not is_enabled():
        return
    world = tdist.get_world_size()
    bufs = _norm_buffers(module, skip)
    for dtype in sorted({b.dtype for b in bufs}, key=str):
        group = [b for b in bufs if b.dtype == dtype]
        flat = torch.cat([b.reshape(-1) for b in group])
        tdist.all_reduce(flat, op=tdist.ReduceOp.SUM)
        flat /= world
        offset = 0
        for b in group:
            b.copy_(flat[offset: offset + b.numel()].view_as(b))
            offset += b.numel()


def convert_sync_batchnorm(module: torch.nn.Module, device: torch.device,
                           skip: tuple[str, ...] = ("teacher",)) -> torch.nn.Module:
    """``train.sync_bn``: replace the BatchNorm layers of ``module``'s children (except ``skip``) by
    ``torch.nn.SyncBatchNorm``. PyTorch's SyncBatchNorm only runs on GPUs, so other devices get a LakdError."""
    if torch.device(device).type != "cuda":
        raise LakdError(f"train.sync_bn=true needs CUDA devices (torch.nn.SyncBatchNorm refuses {device} tensors); "
                        f"set train.sync_bn=false for multi-process training on the CPU")
    for name, child in list(module.named_children()):
        if name not in skip:
            setattr(module, name, torch.nn.SyncBatchNorm.convert_sync_batchnorm(child))
    return module
