"""The in-memory loader: the whole uint8 dataset is one tensor on the training device.

Each batch is an ``index_select`` of that tensor, one batched augmentation (see ``transforms``), and the
normalisation -- no workers, no per-sample Python, no host-to-device copies after the first. A method's extra
views (``views.py``) are made the same way, batched on the device.
"""
from __future__ import annotations

import torch

from .sampling import batch_positions, epoch_generator, epoch_permutation, num_train_batches, shard_bounds
from .transforms import Normalizer, center_crop


class FastTrainLoader:
    """Shuffled, augmented training batches ``{"image", "target", "index"}`` of one rank (and ``"views"``, with
    ``views``: a ``views.BatchViews``).

    Epoch ``e`` (``set_epoch``) is a pure function of ``(seed, e)``: a CPU generator seeded from the pair draws
    the permutation and then the augmentation parameters of every position of the epoch, in permutation order,
    then those of the views.
    """

    def __init__(self, images: torch.Tensor, targets: torch.Tensor, *, global_batch: int, seed: int,
                 normalizer: Normalizer, augment=None, rank: int = 0, world_size: int = 1, max_steps: int = 0,
                 views=None):
        self.images = images
        self.targets = targets
        self.global_batch = global_batch
        self.batch_size = global_batch // world_size
        self.seed = int(seed)
        self.normalizer = normalizer
        self.augment = augment
        self.rank = rank
        self.world_size = world_size
        self.max_steps = max_steps
        self.epoch = 0
        self.device = images.device
        self.views = views

    @property
    def num_samples(self) -> int:
        return int(self.images.shape[0])

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return num_train_batches(self.num_samples, self.global_batch, self.world_size, self.max_steps)

    def plan(self, epoch: int | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
        """The epoch's permutation and augmentation parameters (CPU tensors, indexed by position)."""
        return self._plan(epoch)[:2]

    def _plan(self, epoch: int | None = None):
        epoch = self.epoch if epoch is None else epoch
        g = epoch_generator(self.seed, epoch)
        perm = epoch_permutation(self.num_samples, self.seed, epoch, generator=g)
        params = views = None
        h, w = self.images.shape[-2:]
        if self.augment is not None:
            params = self.augment.sample(self.num_samples, g, h, w)
        if self.views is not None:  # after the batch images' draws: those stay what they are without views
            views = self.views.sample(self.num_samples, g, h, w, params)
        return perm, params, views

    def __iter__(self):
        perm, params, views = self._plan()
        perm = perm.to(self.device)
        if params is not None:
            params = {k: v.to(self.device) for k, v in params.items()}
        if views is not None:
            views = self.views.to_device(views, self.device)
        for j in range(len(self)):
            start, end = batch_positions(j, self.num_samples, self.global_batch, self.rank, self.world_size)
            idx = perm[start:end]
            raw = x = self.images.index_select(0, idx)
            if params is not None:
                x = self.augment.apply(x, {k: v[start:end] for k, v in params.items()})
            batch = {"image": self.normalizer(x), "target": self.targets.index_select(0, idx), "index": idx}
            if views is not None:
                made = self.views.make(raw, x, {n: {k: v[start:end] for k, v in p.items()} for n, p in views.items()})
                batch["views"] = {n: self.normalizer(v) for n, v in made.items()}
            yield batch


class FastEvalLoader:
    """Fixed-order, unaugmented batches of this rank's contiguous shard (``crop``: centre crop size)."""

    def __init__(self, images: torch.Tensor, targets: torch.Tensor, *, batch_size: int, normalizer: Normalizer,
                 rank: int = 0, world_size: int = 1, crop: int | None = None):
        self.start, self.end = shard_bounds(int(images.shape[0]), rank, world_size)
        self.images = images
        self.targets = targets
        self.batch_size = int(batch_size)
        self.normalizer = normalizer
        self.crop = crop
        self.device = images.device

    @property
    def num_samples(self) -> int:
        return self.end - self.start

    def set_epoch(self, epoch: int) -> None:  # fixed order: nothing depends on the epoch
        pass

    def __len__(self) -> int:
        return -(-self.num_samples // self.batch_size)

    def __iter__(self):
        for s in range(self.start, self.end, self.batch_size):
            e = min(s + self.batch_size, self.end)
            x = self.images[s:e]
            if self.crop:
                x = center_crop(x, self.crop)
            idx = torch.arange(s, e, device=self.device)
            yield {"image": self.normalizer(x), "target": self.targets[s:e], "index": idx}
