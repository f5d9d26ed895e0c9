"""CIFAR ResNets with the mdistiller / RepDistiller architecture and state-dict layout.

Keys: ``conv1``, ``bn1``, ``layer{1,2,3}.<i>.{conv1,bn1,conv2,bn2,downsample.0,downsample.1}``, ``fc``.
resnet8..110 use 16/16/32/64 filters; resnet8x4 and resnet32x4 use 32/64/128/256.
"""
from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F

from .base import FeatureNet
from .registry import register_model


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x, preact: bool = False):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        residual = x if self.downsample is None else self.downsample(x)
        pre = out + residual
        out = F.relu(pre)
        return (out, pre) if preact else out


class CifarResNet(FeatureNet):
    #: a training step measured 1.25x (resnet20) and 1.28x (resnet8x4) faster in channels_last on CPU (batch 64,
    #: 2 threads; benchmarks/bench_layout.py -> results/performance/w1/layout.json): channels_last: auto picks it
    CHANNELS_LAST_CPU = True
    #: bf16 autocast: 2.2x (resnet20) and 2.0x (resnet8x4) over fp32 in channels_last on a bf16 CPU (layout.json);
    #: on an H200 no faster (resnet56 -> resnet20: 0.75-1.1x by batch and method, a LAKD epoch 9% slower;
    #: results/performance/gpu_h200), so not on CUDA
    BF16_FASTER = frozenset({"cpu"})

    def __init__(self, depth: int, num_filters: list[int], num_classes: int = 10):
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.inplanes = num_filters[0]
        self.conv1 = nn.Conv2d(3, num_filters[0], kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(num_filters[0])
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(num_filters[1], n)
        self.layer2 = self._make_layer(num_filters[2], n, stride=2)
        self.layer3 = self._make_layer(num_filters[3], n, stride=2)
        self.fc = nn.Linear(num_filters[3], num_classes)
        self._blocks = [*self.layer1, *self.layer2, *self.layer3]
        self.stage_ends = [n, 2 * n, 3 * n]
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )
        layers = [BasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes
        layers += [BasicBlock(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def stem_forward(self, x):
        return self.relu(self.bn1(self.conv1(x)))

    @property
    def classifier(self):
        return self.fc


def _make(depth, filters):
    def builder(num_classes: int = 10, **kw):
        return CifarResNet(depth, filters, num_classes=num_classes)

    return builder


for _d in (8, 14, 20, 32, 44, 56, 110):
    register_model(f"resnet{_d}", family="cifar")(_make(_d, [16, 16, 32, 64]))
register_model("resnet8x4", family="cifar")(_make(8, [32, 64, 128, 256]))
register_model("resnet32x4", family="cifar")(_make(32, [32, 64, 128, 256]))
