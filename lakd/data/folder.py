"""ImageNet or any custom dataset as an ImageFolder tree: ``<root>/train/<class>/*.jpg``,
``<root>/val/<class>/*.jpg`` (classes are the sorted train sub-folders; val uses the same class indices)."""
from __future__ import annotations

import os

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..errors import LakdError, worker_message
from ..registry import DATASETS
from .cifar import ArraySplit

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
IMAGENET_URL = "https://image-net.org/download.php"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _how(name: str) -> str:
    if name == "imagenet":
        return (f"set data.root=<folder holding train/<wnid>/*.JPEG and val/<wnid>/*.JPEG> (ILSVRC2012 from "
                f"{IMAGENET_URL}, val images sorted into class folders)")
    return "set data.root=<folder holding train/<class>/<images> and val/<class>/<images>>"


def _files(folder: str) -> list[str]:
    out = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames.sort()
        out += [os.path.join(dirpath, f) for f in sorted(filenames)
                if f.lower().endswith(IMG_EXTENSIONS) and not f.startswith(".")]
    return out


def _split_dir(root: str, names: tuple[str, ...], dataset: str) -> str:
    for n in names:
        path = os.path.join(root, n)
        if os.path.isdir(path):
            return path
    raise LakdError(f"{dataset} folder {os.path.join(root, names[0])} does not exist; {_how(dataset)}")


def scan_folder(root: str, dataset: str = "imagefolder"):
    """``(train_samples, val_samples, class_names)`` with samples ``[(path, class_index), ...]``."""
    root = os.path.abspath(os.path.expanduser(root))
    if not os.path.isdir(root):
        raise LakdError(f"{dataset} not found: {root} does not exist; {_how(dataset)}")
    train_dir = _split_dir(root, ("train",), dataset)
    val_dir = _split_dir(root, ("val", "test"), dataset)
    classes = sorted(e.name for e in os.scandir(train_dir) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise LakdError(f"{dataset}: {train_dir} has no class sub-folders; expected {train_dir}/<class>/<images>")
    index = {c: i for i, c in enumerate(classes)}
    extra = sorted(e.name for e in os.scandir(val_dir) if e.is_dir() and e.name not in index
                   and not e.name.startswith("."))
    if extra:
        raise LakdError(f"{dataset}: {val_dir} has class folders missing from {train_dir}: {', '.join(extra[:5])}; "
                        f"both splits must use the same class folder names")
    train = [(p, index[c]) for c in classes for p in _files(os.path.join(train_dir, c))]
    val = [(p, index[c]) for c in classes if os.path.isdir(os.path.join(val_dir, c))
           for p in _files(os.path.join(val_dir, c))]
    for split, samples, where in (("train", train, train_dir), ("val", val, val_dir)):
        if not samples:
            raise LakdError(f"{dataset}: no images found under {where} (empty {split} split; looked for "
                            f"{', '.join(IMG_EXTENSIONS)} files in {where}/<class>/)")
    return train, val, classes


def open_rgb(path: str):
    from PIL import Image

    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except Image.DecompressionBombError as e:  # PIL refuses images over 2x its MAX_IMAGE_PIXELS
        raise LakdError(f"image {path} is too large to decode safely ({e}); shrink or remove the file") from None
    except OSError as e:
        raise LakdError(f"cannot read image {path}: {e}; remove or replace the file") from None


class _Decode(Dataset):
    """Shorter side resized to ``size``, centre crop ``size`` x ``size``, uint8 CHW."""

    def __init__(self, samples, size: int):
        from torchvision import transforms as T

        self.samples = samples
        self.tf = T.Compose([T.Resize(size), T.CenterCrop(size), T.PILToTensor()])

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        return self.tf(open_rgb(self.samples[i][0]))


def decode_all(samples, size: int, num_workers: int = 0) -> ArraySplit:
    """Decode a whole split into one uint8 tensor (N, 3, size, size) for the in-memory loader."""
    n = len(samples)
    images = torch.empty((n, 3, size, size), dtype=torch.uint8)
    loader = DataLoader(_Decode(samples, size), batch_size=64, num_workers=max(int(num_workers), 0))
    pos = 0
    try:
        for batch in loader:
            images[pos:pos + len(batch)] = batch
            pos += len(batch)
    except LakdError as e:
        raise LakdError(worker_message(e)) from None
    targets = torch.from_numpy(np.asarray([t for _, t in samples], dtype=np.int64))
    return ArraySplit(images, targets)


def _load_registered(name: str, d: dict):
    return scan_folder(d["root"], name)


DATASETS.register("imagenet", mean=IMAGENET_MEAN, std=IMAGENET_STD, size=224, kind="folder",
                  num_classes=1000)(_load_registered)
DATASETS.register("imagefolder", mean=IMAGENET_MEAN, std=IMAGENET_STD, size=224, kind="folder",
                  num_classes=None)(_load_registered)
