"""The one build path: data, models, distiller, optimizer and AMP scaler from a config.

The trainer (``engine.trainer``), the cost benchmarks (``analysis.cost``) and Python users (``lakd.build``) all
build through these functions, so a run, a benchmark and a notebook get the same objects from the same config:

    cfg = lakd.load_config("configs/cifar10/lakd/resnet56_resnet20_149.yaml", ["data.download=true"])
    parts = lakd.build(cfg)             # parts.data, parts.distiller, parts.optimizer, parts.scaler, ...
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from ..config import check_method_settings
from ..data import DataBundle, build_data
from ..distillers import DISTILLERS, Distiller, build_distiller
from ..errors import LakdError
from ..models import FeatureNet, checkpoint_meta, create_model, load_weights, model_options
from ..models.fold import fold_batchnorm
from ..runtime import distributed as dist
from ..runtime.device import AMP_DTYPES, resolve_amp, resolve_channels_last, resolve_device

log = logging.getLogger(__name__)


@dataclass
class Built:
    """What ``build`` returns. ``params`` are the optimizer's parameters (student and the method's parts)."""

    data: DataBundle | None
    student: FeatureNet
    teacher: FeatureNet | None
    distiller: Distiller
    params: list
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    amp_dtype: Any
    device: torch.device
    #: ``train.amp`` and ``train.channels_last`` as resolved (``auto``: ``lakd.runtime.device``)
    amp: str = "none"
    channels_last: bool = False


def teacher_metadata(cfg: dict) -> dict:
    """Normalisation and class count recorded in the teacher checkpoint (if any)."""
    path = cfg["teacher"].get("checkpoint")
    return checkpoint_meta(path) if path else {}


def apply_teacher_normalisation(cfg: dict, meta: dict) -> None:
    """The teacher checkpoint's normalisation decides the data's when the config leaves it unset."""
    if cfg["data"].get("mean") is None and "mean" in meta:
        cfg["data"]["mean"], cfg["data"]["std"] = list(meta["mean"]), list(meta["std"])


def resolve_num_classes(cfg: dict, data: DataBundle) -> int:
    """``model.num_classes`` (default: the dataset's), checked against the data; written back to ``cfg``."""
    num_classes = cfg["model"].get("num_classes") or data.num_classes
    if num_classes < data.num_classes:
        raise LakdError(f"model.num_classes={num_classes} is smaller than the {data.num_classes} classes of "
                        f"{cfg['data']['dataset']}; leave it unset (null) to use the dataset's")
    cfg["model"]["num_classes"] = num_classes
    return num_classes


def data_views(cfg: dict) -> dict[str, dict]:
    """The extra views of every training image the run's method needs (``Distiller.views``: ``{name: spec}``),
    which the data builder makes per sample (``lakd.data.views``)."""
    return DISTILLERS.get(cfg["method"]).views(cfg)


def build_models(cfg: dict, num_classes: int, meta: dict | None = None, warn: bool = True,
                 image_size: int | None = None):
    """``(student, teacher)`` from ``cfg["model"]`` and ``cfg["teacher"]`` (teacher None without a name), with
    their checkpoints loaded. ``meta``: the teacher checkpoint's metadata (read when not given). ``image_size``
    (default ``data.image_size``): the input size at which torchvision:/timm:/module: networks infer their
    feature shapes."""
    size = image_size or cfg["data"].get("image_size") or None
    student = create_model(cfg["model"]["name"], num_classes, input_size=size, **model_options(cfg["model"]))
    if cfg["model"].get("checkpoint"):
        load_weights(student, cfg["model"]["checkpoint"], arch=cfg["model"]["name"])
    teacher = None
    if cfg["teacher"].get("name"):
        meta = teacher_metadata(cfg) if meta is None else meta
        if "num_classes" in meta and int(meta["num_classes"]) != num_classes:
            raise LakdError(f"teacher checkpoint {cfg['teacher']['checkpoint']!r} has {meta['num_classes']} "
                            f"classes but {cfg['data']['dataset']} has {num_classes}; use a teacher trained on "
                            f"this dataset")
        teacher = create_model(cfg["teacher"]["name"], num_classes, checkpoint=cfg["teacher"].get("checkpoint"),
                               input_size=size, **model_options(cfg["teacher"]))
        if not cfg["teacher"].get("checkpoint") and warn:
            log.warning("the teacher has no checkpoint (random weights); set teacher.checkpoint=PATH")
    return student, teacher


def build_optimizer(cfg: dict, params) -> torch.optim.Optimizer:
    """SGD with ``cfg["solver"]``'s momentum, Nesterov switch and weight decay (the lr is set per step); a method
    that brings its own optimizer (``Distiller.build_optimizer``, e.g. DOT) replaces it in ``build``."""
    s = cfg["solver"]
    return torch.optim.SGD(params, lr=float(s["lr"]), momentum=float(s["momentum"]),
                           nesterov=bool(s["nesterov"]) and float(s["momentum"]) > 0,
                           weight_decay=float(s["weight_decay"]))


def build_scaler(cfg: dict, device: torch.device) -> torch.amp.GradScaler:
    """The AMP loss scaler: enabled for ``train.amp=fp16`` only (``auto`` never resolves to fp16)."""
    return torch.amp.GradScaler(torch.device(device).type, enabled=cfg["train"]["amp"] == "fp16")


def build(cfg: dict, device=None, rank: int = 0, world_size: int = 1, data: DataBundle | None = None,
          num_data: int | None = None, warn: bool = True) -> Built:
    """Everything a training step needs, from a config (``lakd.config.load_config``).

    ``device`` defaults to ``cfg["device"]``. The data is built unless ``data`` is given, or ``num_data`` is (a
    benchmark without data: ``num_data`` is then the training-set size the method assumes, e.g. CRD's memory
    bank, and ``model.num_classes`` must be set). ``cfg`` is completed in place (``model.num_classes``, the
    teacher's normalisation). Under torchrun (``world_size > 1``) ``train.sync_bn`` converts the BatchNorm
    layers of the student and the method's parts.
    """
    device = resolve_device(str(cfg["device"])) if device is None else torch.device(device)
    t = cfg["train"]
    meta = teacher_metadata(cfg) if cfg["teacher"].get("name") else {}
    if num_data is None:
        apply_teacher_normalisation(cfg, meta)
        views = data_views(cfg)  # the extra per-sample views the method asks for (Distiller.views), if any
        if data is None:
            data = build_data(cfg, device, rank, world_size, views=views)
        elif any(v not in data.views for v in views):
            raise LakdError(f"method {cfg['method']} trains on per-sample views {', '.join(views)} that the data given "
                            f"to build does not make; build it with lakd.build_data(cfg, device, views="
                            f"lakd.engine.build.data_views(cfg)), or let build make it (data=None)")
        num_classes = resolve_num_classes(cfg, data)
        num_data = data.num_train
        # the method's checks that need the training set (CRD's negatives, a last batch of 1), before any model
        check_method_settings(cfg, train_size=num_data, world_size=world_size)
        batch = int(cfg["solver"]["batch_size"])
        if warn and rank == 0 and 0 < num_data < batch:
            log.warning("solver.batch_size=%d is larger than the training set (%d images): every epoch is one "
                        "batch of %d images; set solver.batch_size=%d or less", batch, num_data, num_data, num_data)
    else:
        num_classes = cfg["model"].get("num_classes")
        if not num_classes:
            raise LakdError("model.num_classes must be set to build without data (num_data given)")
    student, teacher = build_models(cfg, int(num_classes), meta, warn=warn,
                                    image_size=data.image_size if data is not None else None)
    distiller = build_distiller(cfg, student, teacher, num_data=num_data)
    if t.get("sync_bn") and world_size > 1:  # student and the method's parts (connectors), not the teacher
        dist.convert_sync_batchnorm(distiller, device)
    if teacher is not None and t.get("fold_teacher_bn", True):  # after the distiller read its teacher (OFD's margin)
        size = data.image_size if data is not None else cfg["data"].get("image_size") or None
        size = int(size or getattr(teacher, "input_size", 32))
        n = fold_batchnorm(teacher, torch.zeros(2, 3, size, size))
        log.debug("folded %d BatchNorm layers of the teacher into its convolutions", n)
    distiller.to(device)
    # train.channels_last / train.amp: auto resolved here, once (lakd/runtime/device.py says what and why)
    channels_last = resolve_channels_last(t.get("channels_last", False), device, [student, teacher])
    if channels_last:
        distiller.to(memory_format=torch.channels_last)
    amp = resolve_amp(t["amp"], device, [student, teacher])
    if t.get("check_reachability", True):  # every trainable parameter reached by some loss, or a LakdError
        distiller.check_reachability(data.image_size if data is not None else cfg["data"].get("image_size") or None,
                                     int(num_classes))
    params = distiller.trainable_parameters()
    optimizer = distiller.build_optimizer(params, cfg["solver"])  # a method's own (DOT), else the SGD
    return Built(data=data, student=distiller.student, teacher=distiller.teacher, distiller=distiller,
                 params=params, optimizer=optimizer if optimizer is not None else build_optimizer(cfg, params),
                 scaler=build_scaler(cfg, device),
                 amp_dtype=AMP_DTYPES[amp], device=device, amp=amp, channels_last=channels_last)


def needs_teacher(method: str) -> bool:
    """Whether a registered method distils from a teacher (``scratch`` does not)."""
    return DISTILLERS.get(method).needs_teacher
