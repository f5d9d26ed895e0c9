"""CIFAR-10 / CIFAR-100 from the python-pickle release, read by a restricted unpickler (numpy arrays only)."""
from __future__ import annotations

import contextlib
import hashlib
import os
import pickle
import shutil
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import LakdError
from ..registry import DATASETS


@dataclass
class ArraySplit:
    """An in-memory split: uint8 images (N, C, H, W) and int64 targets (N,) on the CPU."""

    images: torch.Tensor
    targets: torch.Tensor


CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]

SPECS = {
    "cifar10": {
        "title": "CIFAR-10", "folder": "cifar-10-batches-py", "num_classes": 10,
        "train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"],
        "meta": "batches.meta", "label_key": "labels", "names_key": "label_names",
        "url": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    },
    "cifar100": {
        "title": "CIFAR-100", "folder": "cifar-100-python", "num_classes": 100,
        "train": ["train"], "test": ["test"],
        "meta": "meta", "label_key": "fine_labels", "names_key": "fine_label_names",
        "url": "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
    },
}

# what a CIFAR pickle may reference: numpy array/dtype reconstruction (and bytes), nothing else
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),  # the last: bytes in protocol-2 pickles
}


_NUMPY2 = int(np.__version__.split(".")[0]) >= 2


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        if module.startswith("numpy.core.") and _NUMPY2:  # numpy 2 moved these to numpy._core
            module = "numpy._core." + module[len("numpy.core."):]
        return super().find_class(module, name)


def _text(v):
    return v.decode("latin1") if isinstance(v, bytes) else v


def read_pickle(path: str) -> dict:
    """A CIFAR pickle as a dict with str keys (files written with str or bytes keys both work)."""
    try:
        with open(path, "rb") as f:
            obj = _SafeUnpickler(f, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError, IndexError,
            KeyError, MemoryError) as e:
        raise LakdError(f"{path} is not a readable CIFAR pickle ({type(e).__name__}: {e}); the file is corrupt "
                        f"or truncated: delete it and download the dataset again") from None
    if not isinstance(obj, dict):
        raise LakdError(f"{path} is not a CIFAR pickle (holds a {type(obj).__name__}, expected a dict); "
                        f"delete it and download the dataset again")
    return {_text(k): v for k, v in obj.items()}


def _md5(path: str) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def official_md5s(name: str) -> dict[str, str]:
    """The official files' md5 sums (as torchvision records them)."""
    from torchvision.datasets import CIFAR10, CIFAR100

    cls = CIFAR10 if name == "cifar10" else CIFAR100
    sums = {f: m for f, m in cls.train_list + cls.test_list}
    sums[cls.meta["filename"]] = cls.meta["md5"]
    return sums


def _read_split(folder: str, files: list[str], spec: dict) -> ArraySplit:
    images, labels = [], []
    for fname in files:
        path = os.path.join(folder, fname)
        if not os.path.isfile(path):
            raise LakdError(f"{spec['title']} file {path} is missing; the folder is incomplete: download "
                            f"{spec['url']} again (or set data.download=true when online)")
        d = read_pickle(path)
        if "data" not in d or spec["label_key"] not in d:
            raise LakdError(f"{path} lacks the 'data' or {spec['label_key']!r} entry (keys: {sorted(d)}); "
                            f"is it a {spec['title']} file?")
        data = np.asarray(d["data"])
        lab = np.asarray(d[spec["label_key"]], dtype=np.int64)
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 or len(lab) != len(data):
            raise LakdError(f"{path} holds data of shape {data.shape} ({data.dtype}) and {len(lab)} labels; "
                            f"expected uint8 N x 3072 with N labels: the file is corrupt")
        if len(lab) and (lab.min() < 0 or lab.max() >= spec["num_classes"]):
            raise LakdError(f"{path} has labels outside 0..{spec['num_classes'] - 1}: the file is corrupt")
        images.append(data.reshape(-1, 3, 32, 32))
        labels.append(lab)
    return ArraySplit(torch.from_numpy(np.ascontiguousarray(np.concatenate(images))),
                      torch.from_numpy(np.concatenate(labels)))


def _download(name: str, root: str) -> None:
    """Fetch and unpack the official archive with torchvision's helpers (md5-checked download, then extract)."""
    from torchvision.datasets import CIFAR10, CIFAR100
    from torchvision.datasets import utils as tv_utils

    spec = SPECS[name]
    cls = CIFAR10 if name == "cifar10" else CIFAR100
    filename = os.path.basename(spec["url"])
    archive, folder = os.path.join(root, filename), os.path.join(root, spec["folder"])
    # what this call creates (the root and its missing parents, the archive, the unpacked folder) is removed
    # again when it fails, so a failed download leaves no empty or partial data folder behind
    created = []
    parent = os.path.abspath(root)
    while not os.path.exists(parent):
        created.append(parent)
        parent = os.path.dirname(parent)
    new_archive, new_folder = not os.path.exists(archive), not os.path.exists(folder)
    try:
        os.makedirs(root, exist_ok=True)
        tv_utils.download_url(spec["url"], root, filename=filename, md5=cls.tgz_md5)
        tv_utils.extract_archive(archive, root)
    except Exception as e:  # network, disk, checksum, a broken archive
        if new_folder:
            shutil.rmtree(folder, ignore_errors=True)
        if new_archive and os.path.isfile(archive):
            os.unlink(archive)
        for path in created:  # deepest first; only folders left empty
            with contextlib.suppress(OSError):
                os.rmdir(path)
        raise LakdError(f"downloading {spec['title']} into {root} failed ({type(e).__name__}: {e}); fetch "
                        f"{spec['url']} by hand and unpack it there (or set data.root / $LAKD_DATA to a copy)") from None


def load_cifar(name: str, root: str, *, download: bool = False, verify_md5: bool = False):
    """``(train, test, class_names)`` for ``cifar10`` or ``cifar100`` under ``root``."""
    spec = SPECS[name]
    root = os.path.abspath(os.path.expanduser(root))
    folder = os.path.join(root, spec["folder"])
    if not os.path.isdir(folder) and download:
        _download(name, root)
    if not os.path.isdir(folder):
        raise LakdError(f"{spec['title']} not found: {folder} does not exist; add data.download=true to fetch it "
                        f"there, or point data.root=... (or the LAKD_DATA environment variable) at the folder that "
                        f"holds {spec['folder']}/, or unpack {spec['url']} into {root}")
    if verify_md5:
        for fname, want in official_md5s(name).items():
            path = os.path.join(folder, fname)
            if os.path.isfile(path) and _md5(path) != want:
                raise LakdError(f"{path} does not match the official md5 {want}; re-download it, or set "
                                f"data.verify_md5=false to use a modified copy")
    train = _read_split(folder, spec["train"], spec)
    test = _read_split(folder, spec["test"], spec)
    names = None
    meta_path = os.path.join(folder, spec["meta"])
    if os.path.isfile(meta_path):
        meta = read_pickle(meta_path)
        raw = meta.get(spec["names_key"])
        if raw is not None and len(raw) == spec["num_classes"]:
            names = [_text(n) for n in raw]
    if names is None:
        names = list(CIFAR10_CLASSES) if name == "cifar10" else [str(i) for i in range(spec["num_classes"])]
    return train, test, names


def _load_registered(name: str, d: dict):
    return load_cifar(name, d["root"], download=bool(d.get("download")), verify_md5=bool(d.get("verify_md5")))


DATASETS.register("cifar10", mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616), size=32, kind="array",
                  num_classes=10)(_load_registered)
DATASETS.register("cifar100", mean=(0.5071, 0.4865, 0.4409), std=(0.2673, 0.2564, 0.2762), size=32, kind="array",
                  num_classes=100)(_load_registered)
