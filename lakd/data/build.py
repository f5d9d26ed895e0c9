"""``build_data(cfg, device, rank, world_size) -> DataBundle``: the registered dataset of ``cfg["data"]`` and this
rank's train and test loaders.

Loaders yield ``{"image": float32 normalised NCHW on device, "target": int64, "index": int64 dataset index}``;
``len(loader)`` is the number of batches per epoch and ``loader.set_epoch(e)`` selects the epoch (the train
order and augmentation are a pure function of ``(cfg seed, e)``; the test loader is fixed and unaugmented).
With ``views`` (a method's ``{name: spec}``, ``views.py``), training batches also carry ``"views": {name: images}``,
each sample's views made per sample from its stored image.

Two loader implementations:

- the in-memory fast path (``fast.py``; default for CIFAR and digits): the uint8 dataset is one tensor on the
  device, batches are gathered, augmented and normalised there;
- the torch DataLoader path (``loader.py``; image folders, or ``data.fast=false``): workers decode and
  augment samples with torchvision transforms, uint8 batches are normalised on the device.

Datasets register by name (``lakd.registry.DATASETS``) with their defaults; see ``cifar.py``, ``digits.py`` and
``folder.py``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import LakdError
from ..registry import DATASETS
from .sampling import check_world, subset_indices
from .transforms import CropFlip, Normalizer, ResizedCropFlip, _as_stats, resize_size
from .views import BatchViews, SampleViews, check_views, parse_views

CIFAR_PAD = 4


@dataclass
class DataBundle:
    train: Any
    test: Any
    num_classes: int
    num_train: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    image_size: int
    class_names: list[str] = field(default_factory=list)
    dataset: str = ""
    num_test: int = 0
    fast: bool = False
    #: the test set's size before ``data.test_subset`` (equal to ``num_test`` without a subset)
    num_test_total: int = 0
    #: the extra views the training batches carry (``batch["views"]``), in declaration order
    views: tuple[str, ...] = ()


def list_datasets() -> list[str]:
    return DATASETS.names()


def dataset_info(name: str) -> dict[str, Any]:
    """Defaults of a dataset (mean, std, size, kind, num_classes) without loading it.

    ``kind`` is "array" (in memory by default) or "folder" (an ImageFolder tree); ``num_classes`` is None for
    folders whose classes are their sub-folders."""
    return DATASETS.info(name)


def _fast_flag(value, kind: str) -> bool:
    if isinstance(value, str):
        v = value.strip().lower()
        if v == "auto":
            return kind == "array"
        if v in ("true", "yes", "on", "1"):
            return True
        if v in ("false", "no", "off", "0"):
            return False
    elif isinstance(value, bool) or value is None:
        return bool(value) if value is not None else kind == "array"
    raise LakdError(f"data.fast must be auto, true or false, got {value!r}")


def _check_memory(nbytes: int, device: torch.device) -> None:
    """Refuse an in-memory dataset that cannot fit (the user forced data.fast=true on a big folder)."""
    try:
        if device.type == "cuda":
            free = torch.cuda.mem_get_info(device)[0]
        else:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, RuntimeError, AttributeError):
        return
    if nbytes > 0.7 * free:
        raise LakdError(f"the in-memory loader would hold {nbytes / 2**30:.1f} GiB of images but only "
                        f"{free / 2**30:.1f} GiB is free on {device}; set data.fast=false")


def _subset(split, k: int):
    idx = subset_indices(len(split.targets) if hasattr(split, "targets") else len(split), k)
    if idx is None:
        return split
    if isinstance(split, list):
        return [split[i] for i in idx.tolist()]
    return type(split)(split.images[idx], split.targets[idx])


def _load(name: str, d: dict):
    """``(train, test, class_names)``: ArraySplits, or sample lists for folders on the DataLoader path."""
    return DATASETS.get(name)(name, d)


def build_data(cfg: dict, device, rank: int = 0, world_size: int = 1, views: dict | None = None) -> DataBundle:
    """Load ``cfg["data"]["dataset"]`` and build this rank's train and test loaders on ``device``.

    ``cfg["solver"]["batch_size"]`` is the global batch: each of the ``world_size`` ranks gets
    ``batch_size / world_size`` images of every global batch (see ``sampling``). ``max_steps_per_epoch > 0``
    caps the train batches per epoch. The test loader gives each rank a contiguous shard of the test set in
    batches of ``cfg["train"]["eval_batch_size"]``. ``data.mean``/``data.std`` (when set) replace the dataset's
    normalisation; ``data.train_subset``/``test_subset`` keep that many evenly spaced images. ``views``: the
    extra views of every training image a method needs (``{name: spec}``, see ``views.py``; the engine passes
    ``Distiller.views(cfg)``), made per sample and carried as ``batch["views"][name]``.
    """
    d = cfg["data"]
    name = str(d["dataset"]).lower()
    info = dataset_info(name)
    kind = info["kind"]
    device = torch.device(device)
    global_batch = cfg["solver"]["batch_size"]
    check_world(global_batch, rank, world_size)
    eval_batch = int(cfg["train"].get("eval_batch_size") or global_batch)
    if eval_batch < 1:
        raise LakdError(f"train.eval_batch_size must be a positive integer, got {eval_batch!r}")
    max_steps = int(cfg["solver"].get("max_steps_per_epoch") or 0)
    seed = int(cfg.get("seed") or 0)
    # only an explicit true: `auto` is resolved per model family in lakd.engine.build (the trainer converts batches)
    channels_last = cfg["train"].get("channels_last") is True
    augment = bool(d.get("augment", True))
    fast = _fast_flag(d.get("fast", "auto"), kind)
    size = int(d.get("image_size") or 0) or info["size"]
    if size < 1:
        raise LakdError(f"data.image_size must be a positive integer (or 0 for the default), got {size}")
    mean = _as_stats(d["mean"], "mean") if d.get("mean") is not None else tuple(info["mean"])
    std = _as_stats(d["std"], "std") if d.get("std") is not None else tuple(info["std"])

    specs = parse_views(views)
    train, test, class_names = _load(name, d)
    num_test_total = len(test.targets) if kind == "array" else len(test)
    train = _subset(train, int(d.get("train_subset") or 0))
    test = _subset(test, int(d.get("test_subset") or 0))
    num_classes = len(class_names)
    num_train = len(train.targets) if kind == "array" else len(train)
    num_test = len(test.targets) if kind == "array" else len(test)
    if world_size > 1 and num_train < global_batch:
        raise LakdError(f"the training set has {num_train} images, fewer than one global batch "
                        f"(solver.batch_size={global_batch}) across {world_size} processes; use a smaller batch")

    norm = Normalizer(mean, std, device, channels_last=channels_last, size=size)
    if specs:
        shape = (3, size, size) if kind == "folder" else tuple(train.images.shape[1:])
        check_views(specs, *shape)
    if fast:
        from .fast import FastEvalLoader, FastTrainLoader

        crop = None
        if kind == "folder":  # decode once: shorter side -> resize_size(size), centre square
            from .folder import decode_all

            stored = resize_size(size)
            _check_memory(3 * stored * stored * (num_train + num_test), device)
            workers = int(d.get("num_workers") or 0)
            train, test = decode_all(train, stored, workers), decode_all(test, stored, workers)
            aug = ResizedCropFlip(size) if augment else None
            crop = size
            train_x = train.images.to(device)
            train_loader = FastTrainLoader(train_x if augment else _center(train_x, size), train.targets.to(device),
                                           global_batch=global_batch, seed=seed, normalizer=norm, augment=aug,
                                           rank=rank, world_size=world_size, max_steps=max_steps,
                                           views=BatchViews(specs, aug) if specs else None)
        else:
            _check_memory(train.images.numel() + test.images.numel(), device)
            native = int(train.images.shape[-1])
            aug = CropFlip(pad=max(1, round(CIFAR_PAD * native / 32))) if augment else None
            train_loader = FastTrainLoader(train.images.to(device), train.targets.to(device),
                                           global_batch=global_batch, seed=seed, normalizer=norm, augment=aug,
                                           rank=rank, world_size=world_size, max_steps=max_steps,
                                           views=BatchViews(specs, aug) if specs else None)
        test_loader = FastEvalLoader(test.images.to(device), test.targets.to(device), batch_size=eval_batch,
                                     normalizer=norm, rank=rank, world_size=world_size, crop=crop)
    else:
        from .loader import ArrayDataset, EvalBatchSampler, FileDataset, TorchLoader, TrainBatchSampler
        from .transforms import cifar_transforms, folder_transforms

        if kind == "folder":
            sample_views = SampleViews(specs, "folder", augment, size=size) if specs else None
            train_ds = FileDataset(train, folder_transforms(size, augment), views=sample_views)
            test_ds = FileDataset(test, folder_transforms(size, False))
        else:
            native = int(train.images.shape[-1])
            pad = max(1, round(CIFAR_PAD * native / 32))
            sample_views = SampleViews(specs, "array", augment, pad=pad) if specs else None
            train_ds = ArrayDataset(train.images, train.targets, cifar_transforms(native, augment, pad),
                                    views=sample_views)
            test_ds = ArrayDataset(test.images, test.targets, None)
        opts = {"num_workers": d.get("num_workers", 0), "pin_memory": d.get("pin_memory", True),
                "persistent_workers": d.get("persistent_workers", True),
                "prefetch_factor": d.get("prefetch_factor", 4), "seed": seed}
        train_loader = TorchLoader(
            train_ds, TrainBatchSampler(num_train, global_batch, seed=seed, rank=rank, world_size=world_size,
                                        max_steps=max_steps), norm, view_names=tuple(v.name for v in specs), **opts)
        test_loader = TorchLoader(test_ds, EvalBatchSampler(num_test, eval_batch, rank, world_size), norm, **opts)

    return DataBundle(train=train_loader, test=test_loader, num_classes=int(num_classes), num_train=num_train,
                      mean=tuple(mean), std=tuple(std), image_size=size, class_names=list(class_names),
                      dataset=name, num_test=num_test, fast=fast, num_test_total=num_test_total,
                      views=tuple(v.name for v in specs))


def _center(x: torch.Tensor, size: int) -> torch.Tensor:
    from .transforms import center_crop

    return center_crop(x, size).contiguous()

