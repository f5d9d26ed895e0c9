"""The torch DataLoader path (image folders, or ``data.fast=false``): worker processes decode and augment
single samples (and make a method's extra views of them, ``views.py``); batches travel as uint8 (pinned when the
device is a GPU) and are normalised on the device.

Determinism: the batch sampler walks the same ``(seed, epoch)`` permutation and rank layout as the in-memory
loader and hands each sample a seed ``mix(seed, epoch, index)``; the dataset seeds torch's RNG with it before
the transforms run, so an augmentation does not depend on which worker (or rank) processes the sample.
"""
from __future__ import annotations

import random

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..errors import LakdError, worker_message
from ..runtime.seeding import mix_seed
from .sampling import batch_positions, epoch_permutation, num_train_batches, shard_bounds
from .transforms import Normalizer, seeded_torch_rng


class TrainBatchSampler(Sampler):
    """Lists of ``(index, sample_seed)`` for one rank; ``set_epoch`` picks the epoch."""

    def __init__(self, n: int, global_batch: int, *, seed: int, rank: int = 0, world_size: int = 1,
                 max_steps: int = 0, shuffle: bool = True):
        self.n = n
        self.global_batch = global_batch
        self.seed = int(seed)
        self.rank = rank
        self.world_size = world_size
        self.max_steps = max_steps
        self.shuffle = shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return num_train_batches(self.n, self.global_batch, self.world_size, self.max_steps)

    def __iter__(self):
        perm = epoch_permutation(self.n, self.seed, self.epoch, self.shuffle).tolist()
        for j in range(len(self)):
            start, end = batch_positions(j, self.n, self.global_batch, self.rank, self.world_size)
            yield [(i, mix_seed(self.seed, self.epoch, i)) for i in perm[start:end]]


class EvalBatchSampler(Sampler):
    """Fixed-order batches of this rank's contiguous shard."""

    def __init__(self, n: int, batch_size: int, rank: int = 0, world_size: int = 1):
        self.start, self.end = shard_bounds(n, rank, world_size)
        self.batch_size = batch_size

    def set_epoch(self, epoch: int) -> None:
        pass

    def __len__(self) -> int:
        return -(-(self.end - self.start) // self.batch_size)

    def __iter__(self):
        for s in range(self.start, self.end, self.batch_size):
            yield [(i, None) for i in range(s, min(s + self.batch_size, self.end))]


class ArrayDataset(Dataset):
    """Samples of an in-memory uint8 NCHW tensor through optional tensor transforms; with ``views`` (a
    ``views.SampleViews``, which then replaces ``transform``) each sample also carries its extra views."""

    def __init__(self, images: torch.Tensor, targets: torch.Tensor, transform=None, views=None):
        self.images = images
        self.targets = targets
        self.transform = transform
        self.views = views

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, key):
        i, seed = key if isinstance(key, tuple) else (key, None)
        img = self.images[i]
        if self.views is not None:
            with seeded_torch_rng(seed):
                img, views = self.views(img)
            return img, int(self.targets[i]), i, views
        if self.transform is not None:
            with seeded_torch_rng(seed):
                img = self.transform(img)
        return img, int(self.targets[i]), i


class FileDataset(Dataset):
    """Samples ``(path, target)`` decoded with PIL (RGB) through torchvision transforms (or, with ``views``, a
    ``views.SampleViews`` that makes the batch image and the extra views)."""

    def __init__(self, samples: list[tuple[str, int]], transform, views=None):
        self.samples = samples
        self.transform = transform
        self.views = views

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key):
        from .folder import open_rgb

        i, seed = key if isinstance(key, tuple) else (key, None)
        path, target = self.samples[i]
        img = open_rgb(path)
        with seeded_torch_rng(seed):
            if self.views is not None:
                img, views = self.views(img)
                return img, target, i, views
            img = self.transform(img)
        return img, target, i


def collate(items):
    """``(images, targets, indices)``, and a tuple of stacked views when the samples carry them."""
    images, targets, indices, *views = zip(*items)
    out = (torch.stack(images), torch.tensor(targets, dtype=torch.int64), torch.tensor(indices, dtype=torch.int64))
    if views:
        out += (tuple(torch.stack(v) for v in zip(*views[0])),)
    return out


def _worker_init(worker_id: int) -> None:
    s = torch.initial_seed() % (2**32)
    random.seed(s)
    np.random.seed(s)


class TorchLoader:
    """A DataLoader over one of the batch samplers above, yielding ``{"image", "target", "index"}`` on device, and
    ``"views": {name: images}`` when the dataset makes views (``view_names`` in the dataset's order)."""

    def __init__(self, dataset: Dataset, batch_sampler, normalizer: Normalizer, *, num_workers: int = 0,
                 pin_memory: bool = True, persistent_workers: bool = True, prefetch_factor: int = 4, seed: int = 0,
                 view_names: tuple[str, ...] = ()):
        self.sampler = batch_sampler
        self.view_names = tuple(view_names)
        self.normalizer = normalizer
        self.device = normalizer.device
        workers = max(int(num_workers or 0), 0)
        kwargs = {}
        if workers > 0:
            kwargs = {"persistent_workers": bool(persistent_workers), "prefetch_factor": max(int(prefetch_factor), 1),
                      "worker_init_fn": _worker_init}
        self.loader = DataLoader(dataset, batch_sampler=batch_sampler, num_workers=workers, collate_fn=collate,
                                 pin_memory=bool(pin_memory) and self.device.type == "cuda",
                                 generator=torch.Generator().manual_seed(mix_seed(seed, -1)), **kwargs)
        self.batch_size = getattr(batch_sampler, "batch_size", None) or (
            batch_sampler.global_batch // batch_sampler.world_size)

    @property
    def num_samples(self) -> int:
        s = self.sampler
        return s.end - s.start if isinstance(s, EvalBatchSampler) else s.n

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self):
        try:
            for images, targets, indices, *views in self.loader:
                batch = {"image": self.normalizer(images),
                         "target": targets.to(self.device, non_blocking=True),
                         "index": indices.to(self.device, non_blocking=True)}
                if views:
                    batch["views"] = {n: self.normalizer(v) for n, v in zip(self.view_names, views[0])}
                yield batch
        except LakdError as e:  # raised in a worker: keep the one-line message, drop the worker traceback
            raise LakdError(worker_message(e)) from None

