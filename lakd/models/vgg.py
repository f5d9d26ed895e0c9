"""CIFAR VGGs with batch norm, in the mdistiller / RepDistiller layout.

Keys: ``block{0..4}.<j>`` (conv with bias, BN; ReLUs hold no parameters), ``classifier``. Max-pools
``pool0..pool3`` sit between blocks (``pool3`` only for 64-pixel inputs, as in mdistiller).
Blocks for SDM: block1..block4, each preceded by its max-pool; block0 (with its ReLU) is the stem.
"""
from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F

from .base import FeatureNet
from .registry import register_model

CFG = {
    "A": [[64], [128], [256, 256], [512, 512], [512, 512]],
    "B": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    "D": [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
    "E": [[64, 64], [128, 128], [256, 256, 256, 256], [512, 512, 512, 512], [512, 512, 512, 512]],
    "S": [[64], [128], [256], [512]],
}


def _make_layers(cfg: list[int], in_channels: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for v in cfg:
        layers += [nn.Conv2d(in_channels, v, kernel_size=3, padding=1), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
        in_channels = v
    return nn.Sequential(*layers[:-1])  # the last ReLU is applied outside (pre-activation features)


class VGG(FeatureNet):
    #: bf16 autocast: 1.31x over fp32 on a bf16 CPU (measured with channels_last, which is within noise for VGG:
    #: 1.27x over fp32 channels_last; results/performance/w1/layout.json); CUDA not measured
    BF16_FASTER = frozenset({"cpu"})

    def __init__(self, cfg: list[list[int]], num_classes: int = 10):
        super().__init__()
        self.block0 = _make_layers(cfg[0], 3)
        self.block1 = _make_layers(cfg[1], cfg[0][-1])
        self.block2 = _make_layers(cfg[2], cfg[1][-1])
        self.block3 = _make_layers(cfg[3], cfg[2][-1])
        self.block4 = _make_layers(cfg[-1], cfg[3][-1])
        self.pool0 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool1 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool2 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool3 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool4 = nn.AdaptiveAvgPool2d((1, 1))
        self.classifier = nn.Linear(512, num_classes)
        self._blocks = [self.block1, self.block2, self.block3, self.block4]
        self._pools = [self.pool0, self.pool1, self.pool2, None]
        self.stage_ends = [1, 2, 3, 4]
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    m.bias.data.zero_()
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.data.fill_(1)
                m.bias.data.zero_()
            elif isinstance(m, nn.Linear):
                m.weight.data.normal_(0, 0.01)
                m.bias.data.zero_()

    # the classifier is a registered nn.Linear named "classifier" (mdistiller's key); nn.Module stores it in
    # _modules, and this property (overriding the base's) reads it back.
    @property
    def classifier(self):  # type: ignore[override]
        return self._modules["classifier"]

    def stem_forward(self, x):
        return F.relu(self.block0(x))

    def block_forward(self, i, h, preact=False):
        if i < 3:
            h = self._pools[i](h)
        elif h.shape[2] >= 8:  # mdistiller pools before block4 only for 64-pixel inputs (8x8 maps here)
            h = self.pool3(h)
        pre = self._blocks[i](h)
        out = F.relu(pre)
        return (out, pre) if preact else out




def _make(cfg_name):
    def builder(num_classes: int = 10, **kw):
        return VGG(CFG[cfg_name], num_classes=num_classes)

    return builder


register_model("vgg8", family="cifar")(_make("S"))
register_model("vgg11", family="cifar")(_make("A"))
register_model("vgg13", family="cifar")(_make("B"))
register_model("vgg16", family="cifar")(_make("D"))
register_model("vgg19", family="cifar")(_make("E"))
