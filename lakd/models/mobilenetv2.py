"""MobileNetV2 for CIFAR with the mdistiller / RepDistiller architecture and state-dict layout.

mdistiller's ``MobileNetV2`` entry is ``mobile_half``: expansion ratio 6, width multiplier 0.5, a stride-2
3x3 stem, 17 inverted-residual units in 7 groups and a 1x1 conv to 1280 channels before pooling.

Keys: ``conv1.{0,1}`` (stem conv, BN), ``blocks.<g>.<j>.conv.{0,1,3,4,6,7}`` (expand 1x1, BN, depthwise 3x3,
BN, project 1x1, BN), ``conv2.{0,1}`` (1x1 conv, BN), ``classifier.0`` (the linear layer).

Feature interface: every inverted-residual unit is a block (17); the stages end after groups 1, 2, 4 and 6
(units 3, 6, 13, 17), which are mdistiller's ``feats[1:]``. The units end with a linear projection (no
ReLU), so the stages have no pre-activation: ``has_preact`` is false and asking for one (``preact=True``, as OFD
does) is a ``LakdError``.
"""
from __future__ import annotations

import math

import torch.nn as nn

from ..errors import LakdError
from .base import FeatureNet
from .registry import register_model

#: (expansion t, channels c, units n, first stride s) of the seven groups, before the width multiplier
SETTING = [(1, 16, 1, 1), (None, 24, 2, 1), (None, 32, 3, 2), (None, 64, 4, 2), (None, 96, 3, 1),
           (None, 160, 3, 2), (None, 320, 1, 1)]


def _conv_bn_relu(inp: int, oup: int, kernel: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(inp, oup, kernel, stride, kernel // 2, bias=False),
        nn.BatchNorm2d(oup),
        nn.ReLU(inplace=True),
    )


class InvertedResidual(nn.Module):
    """Expand (1x1) -> depthwise 3x3 -> linear projection (1x1); identity shortcut when shapes allow."""

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int):
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2, got {stride}")
        hidden = inp * expand_ratio
        self.stride = stride
        self.use_res_connect = stride == 1 and inp == oup
        self.conv = nn.Sequential(
            nn.Conv2d(inp, hidden, 1, 1, 0, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, oup, 1, 1, 0, bias=False),
            nn.BatchNorm2d(oup),
        )

    def forward(self, x):
        out = self.conv(x)
        return x + out if self.use_res_connect else out


class MobileNetV2(FeatureNet):
    #: a training step measured 1.63x faster in channels_last on CPU (benchmarks/bench_layout.py, batch 64,
    #: 2 threads; benchmarks/bench_layout.py -> results/performance/w1/layout.json): channels_last: auto picks it
    CHANNELS_LAST_CPU = True
    #: bf16 autocast is slower on a bf16 CPU (0.60x fp32 in channels_last, layout.json): BF16_FASTER stays empty

    def __init__(self, expansion: int = 6, width_mult: float = 0.5, num_classes: int = 10):
        super().__init__()
        channels = int(32 * width_mult)
        self.conv1 = _conv_bn_relu(3, channels, 3, 2)
        self.blocks = nn.ModuleList()
        units: list[nn.Module] = []
        ends, stage_groups = [], (1, 2, 4, 6)
        for g, (t, c, n, s) in enumerate(SETTING):
            out = int(c * width_mult)
            group = []
            for j in range(n):
                group.append(InvertedResidual(channels, out, s if j == 0 else 1, t or expansion))
                channels = out
            self.blocks.append(nn.Sequential(*group))
            units += group
            if g in stage_groups:
                ends.append(len(units))
        self.last_channel = int(1280 * width_mult) if width_mult > 1.0 else 1280
        self.conv2 = _conv_bn_relu(channels, self.last_channel, 1, 1)
        self.classifier = nn.Sequential(nn.Linear(self.last_channel, num_classes))
        self._blocks = units
        self.stage_ends = ends
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                m.weight.data.normal_(0, math.sqrt(2.0 / fan_out))
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.data.fill_(1)
                m.bias.data.zero_()
            elif isinstance(m, nn.Linear):
                m.weight.data.normal_(0, 0.01)
                m.bias.data.zero_()

    # ``classifier`` is mdistiller's ``nn.Sequential(nn.Linear)`` (key ``classifier.0``); the interface's
    # ``classifier`` is the linear layer inside it.
    @property
    def classifier(self) -> nn.Linear:  # type: ignore[override]
        return self._modules["classifier"][0]

    def stem_forward(self, x):
        return self.conv1(x)

    has_preact = False

    def block_forward(self, i, h, preact=False):
        if preact:
            raise LakdError(self.missing("preact"))
        return self._blocks[i](h)

    def pre_pool(self, h):
        return self.conv2(h)




@register_model("mobilenetv2", family="cifar")
def mobilenetv2(num_classes: int = 10, **kw):
    """mdistiller's ``MobileNetV2`` (``mobile_half``): expansion 6, width 0.5."""
    return MobileNetV2(expansion=6, width_mult=0.5, num_classes=num_classes)
