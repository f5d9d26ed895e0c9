"""Wide ResNets (pre-activation) with the mdistiller / RepDistiller layout.

Keys: ``conv1``, ``block{1,2,3}.layer.<i>.{bn1,conv1,bn2,conv2,convShortcut}``, ``bn1``, ``fc``.
"""
from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F

from .base import FeatureNet
from .registry import register_model


class WideBasicBlock(nn.Module):
    def __init__(self, in_planes: int, out_planes: int, stride: int, drop_rate: float = 0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_planes, out_planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.drop_rate = drop_rate
        self.equal_in_out = in_planes == out_planes
        self.convShortcut = None
        if not self.equal_in_out:
            self.convShortcut = nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)

    def forward(self, x):
        # F.relu (not in-place) keeps the block input intact for the shortcut and for feature hooks.
        act = F.relu(self.bn1(x))
        out = F.relu(self.bn2(self.conv1(act)))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        out = self.conv2(out)
        shortcut = x if self.equal_in_out else self.convShortcut(act)
        return shortcut + out


class NetworkBlock(nn.Module):
    def __init__(self, nb_layers, in_planes, out_planes, stride, drop_rate=0.0):
        super().__init__()
        self.layer = nn.Sequential(
            *[
                WideBasicBlock(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1, drop_rate)
                for i in range(int(nb_layers))
            ]
        )

    def forward(self, x):
        return self.layer(x)


class WideResNet(FeatureNet):
    """WRN-depth-k. Stage outputs are the raw block-group outputs (as in mdistiller); their
    pre-activation is the next BN applied to them (mdistiller's ``preact_feats``)."""

    #: a training step measured 1.12x (wrn_16_2) faster in channels_last on CPU (batch 64,
    #: 2 threads; benchmarks/bench_layout.py -> results/performance/w1/layout.json): channels_last: auto picks it
    CHANNELS_LAST_CPU = True
    #: bf16 autocast: 2.0x (wrn_16_2) over fp32 in channels_last on a bf16 CPU (layout.json); CUDA not measured
    BF16_FASTER = frozenset({"cpu"})

    def __init__(self, depth: int, widen_factor: int, num_classes: int = 10, drop_rate: float = 0.0):
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError(f"WRN depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        ch = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(3, ch[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.block1 = NetworkBlock(n, ch[0], ch[1], 1, drop_rate)
        self.block2 = NetworkBlock(n, ch[1], ch[2], 2, drop_rate)
        self.block3 = NetworkBlock(n, ch[2], ch[3], 2, drop_rate)
        self.bn1 = nn.BatchNorm2d(ch[3])
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(ch[3], num_classes)
        self.nChannels = ch[3]
        self._blocks = [*self.block1.layer, *self.block2.layer, *self.block3.layer]
        self.stage_ends = [n, 2 * n, 3 * n]
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.data.fill_(1)
                m.bias.data.zero_()
            elif isinstance(m, nn.Linear):
                m.bias.data.zero_()

    def stem_forward(self, x):
        return self.conv1(x)

    def block_forward(self, i, h, preact=False):
        out = self._blocks[i](h)
        if not preact:
            return out
        # pre-activation of a stage output: the BN that consumes it next (mdistiller's convention)
        nxt = self._blocks[i + 1].bn1 if i + 1 < len(self._blocks) else self.bn1
        return out, nxt(out)

    def pre_pool(self, h):
        return self.relu(self.bn1(h))

    @property
    def classifier(self):
        return self.fc


def _make(depth, k):
    def builder(num_classes: int = 10, **kw):
        return WideResNet(depth, k, num_classes=num_classes)

    return builder


for _d, _k in ((16, 1), (16, 2), (40, 1), (40, 2), (16, 4), (28, 4), (28, 10)):
    register_model(f"wrn_{_d}_{_k}", family="cifar")(_make(_d, _k))
