"""The per-sample CIFAR pipeline of the field's reference loops, shared by the benchmarks that time against it."""
from __future__ import annotations

import numpy as np
from torch.utils.data import Dataset


class TorchvisionCIFAR(Dataset):
    """What ``torchvision.datasets.CIFAR10`` does per sample: an HWC uint8 array -> one PIL image -> the
    transforms. (torchvision's own class also checks the archive's md5 sums, which this machine's copy fails.)"""

    def __init__(self, images_hwc: np.ndarray, targets: list[int], transform):
        self.data = images_hwc
        self.targets = targets
        self.transform = transform

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        from PIL import Image

        return self.transform(Image.fromarray(self.data[i])), self.targets[i]
