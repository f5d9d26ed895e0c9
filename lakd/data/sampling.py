"""Epoch orders and rank shards shared by the in-memory loader and the DataLoader path.

Everything random about an epoch is a pure function of ``(seed, epoch)``: a CPU ``torch.Generator`` is seeded
from the pair (never the global RNG), so a resumed run and every DDP rank see exactly the same epoch.

Distributed layout (``world`` processes, global batch ``B``): every rank draws the same global permutation;
global batch ``j`` is ``perm[j*B:(j+1)*B]`` and rank ``r`` takes the contiguous slice ``[r*B/W, (r+1)*B/W)`` of
it, so concatenating the ranks' batches gives the single-process batch. The last incomplete global batch is
kept with one process and dropped with several (ranks must step together with equal batches).
"""
from __future__ import annotations

import torch

from ..errors import LakdError
from ..runtime.seeding import mix_seed


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The CPU generator that drives epoch ``epoch``: permutation first, then augmentation parameters."""
    return torch.Generator().manual_seed(mix_seed(seed, epoch))


def epoch_permutation(n: int, seed: int, epoch: int, shuffle: bool = True,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    if not shuffle:
        return torch.arange(n)
    g = generator if generator is not None else epoch_generator(seed, epoch)
    return torch.randperm(n, generator=g)


def check_world(global_batch: int, rank: int, world: int) -> int:
    """Validate the process layout; return the per-rank batch size."""
    if not isinstance(world, int) or world < 1:
        raise LakdError(f"world_size must be a positive integer, got {world!r}")
    if not isinstance(rank, int) or not 0 <= rank < world:
        raise LakdError(f"rank {rank!r} is outside 0..{world - 1} for world_size={world}")
    if not isinstance(global_batch, int) or global_batch < 1:
        raise LakdError(f"solver.batch_size must be a positive integer, got {global_batch!r}")
    if global_batch % world:
        lo = global_batch // world * world or world
        raise LakdError(f"solver.batch_size={global_batch} (the global batch) is not divisible by the "
                        f"{world} processes; use a multiple of {world}, e.g. solver.batch_size={lo}")
    return global_batch // world


def num_train_batches(n: int, global_batch: int, world: int, max_steps: int = 0) -> int:
    """Batches per training epoch (per rank; every rank steps the same number of times)."""
    count = n // global_batch if world > 1 else -(-n // global_batch)
    if max_steps and max_steps > 0:
        count = min(count, int(max_steps))
    return count


def batch_positions(j: int, n: int, global_batch: int, rank: int, world: int) -> tuple[int, int]:
    """Positions ``[start, end)`` in the epoch permutation that rank ``rank`` uses for global batch ``j``."""
    start = j * global_batch
    if world == 1:
        return start, min(start + global_batch, n)
    per = global_batch // world
    return start + rank * per, start + (rank + 1) * per


def shard_bounds(n: int, rank: int, world: int) -> tuple[int, int]:
    """Contiguous shard ``[start, end)`` of ``n`` items for ``rank`` (sizes differ by at most one)."""
    return rank * n // world, (rank + 1) * n // world


def subset_indices(n: int, k: int) -> torch.Tensor | None:
    """``k`` evenly spaced indices of ``range(n)`` (``None``: keep everything).

    Evenly spaced rather than the first ``k`` so that class-sorted sets (the shared CIFAR-10 test set, image
    folders) keep every class.
    """
    if not k or k <= 0 or k >= n:
        return None
    return torch.arange(k, dtype=torch.int64) * n // k
