"""Multi-process training (torchrun) helpers: process group set-up, gradient and metric reduction.

Gradients are averaged by ``GradReducer``: bucketed asynchronous all-reduces started from gradient hooks while
the backward passes go on (however many: LAKD backwards once per local module, and each module's buckets are
reduced while the next module computes). This keeps every local module's gradients synchronised exactly once
per step without one DDP wrapper per module, and works the same for methods with extra parts (connectors,
embeddings). ``average_gradients`` is the synchronous form (after all backward passes), kept as the reference
and the fallback.

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
import re
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


#: a CPU (gloo) group beside the training group, used only to find out which rank stopped answering
_monitor = None


def init_from_env(device_kind: str, timeout_s: float = 600.0) -> DistInfo:
    """Initialise the process group when launched by torchrun (WORLD_SIZE > 1 in the environment).

    ``timeout_s`` bounds every collective: a rank that stops answering (hung, stopped, dead) makes the others
    fail after that long instead of PyTorch's default 30 minutes; ``unresponsive_ranks`` then names it."""
    global _monitor
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not tdist.is_initialized():
        backend = "nccl" if device_kind == "cuda" else "gloo"
        if device_kind == "cuda":
            torch.cuda.set_device(local_rank)
        timeout = datetime.timedelta(seconds=float(timeout_s))
        tdist.init_process_group(backend=backend, timeout=timeout)
        _monitor = tdist.new_group(backend="gloo", timeout=timeout)
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank)


def unresponsive_ranks(wait_s: float) -> list[int] | None:
    """After a collective failed: the ranks that do not reach a ``monitored_barrier`` (gloo) within ``wait_s``.

    On rank 0 these are the ranks that stopped answering; on another rank, ``[0]`` when rank 0 does not answer.
    ``[]`` when every rank answers (the failure was something else); None when it cannot be told."""
    if _monitor is None:
        return None
    try:
        tdist.monitored_barrier(group=_monitor, timeout=datetime.timedelta(seconds=float(wait_s)),
                                wait_all_ranks=True)
        return []
    except RuntimeError as e:
        m = re.search(r"Ranks? ([\d, ]+) failed to pass monitoredBarrier", str(e))
        if m:
            return [int(x) for x in re.findall(r"\d+", m.group(1))]
        return [0] if tdist.get_rank() != 0 else None


def cleanup() -> None:
    global _monitor
    if tdist.is_available() and tdist.is_initialized():
        tdist.destroy_process_group()
    _monitor = None


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


class GradReducer:
    """Gradient averaging that overlaps the backward passes: bucketed all-reduces started from gradient hooks.

    Every trainable parameter gets a post-accumulate-grad hook. The first step records the order in which the
    gradients become ready (rank 0's order is broadcast, so every rank issues the same collectives in the same
    order) and which ``backward`` call produced each, and is reduced after the step like ``average_gradients``.
    From then on the parameters are bucketed in that order (a bucket never spans two backward calls, and holds
    at most ``bucket_bytes``); as soon as the gradients of a bucket and of every bucket before it are ready, the
    bucket is flattened and its all-reduce started asynchronously, while autograd goes on with the rest of the
    backward (PyTorch DDP's scheme). With LAKD's local backward this reduces module k's gradients while module
    k+1 computes. ``finish`` waits for the reductions, starts those of buckets never completed (a parameter
    without a gradient contributes zeros, so every rank takes part in every all-reduce), and writes the averages
    back. Values are those of ``average_gradients`` (elementwise sums of the same numbers). If a parameter's
    gradient is accumulated again after its bucket was launched (a method backpropagating into the same
    parameter twice), the step falls back to the synchronous reduction, so the result stays right.

    Written here rather than wrapping the model in ``torch.nn.parallel.DistributedDataParallel``: DDP hooks one
    forward per backward and would need ``find_unused_parameters`` and no_sync juggling for methods with several
    backward passes (LAKD), whose modules must each be reduced once per step.
    """

    def __init__(self, params, bucket_bytes: int = 2**20):
        self.params = [p for p in params if p.requires_grad]
        self.bucket_bytes = bucket_bytes
        self.index = {id(p): i for i, p in enumerate(self.params)}
        self.buckets: list[list[int]] | None = None  # parameter indices per bucket (after the first step)
        self.bucket_of: dict[int, int] = {}
        self._order: list[tuple[int, int]] = []  # first step: (parameter index, backward call) in ready order
        self._handles = [p.register_post_accumulate_grad_hook(self._hook) for p in self.params]
        self.active = False

    # ----- per step -------------------------------------------------------------------------------------------
    def start(self) -> None:
        self.active = True
        self.calls = 0
        self.ready: set[int] = set()
        self.missing = [len(b) for b in self.buckets] if self.buckets is not None else None
        self.next_bucket = 0
        self.works: list[tuple[int, torch.Tensor, object]] = []
        self.fallback = False
        self.launch_calls: list[int] = []  # backward calls completed when each bucket was launched (overlap)

    def backward_done(self) -> None:
        """Called after each ``backward`` of the step (the boundaries between LAKD's modules)."""
        self.calls += 1

    def _hook(self, p: torch.Tensor) -> None:
        if not self.active:
            return
        i = self.index[id(p)]
        if i in self.ready:  # accumulated again this step
            if self.buckets is not None and self.bucket_of[i] < self.next_bucket:
                self.fallback = True
            return
        self.ready.add(i)
        if self.buckets is None:
            self._order.append((i, self.calls))
            return
        self.missing[self.bucket_of[i]] -= 1
        self._launch_ready()

    def _launch_ready(self) -> None:
        while self.next_bucket < len(self.buckets) and self.missing[self.next_bucket] == 0 and not self.fallback:
            self._launch(self.next_bucket)
            self.next_bucket += 1

    def _launch(self, b: int) -> None:
        grads = []
        for i in self.buckets[b]:
            p = self.params[i]
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grads.append(p.grad.reshape(-1))
        flat = torch.cat(grads)
        self.launch_calls.append(self.calls)
        self.works.append((b, flat, tdist.all_reduce(flat, op=tdist.ReduceOp.SUM, async_op=True)))

    def finish(self) -> None:
        """Wait for (and complete) the reductions and write the averaged gradients back."""
        self.active = False
        if self.buckets is None or self.fallback:
            for _, _, work in self.works:
                work.wait()
            if self.buckets is None:
                self._build_buckets()
            average_gradients(self.params)
            return
        while self.next_bucket < len(self.buckets):
            self._launch(self.next_bucket)
            self.next_bucket += 1
        world = tdist.get_world_size()
        for b, flat, work in self.works:
            work.wait()
            flat /= world
            offset = 0
            for i in self.buckets[b]:
                g = self.params[i].grad
                g.copy_(flat[offset: offset + g.numel()].view_as(g))
                offset += g.numel()

    def _build_buckets(self) -> None:
        order = broadcast_object(self._order)  # rank 0's order: the same collectives, in the same order
        seen = {i for i, _ in order}
        order = order + [(i, -1) for i in range(len(self.params)) if i not in seen]  # never got a gradient
        buckets, cur, size, call, dtype = [], [], 0, None, None
        for i, c in order:
            p = self.params[i]
            nbytes = p.numel() * p.element_size()
            if cur and (c != call or p.dtype != dtype or size + nbytes > self.bucket_bytes):
                buckets.append(cur)
                cur, size = [], 0
            cur.append(i)
            size += nbytes
            call, dtype = c, p.dtype
        if cur:
            buckets.append(cur)
        self.buckets = buckets
        self.bucket_of = {i: b for b, idx in enumerate(buckets) for i in idx}

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


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
