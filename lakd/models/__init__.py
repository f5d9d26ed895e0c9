"""The model zoo: CIFAR ResNet/WRN/VGG/MobileNetV2/ShuffleNetV1-V2 (mdistiller layout) and torchvision ImageNet ResNets."""
from __future__ import annotations

from . import mobilenetv2, resnet_cifar, shufflenet, torchvision_resnet, vgg, wrn  # noqa: F401  (registration)
from .base import FeatureNet, FeatureShape
from .checkpoint import extract_state_dict, load_weights, read_checkpoint
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
           "extract_state_dict", "FAMILY"]


def load_model_from_checkpoint(path: str):
    """Rebuild a model from a checkpoint written by ``lakd`` (which records ``arch`` and ``num_classes``).

    Returns ``(model, checkpoint_dict)``; the model is in eval mode on the CPU.
    """
    from ..errors import LakdError

    obj = read_checkpoint(path)
    arch, num_classes = obj.get("arch"), obj.get("num_classes")
    if not arch or not num_classes:
        raise LakdError(f"checkpoint {path!r} does not record its architecture; load it with create_model(name, "
                        f"num_classes, checkpoint={path!r}) or pass the model name (e.g. --teacher-arch resnet56)")
    model = MODELS.get(arch)(num_classes=int(num_classes))
    load_weights(model, path, arch=arch)
    return model.eval(), obj
