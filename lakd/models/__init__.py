"""The model zoo: CIFAR ResNet/WRN/VGG/MobileNetV2/ShuffleNetV1-V2 (mdistiller layout) and torchvision ImageNet
ResNets; and any other network by name (``torchvision:<name>``, ``timm:<name>``, ``module:<pkg.mod>:<callable>``)
or object (``adapt``), cut into blocks by ``lakd.models.adapter``."""
from __future__ import annotations

from ..errors import LakdError
from . import mobilenetv2, resnet_cifar, shufflenet, torchvision_resnet, vgg, wrn  # noqa: F401  (registration)
from .adapter import adapt, cut_candidates
from .base import FeatureNet, FeatureShape
from .checkpoint import checkpoint_meta, extract_state_dict, load_weights, read_checkpoint
from .external import build_external, is_external
from .registry import FAMILY, MODELS

#: the keys of a ``model:`` / ``teacher:`` config section that shape a network from outside the zoo
OPTION_KEYS = ("kwargs", "blocks", "stem", "classifier", "leaf_modules")


def create_model(name: str, num_classes: int, checkpoint: str | None = None, *, input_size: int | None = None,
                 **options) -> FeatureNet:
    """Build a model by name, optionally loading weights from a checkpoint file.

    ``name`` is a zoo name (``lakd models``) or ``torchvision:<name>`` / ``timm:<name>`` /
    ``module:<package.module>:<callable>``; for those, ``options`` are ``kwargs`` (for the constructor),
    ``blocks``, ``stem``, ``classifier``, ``leaf_modules`` (see ``adapt``) and ``input_size`` is the image size
    used to infer feature shapes (default 224, 32 for ``module:``).
    """
    if is_external(name):
        return build_external(name, num_classes, checkpoint, input_size=input_size,
                              **{k: v for k, v in options.items() if v is not None})
    given = [k for k, v in options.items() if v not in (None, {}, [], ())]
    if given:
        raise LakdError(f"{', '.join(given)} apply to torchvision:/timm:/module: models, not to the zoo's {name!r}")
    model = MODELS.get(name)(num_classes=num_classes)
    if checkpoint:
        load_weights(model, checkpoint, arch=name)
    return model


def model_options(section: dict) -> dict:
    """The network options (``OPTION_KEYS``) set in a ``model:``/``teacher:`` config section."""
    return {k: section.get(k) for k in OPTION_KEYS if section.get(k) not in (None, {}, [])}


def list_models() -> list[str]:
    return MODELS.names()


__all__ = ["FeatureNet", "FeatureShape", "create_model", "list_models", "load_weights", "read_checkpoint",
           "extract_state_dict", "checkpoint_meta", "load_model", "load_model_from_checkpoint", "FAMILY",
           "adapt", "cut_candidates", "model_options", "is_external"]


def load_model(path: str, arch: str | None = None, num_classes: int | None = None):
    """A model from a checkpoint file: a lakd checkpoint (architecture and classes recorded) or any known
    layout given ``arch`` (classes: the recorded ones, else ``num_classes``). Returns ``(model, checkpoint dict)``;
    the model is in eval mode on the CPU."""
    obj = read_checkpoint(path)
    meta = checkpoint_meta(obj)
    arch = arch or meta.get("arch")
    if not arch:
        raise LakdError(f"checkpoint {path!r} does not record its architecture; give the model name "
                        f"(e.g. --arch resnet20 / --teacher-arch resnet56, or create_model(name, num_classes, "
                        f"checkpoint={path!r}))")
    n = meta.get("num_classes") or num_classes
    if not n:
        raise LakdError(f"checkpoint {path!r} does not record its number of classes; give num_classes")
    # a torchvision:/timm:/module: network is rebuilt with the cut points and options its run recorded
    cfg = meta.get("config") or {}
    sec = next((cfg[k] for k in ("model", "teacher") if isinstance(cfg.get(k), dict) and cfg[k].get("name") == arch),
               {})
    # the image size it trained at (a ViT's patch grid depends on it): recorded, else the run's setting
    size = meta.get("image_size") or (cfg.get("data") or {}).get("image_size") or None
    model = create_model(str(arch), int(n), checkpoint=path, input_size=size, **model_options(sec))
    return model.eval(), obj


def load_model_from_checkpoint(path: str):
    """Rebuild a model from a checkpoint written by ``lakd`` (which records ``arch`` and ``num_classes``).

    Returns ``(model, checkpoint_dict)``; the model is in eval mode on the CPU.
    """
    meta = checkpoint_meta(path)
    if not meta.get("arch") or not meta.get("num_classes"):
        raise LakdError(f"checkpoint {path!r} does not record its architecture; load it with create_model(name, "
                        f"num_classes, checkpoint={path!r}) or pass the model name (e.g. --teacher-arch resnet56)")
    return load_model(path)
