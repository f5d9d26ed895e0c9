"""scikit-learn's bundled 8x8 handwritten digits as a tiny CIFAR-like dataset (no download).

Images are upsampled to 32x32 (bilinear), scaled from 0..16 to 0..255, repeated over 3 channels and stored as
uint8; the split is a fixed stratified one (1437 train / 360 test, seed 0, independent of the run's seed so
that every run and every teacher sees the same test images).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..registry import DATASETS
from .cifar import ArraySplit

DIGITS_TEST = 360
DIGITS_SPLIT_SEED = 0
DIGITS_SIZE = 32
#: per-channel mean/std of the training split in [0, 1] (``digits_stats`` recomputes them; tests check it)
DIGITS_MEAN = (0.3054, 0.3054, 0.3054)
DIGITS_STD = (0.3237, 0.3237, 0.3237)


def load_digits(size: int = DIGITS_SIZE):
    """``(train, test, class_names)``."""
    from sklearn.datasets import load_digits as sk_digits
    from sklearn.model_selection import train_test_split

    bunch = sk_digits()
    x = torch.from_numpy(bunch.images).float()[:, None] * (255.0 / 16.0)  # (1797, 1, 8, 8)
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    images = x.round_().clamp_(0, 255).to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    targets = torch.from_numpy(bunch.target).long()
    tr, te = train_test_split(torch.arange(len(targets)).numpy(), test_size=DIGITS_TEST,
                              stratify=bunch.target, random_state=DIGITS_SPLIT_SEED)
    tr, te = torch.from_numpy(tr).sort().values, torch.from_numpy(te).sort().values
    names = [str(i) for i in range(10)]
    return ArraySplit(images[tr], targets[tr]), ArraySplit(images[te], targets[te]), names


def digits_stats(train: ArraySplit) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean/std of the training images in [0, 1]."""
    x = train.images.double() / 255.0
    mean = x.mean(dim=(0, 2, 3))
    std = x.std(dim=(0, 2, 3), unbiased=False)
    return tuple(round(float(v), 4) for v in mean), tuple(round(float(v), 4) for v in std)


@DATASETS.register("digits", mean=DIGITS_MEAN, std=DIGITS_STD, size=DIGITS_SIZE, kind="array", num_classes=10)
def _load_registered(name: str, d: dict):
    return load_digits()
