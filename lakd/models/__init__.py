"""The model zoo: CIFAR ResNet/WRN/VGG/MobileNetV2/ShuffleNetV1-V2 (mdistiller layout) and torchvision ImageNet ResNets."""
from __future__ import annotations

from ..errors import LakdError
from . import mobilenetv2, resnet_cifar, shufflenet, torchvision_resnet, vgg, wrn  # noqa: F401  (registration)
from .base import FeatureNet, FeatureShape
from .checkpoint import checkpoint_meta, extract_state_dict, load_weights, read_checkpoint
from .registry import FAMILY, MODELS


def create_model(name: str, num_classes: int, checkpoint: str | None = None) -> FeatureNet:
    """Build a zoo model by name, optionally loading weights from a checkpoint file."""
    model = MODELS.get(name)(num_classes=num_classes)
    if checkpoint:
        load_weights(model, checkpoint, arch=name)
    return model


def list_models() -> list[str]:
    return MODELS.names()


__all__ = ["FeatureNet", "FeatureShape", "create_model", "list_models", "load_weights", "read_checkpoint",
           "extract_state_dict", "checkpoint_meta", "load_model", "load_model_from_checkpoint", "FAMILY"]


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
    model = create_model(str(arch), int(n), checkpoint=path)
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
