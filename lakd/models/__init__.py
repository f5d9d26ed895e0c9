"""The model zoo: CIFAR ResNet/WRN/VGG (mdistiller layout) and torchvision ImageNet ResNets."""
from __future__ import annotations

from . import resnet_cifar, torchvision_resnet, vgg, wrn  # noqa: F401  (registration)
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
