"""Datasets and loaders: ``build_data(cfg, device, rank, world_size) -> DataBundle`` (see ``build.py``).

Datasets register by name in ``lakd.registry.DATASETS`` (``cifar.py``: cifar10, cifar100; ``digits.py``: digits;
``folder.py``: imagenet, imagefolder); importing their modules here registers them.
"""
from __future__ import annotations

from ..registry import DATASETS
from . import cifar, digits, folder  # noqa: F401  (registration, in the order `data.dataset` lists them)
from .build import DataBundle, build_data, dataset_info, list_datasets
from .transforms import denormalize

__all__ = ["DataBundle", "build_data", "denormalize", "dataset_info", "list_datasets", "DATASETS"]
