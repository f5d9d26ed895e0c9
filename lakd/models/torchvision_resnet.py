"""ImageNet ResNets from torchvision, with torchvision's state-dict layout, behind the feature interface.

Weights never download: pass a local file (``teacher.checkpoint`` / ``model.checkpoint``) holding a
torchvision state dict (e.g. ``resnet34-b627a593.pth``) or a ``{"model": state_dict}`` checkpoint.
"""
from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F
from torchvision.models import resnet as tvr

from .base import FeatureNet
from .registry import register_model


class TorchvisionResNet(tvr.ResNet, FeatureNet):
    input_size = 224

    def __init__(self, block, layers, num_classes=1000):
        tvr.ResNet.__init__(self, block, layers, num_classes=num_classes)
        self._blocks = [*self.layer1, *self.layer2, *self.layer3, *self.layer4]
        ends, total = [], 0
        for n in layers:
            total += n
            ends.append(total)
        self.stage_ends = ends

    def forward(self, x, features=False, preact=False, blocks=False):  # FeatureNet's, not torchvision's
        return FeatureNet.forward(self, x, features=features, preact=preact, blocks=blocks)

    def stem_forward(self, x):
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))

    def block_forward(self, i, h, preact=False):
        b = self._blocks[i]
        if not preact:
            return b(h)
        identity = h if b.downsample is None else b.downsample(h)
        if isinstance(b, tvr.Bottleneck):
            out = b.relu(b.bn1(b.conv1(h)))
            out = b.relu(b.bn2(b.conv2(out)))
            out = b.bn3(b.conv3(out))
        else:
            out = b.relu(b.bn1(b.conv1(h)))
            out = b.bn2(b.conv2(out))
        pre = out + identity
        return F.relu(pre), pre

    @property
    def classifier(self) -> nn.Linear:  # type: ignore[override]
        return self._modules["fc"]


def _make(block, layers):
    def builder(num_classes: int = 1000, **kw):
        return TorchvisionResNet(block, layers, num_classes=num_classes)

    return builder


register_model("resnet18", family="imagenet")(_make(tvr.BasicBlock, [2, 2, 2, 2]))
register_model("resnet34", family="imagenet")(_make(tvr.BasicBlock, [3, 4, 6, 3]))
register_model("resnet50", family="imagenet")(_make(tvr.Bottleneck, [3, 4, 6, 3]))
