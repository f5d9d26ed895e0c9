"""ShuffleNetV1 and ShuffleNetV2 for CIFAR with the mdistiller / RepDistiller architecture and state-dict
layout.

``shufflev1`` (mdistiller ``ShuffleV1``): 1x1 stem to 24 channels, three stages of 4/8/4 bottlenecks with
240/480/960 output channels and 3 groups; the first unit of each stage has stride 2 and concatenates an
average-pooled shortcut. Keys: ``conv1``, ``bn1``, ``layer{1,2,3}.<i>.{conv1,bn1,conv2,bn2,conv3,bn3}``,
``linear``.

``shufflev2`` (mdistiller ``ShuffleV2``, net size 1): 1x1 stem to 24 channels, three stages each made of a
down-sampling unit and 3/7/3 basic units (116/232/464 channels), then a 1x1 conv to 1024 channels. Keys:
``conv1``, ``bn1``, ``layer{1,2,3}.0.{conv1..conv5,bn1..bn5}`` (down unit),
``layer{1,2,3}.<i>.{conv1,bn1,conv2,bn2,conv3,bn3}`` (basic units), ``conv2``, ``bn2``, ``linear``.

Feature interface: every unit is a block (16 for both); stages end at the last unit of each layer. As in
mdistiller, a ShuffleNetV2 unit's pre-activation is taken before its channel shuffle (``shuffle(relu(pre))``
is the unit's output); for ShuffleNetV1 ``relu(pre)`` is the output.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import FeatureNet
from .registry import register_model


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[N, g*k, H, W] -> interleave the g groups: channel order (0, k, 2k, ..., 1, k+1, ...)."""
    if groups == 1:
        return x
    n, c, h, w = x.shape
    return x.reshape(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


# ---------------------------------------------------------------------------------------- ShuffleNetV1
class V1Bottleneck(nn.Module):
    def __init__(self, in_planes: int, out_planes: int, stride: int, groups: int):
        super().__init__()
        self.stride = stride
        mid = out_planes // 4
        # the first 1x1 conv is not grouped when it reads the 24-channel stem (as in the original code)
        self.g1 = 1 if in_planes == 24 else groups
        self.conv1 = nn.Conv2d(in_planes, mid, kernel_size=1, groups=self.g1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, kernel_size=3, stride=stride, padding=1, groups=mid, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, out_planes, kernel_size=1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)

    def forward(self, x, preact: bool = False):
        out = F.relu(self.bn1(self.conv1(x)))
        out = channel_shuffle(out, self.g1)
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.stride == 2:
            pre = torch.cat([out, F.avg_pool2d(x, 3, stride=2, padding=1)], 1)
        else:
            pre = out + x
        out = F.relu(pre)
        return (out, pre) if preact else out


class ShuffleNetV1(FeatureNet):
    #: a training step measured 1.17x faster in channels_last on CPU (benchmarks/bench_layout.py, batch 64,
    #: 2 threads; benchmarks/bench_layout.py -> results/performance/w1/layout.json): channels_last: auto picks it
    CHANNELS_LAST_CPU = True
    #: bf16 autocast is slower on a bf16 CPU (0.91x fp32 in channels_last, layout.json): BF16_FASTER stays empty

    def __init__(self, out_planes=(240, 480, 960), num_blocks=(4, 8, 4), groups: int = 3,
                 num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 24, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        in_planes = 24
        layers = []
        for planes, n in zip(out_planes, num_blocks):
            units = []
            for i in range(n):
                # the stride-2 unit concatenates its (pooled) input, so its branch makes the rest
                branch = planes - in_planes if i == 0 else planes
                units.append(V1Bottleneck(in_planes, branch, 2 if i == 0 else 1, groups))
                in_planes = planes
            layers.append(nn.Sequential(*units))
        self.layer1, self.layer2, self.layer3 = layers
        self.linear = nn.Linear(out_planes[2], num_classes)
        self._blocks = [*self.layer1, *self.layer2, *self.layer3]
        self.stage_ends = [sum(num_blocks[:k + 1]) for k in range(3)]

    @property
    def classifier(self) -> nn.Linear:  # type: ignore[override]
        return self.linear

    def stem_forward(self, x):
        return F.relu(self.bn1(self.conv1(x)))




# ---------------------------------------------------------------------------------------- ShuffleNetV2
class V2BasicUnit(nn.Module):
    """Split the channels in halves; transform the second half; concatenate; shuffle (2 groups)."""

    def __init__(self, channels: int, split_ratio: float = 0.5):
        super().__init__()
        self.split_ratio = split_ratio
        c = int(channels * split_ratio)
        self.conv1 = nn.Conv2d(c, c, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, kernel_size=3, stride=1, padding=1, groups=c, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.conv3 = nn.Conv2d(c, c, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(c)

    def forward(self, x, preact: bool = False):
        c = int(x.shape[1] * self.split_ratio)
        x1, x2 = x[:, :c], x[:, c:]
        out = F.relu(self.bn1(self.conv1(x2)))
        out = self.bn2(self.conv2(out))
        pre = self.bn3(self.conv3(out))
        out = channel_shuffle(torch.cat([x1, F.relu(pre)], 1), 2)
        return (out, torch.cat([x1, pre], 1)) if preact else out


class V2DownUnit(nn.Module):
    """Two stride-2 branches on the whole input (depthwise then 1x1 / 1x1-depthwise-1x1), concatenated."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        mid = out_channels // 2
        self.conv1 = nn.Conv2d(in_channels, in_channels, kernel_size=3, stride=2, padding=1,
                               groups=in_channels, bias=False)
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv2 = nn.Conv2d(in_channels, mid, kernel_size=1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(in_channels, mid, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(mid)
        self.conv4 = nn.Conv2d(mid, mid, kernel_size=3, stride=2, padding=1, groups=mid, bias=False)
        self.bn4 = nn.BatchNorm2d(mid)
        self.conv5 = nn.Conv2d(mid, mid, kernel_size=1, bias=False)
        self.bn5 = nn.BatchNorm2d(mid)

    def forward(self, x, preact: bool = False):
        left = self.bn2(self.conv2(self.bn1(self.conv1(x))))
        right = F.relu(self.bn3(self.conv3(x)))
        right = self.bn5(self.conv5(self.bn4(self.conv4(right))))
        pre = torch.cat([left, right], 1)
        out = channel_shuffle(F.relu(pre), 2)
        return (out, pre) if preact else out


CONFIGS_V2 = {
    0.2: ((40, 80, 160, 512), (3, 3, 3)),
    0.3: ((40, 80, 160, 512), (3, 7, 3)),
    0.5: ((48, 96, 192, 1024), (3, 7, 3)),
    1: ((116, 232, 464, 1024), (3, 7, 3)),
    1.5: ((176, 352, 704, 1024), (3, 7, 3)),
    2: ((224, 488, 976, 2048), (3, 7, 3)),
}


class ShuffleNetV2(FeatureNet):
    #: bf16 autocast is slower on a bf16 CPU (0.80x fp32 in channels_last, layout.json): BF16_FASTER stays empty
    def __init__(self, net_size: float = 1, num_classes: int = 10):
        super().__init__()
        out_channels, num_blocks = CONFIGS_V2[net_size]
        self.conv1 = nn.Conv2d(3, 24, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        in_channels = 24
        layers = []
        for ch, n in zip(out_channels[:3], num_blocks):
            layers.append(nn.Sequential(V2DownUnit(in_channels, ch), *[V2BasicUnit(ch) for _ in range(n)]))
            in_channels = ch
        self.layer1, self.layer2, self.layer3 = layers
        self.conv2 = nn.Conv2d(out_channels[2], out_channels[3], kernel_size=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels[3])
        self.linear = nn.Linear(out_channels[3], num_classes)
        self._blocks = [*self.layer1, *self.layer2, *self.layer3]
        self.stage_ends = [sum(n + 1 for n in num_blocks[:k + 1]) for k in range(3)]

    @property
    def classifier(self) -> nn.Linear:  # type: ignore[override]
        return self.linear

    def stem_forward(self, x):
        return F.relu(self.bn1(self.conv1(x)))

    def pre_pool(self, h):
        return F.relu(self.bn2(self.conv2(h)))




@register_model("shufflev1", family="cifar")
def shufflev1(num_classes: int = 10, **kw):
    """mdistiller's ``ShuffleV1``: 240/480/960 channels, 4/8/4 units, 3 groups."""
    return ShuffleNetV1((240, 480, 960), (4, 8, 4), groups=3, num_classes=num_classes)


@register_model("shufflev2", family="cifar")
def shufflev2(num_classes: int = 10, **kw):
    """mdistiller's ``ShuffleV2`` (net size 1): 116/232/464 channels, 3/7/3 basic units, 1024 at the end."""
    return ShuffleNetV2(net_size=1, num_classes=num_classes)
