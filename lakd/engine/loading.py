"""Loading trained models and their test data, shared by ``lakd eval``, ``lakd analyze`` and ``lakd visualize``
(and usable from Python): checkpoints are read once, the data is built to match them (dataset, root,
normalisation and image size recorded in the checkpoints, unless overridden) and the models are rebuilt on the
configured device.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch

from ..config import load_config, with_paths_expanded
from ..data import DataBundle, build_data
from ..errors import LakdError
from ..models import checkpoint_meta, load_model, read_checkpoint
from ..runtime.device import resolve_device


@dataclass
class Loaded:
    """What ``load_models_and_data`` returns; unpacks as ``(models, labels, metas, bundle, cfg, device)``."""

    models: list
    labels: list[str]
    metas: list[dict]
    bundle: DataBundle
    cfg: dict
    device: torch.device

    def __iter__(self):
        return iter((self.models, self.labels, self.metas, self.bundle, self.cfg, self.device))


def model_label(path: str, meta: dict) -> str:
    """The run's experiment name recorded in the checkpoint, else the file name (with its folder for
    last.pt/best.pt)."""
    cfg = meta.get("config") if isinstance(meta.get("config"), dict) else {}
    if cfg.get("experiment"):
        return str(cfg["experiment"])
    stem = os.path.splitext(os.path.basename(path))[0]
    if stem in ("best", "last", "checkpoint", "model"):
        parent = os.path.basename(os.path.dirname(os.path.abspath(path)))
        return f"{parent}/{stem}" if parent else stem
    return stem


def unique_labels(labels: list[str], paths: list[str]) -> list[str]:
    """Labels made distinct: repeated ones get their file name, then a counter."""
    stems = [os.path.splitext(os.path.basename(p))[0] for p in paths]
    out = []
    for i, lab in enumerate(labels):
        if labels.count(lab) > 1 and stems[i] != lab:
            lab = f"{lab} ({stems[i]})"
        base, k = lab, 2
        while lab in out:
            lab = f"{base} #{k}"
            k += 1
        out.append(lab)
    return out


def _user_sets(overrides: list[str], key: str) -> bool:
    return any(o.split("=", 1)[0].strip() == key for o in overrides)


def data_overrides(metas: list[dict], overrides: list[str], test_images: int | None = None) -> list[str]:
    """Config overrides that make the test data match the checkpoints (``checkpoint_meta`` dicts): their
    dataset, root, normalisation and image size, unless ``overrides`` (the user's) set them."""
    auto: list[str] = []
    datasets = {str(m["dataset"]).lower() for m in metas if m.get("dataset")}
    forced = [o.split("=", 1)[1].strip().lower() for o in overrides if o.split("=", 1)[0].strip() == "data.dataset"]
    if not forced:
        if len(datasets) > 1:
            raise LakdError(f"the checkpoints were trained on different datasets ({', '.join(sorted(datasets))}); "
                            f"compare models of one dataset, or force one with data.dataset=NAME")
        if datasets:
            auto.append(f"data.dataset={next(iter(datasets))}")
    configs = [m["config"] for m in metas if isinstance(m.get("config"), dict)]
    roots = [(c.get("data") or {}).get("root") for c in configs]
    roots = [r for r in roots if isinstance(r, str) and r]
    if roots and not _user_sets(overrides, "data.root"):
        auto.append(f"data.root={roots[0]}")
    # the normalisation recorded in the checkpoints, when they were trained on the dataset used here
    same = [m for m in metas if not forced or str(m.get("dataset") or "").lower() == forced[-1]]
    for key in ("mean", "std"):
        vals = [m[key] for m in same if m.get(key) is not None]
        if vals and not _user_sets(overrides, f"data.{key}"):
            auto.append(f"data.{key}={json.dumps([float(v) for v in vals[0]])}")
    sizes = [(c.get("data") or {}).get("image_size") for c in configs]
    sizes = [s for s in sizes if s]
    if sizes and not _user_sets(overrides, "data.image_size"):
        auto.append(f"data.image_size={int(sizes[0])}")
    if test_images and not _user_sets(overrides, "data.test_subset"):
        auto.append(f"data.test_subset={int(test_images)}")
    return auto


def load_models_and_data(paths: list[str], archs: list[str | None], overrides: list[str],
                         test_images: int | None = None) -> Loaded:
    """Read checkpoints, build the test data (dataset and normalisation from the checkpoints unless
    overridden) and the models on the configured device.

    Returns a ``Loaded`` (unpacks as ``(models, labels, metas, bundle, cfg, device)``); ``metas`` are the
    checkpoints' ``checkpoint_meta``; models are in eval mode; labels (see ``model_label``) may repeat.
    """
    metas = [checkpoint_meta(read_checkpoint(p)) for p in paths]
    for p, m, a in zip(paths, metas, archs):
        if not a and not m.get("arch"):
            raise LakdError(f"checkpoint {p!r} does not record its architecture; give the model name "
                            f"(e.g. --teacher-arch resnet56 / --student-arch resnet20 / --arch resnet20)")
    cfg = load_config(None, data_overrides(metas, overrides, test_images)
                      + list(overrides))
    device = resolve_device(str(cfg.get("device", "auto")))
    threads = int((cfg.get("train") or {}).get("threads") or 0)
    if threads > 0 and device.type == "cpu":
        torch.set_num_threads(threads)

    bundle = build_data(with_paths_expanded(cfg), device)
    models = []
    for p, m, a in zip(paths, metas, archs):
        nc = int(m.get("num_classes") or bundle.num_classes)
        if nc != bundle.num_classes:
            raise LakdError(f"checkpoint {p!r} has {nc} classes but dataset {cfg['data']['dataset']!r} has "
                            f"{bundle.num_classes}; set data.dataset to the dataset it was trained on")
        model, _ = load_model(p, a, nc)
        models.append(model.to(device).eval())
    labels = [model_label(p, m) for p, m in zip(paths, metas)]
    return Loaded(models, labels, metas, bundle, cfg, device)
