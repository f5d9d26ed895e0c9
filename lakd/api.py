"""The Python API for one's own training loop (see docs/api.md).

    import lakd
    d = lakd.distiller(student=my_student, teacher=my_teacher, method="lakd", image_size=64)
    opt = torch.optim.SGD(d.trainable_parameters(), lr=0.05, momentum=0.9)
    for x, y in loader:
        opt.zero_grad(set_to_none=True)
        logits, losses = d.train_step({"image": x, "target": y}, backward=lambda loss: loss.backward())
        opt.step()

``student`` and ``teacher`` are ``nn.Module`` objects (adapted with ``lakd.adapt``: the distiller trains the
student's own parameters, so the distilled student is the user's module object) or model names
(``resnet20``, ``torchvision:resnet18``, ``timm:resnet18``, ``module:pkg.mod:fn``).
"""
from __future__ import annotations

import copy

import torch.nn as nn

from .config import _check_keys, _check_values, _merge, full_defaults, load_config
from .distillers import DISTILLERS, Distiller, build_distiller
from .errors import LakdError
from .models import FeatureNet, adapt, create_model


def _model(obj, role: str, num_classes: int | None, image_size: int | None, opts: dict) -> FeatureNet:
    if isinstance(obj, str):
        if num_classes is None:
            raise LakdError(f"the {role} is given by name ({obj!r}): pass num_classes= as well")
        return create_model(obj, num_classes, input_size=image_size, **opts)
    if isinstance(obj, nn.Module):
        return adapt(obj, input_size=image_size or 224, name=type(obj).__name__, **opts)
    raise LakdError(f"the {role} must be an nn.Module or a model name, got {type(obj).__name__}")


def distiller(student, teacher=None, method: str = "lakd", *, options: dict | None = None,
              num_classes: int | None = None, image_size: int | None = None, num_data: int = 0,
              student_options: dict | None = None, teacher_options: dict | None = None) -> Distiller:
    """A ready distiller (an ``nn.Module``; move it with ``.to(device)``) for ``student`` and ``teacher``.

    - ``method``: any of ``lakd methods`` (``scratch`` needs no teacher).
    - ``options``: the method's config sections, e.g. ``{"sdm": {"splits": [2, 4]}, "lakd": {"att_weight": 10}}``
      (unknown keys are errors listing the close ones, as in a config file).
    - ``image_size``: the training image size, used to infer feature shapes (default 224; 32 for CIFAR).
    - ``num_classes``: needed only when a model is given by name.
    - ``num_data``: the training set size (CRD's memory bank; its batches then carry ``"index"``).
    - ``student_options`` / ``teacher_options``: ``blocks``, ``stem``, ``classifier``, ``leaf_modules``
      (``lakd.adapt``) and, for names, ``kwargs`` for the constructor.

    Construction runs one dry training step on a batch of 2 (no trace left: weights, gradients, BatchNorm
    statistics, the method's state and the RNG as they were) and refuses a distiller whose losses leave a
    trainable parameter without a gradient (``LakdError`` naming them and the fix); ``options={"train":
    {"check_reachability": False}}`` skips it.

    Call ``d.train_step(batch, backward)`` per step with ``batch = {"image": x, "target": y}`` and a
    ``backward(loss)`` function (``loss.backward()``, or ``scaler.scale(loss).backward()`` under AMP); LAKD calls
    it once per local module, freeing each module's graph before the next one runs. Then step your optimizer
    over ``d.trainable_parameters()`` (the student's and the method's own parts; the teacher is frozen).
    Methods with a stage of their own before distillation (FT's paraphraser, AB's and FSP's initialisation) run it
    in ``d.prepare(loader)``: call it once before your loop (``loader`` yields ``{"image", "target"}`` dicts or
    ``(image, target)`` tuples); for the other methods it does nothing.
    """
    if method not in DISTILLERS:
        DISTILLERS.get(method)  # the registry's one-line error, with close names
    cls = DISTILLERS.get(method)
    wants_teacher = cls.uses_teacher(options if isinstance(options, dict) else {})
    if wants_teacher and teacher is None:
        raise LakdError(f"method {method!r} needs a teacher: pass teacher=")
    s = _model(student, "student", num_classes, image_size, dict(student_options or {}))
    t = _model(teacher, "teacher", num_classes, image_size, dict(teacher_options or {})) \
        if teacher is not None and wants_teacher else None
    label = student if isinstance(student, str) else getattr(s, "label", type(student).__name__)
    over = [f"method={method}", f"model.name={label}"]
    if t is not None:
        over.append(f"teacher.name={teacher if isinstance(teacher, str) else getattr(t, 'label', 'teacher')}")
    cfg = load_config(None, over)
    if options:
        if not isinstance(options, dict):
            raise LakdError(f"options must be a dict of config sections, got {type(options).__name__}")
        opts = copy.deepcopy(options)
        schema = full_defaults()
        _check_keys(opts, schema, "options")
        _check_values(opts, schema, "options")
        cfg = _merge(cfg, opts)
    cfg["model"]["num_classes"] = s.feature_info()["num_classes"]
    if not ((options or {}).get("data") or {}).get("dataset"):
        # the user's data is not the config default's: nothing may assume CIFAR-10's (its normalisation, its size)
        cfg["data"]["dataset"] = None
    d = build_distiller(cfg, s, t, num_data=num_data).train()
    if cfg["train"].get("check_reachability", True):
        d.check_reachability(image_size or s.input_size, cfg["model"]["num_classes"])
    return d


__all__ = ["distiller", "adapt", "create_model"]
