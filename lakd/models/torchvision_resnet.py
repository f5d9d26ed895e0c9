"""ImageNet ResNets from torchvision, with torchvision's state-dict layout, behind the feature interface.

The zoo names ``resnet18``, ``resnet34`` and ``resnet50`` are torchvision's networks adapted like any
``torchvision:`` model (``lakd.models.adapter``): one road, so ``resnet18`` and ``torchvision:resnet18`` are the
same network with the same cuts (stem ``maxpool``, one block per residual block) and load the same checkpoints.

Weights never download: pass a local file (``teacher.checkpoint`` / ``model.checkpoint``) holding a
torchvision state dict (e.g. ``resnet34-b627a593.pth``) or a ``{"model": state_dict}`` checkpoint.
"""
from __future__ import annotations

from torchvision.models import resnet as tvr

from .adapter import adapt
from .registry import register_model


def _make(arch: str):
    def builder(num_classes: int = 1000, **kw):
        return adapt(getattr(tvr, arch)(num_classes=num_classes), input_size=224, name=arch)

    builder.__doc__ = f"torchvision's {arch}, adapted (stem: maxpool; blocks: every residual block)."
    return builder


register_model("resnet18", family="imagenet")(_make("resnet18"))
register_model("resnet34", family="imagenet")(_make("resnet34"))
register_model("resnet50", family="imagenet")(_make("resnet50"))
