"""OFD, overhaul of feature distillation (Heo et al., 2019), in mdistiller's formulation.

Pre-ReLU stage outputs (``feats["stages_preact"]``) are distilled: each student stage passes through a
connector (1x1 conv + BN, He-normal conv init) to the teacher's channels; the teacher's map is average-pooled
to the student's size; the partial L2 distance of the paper is applied against the teacher target clipped
from below at a per-channel *margin* ``m`` (the expectation of the negative teacher responses)::

    d(s, t) = (s - max(t, m))^2  where  s > max(t, m)  or  t > 0,   else 0

(identical to mdistiller's three-case ``feat_loss``), summed over channels and positions and averaged over the
batch. Stage ``i`` of ``n`` is weighted ``1 / 2^(n - i - 1)`` (the deepest stage 1); the sum is multiplied by
``feat_weight`` = 0.001 (mdistiller's ``OFD.LOSS.FEAT_WEIGHT``; the paper's ``/ 1000``), CE weight 1.

Margins. The paper and mdistiller take them from the affine parameters of the teacher's BN layer that produces
each stage's pre-ReLU output, modelling its per-channel response as N(beta, gamma^2)::

    m = beta - |gamma| phi(beta/|gamma|) / Phi(-beta/|gamma|)  if Phi(-beta/|gamma|) > 0.001, else -3 |gamma|

That BN is found generically: the teacher runs its stem and blocks once on a zero image with forward hooks on
every BatchNorm, and for each stage the *last* BN called while its final block computes its pre-activation
output is taken, skipping BNs inside shortcut branches (module names containing ``downsample`` or
``shortcut``). This picks ``bn2`` of the last basic block (``bn3`` of a bottleneck) for ResNets, the last BN
of each VGG block, and the next block's ``bn1`` (or the final ``bn1``) for the pre-activation WRNs, as
mdistiller's ``get_bn_before_relu`` does. When the nets have different numbers of stages the last ones are paired.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import LakdError
from .base import Distiller, register_distiller


def ofd_margin(gamma: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """Per-channel expectation of the negative part of N(beta, gamma^2) (OFD's margin)."""
    out = []
    for g, b in zip(gamma.tolist(), beta.tolist()):
        s = abs(g)
        if s == 0:
            out.append(min(b, 0.0))
            continue
        cdf = 0.5 * (1 + math.erf(-b / s / math.sqrt(2)))  # Phi(-b/s)
        if cdf > 0.001:
            out.append(-s * math.exp(-((b / s) ** 2) / 2) / math.sqrt(2 * math.pi) / cdf + b)
        else:
            out.append(-3 * s)
    return torch.tensor(out, dtype=torch.float32)


def ofd_distance(s: torch.Tensor, t: torch.Tensor, margin: torch.Tensor) -> torch.Tensor:
    """Partial L2 of OFD: summed over C x H x W, averaged over the batch. ``margin`` broadcasts to ``t``.
    Computed in float32 (the sums overflow float16 under AMP)."""
    s, t = s.float(), t.float()
    target = torch.maximum(t, margin.to(t))
    mask = ((s > target) | (target > 0)).to(s.dtype)
    return ((s - target).pow(2) * mask).sum() / s.shape[0]


@torch.no_grad()
def bn_before_stage_outputs(model) -> list[nn.BatchNorm2d]:
    """For each stage of ``model``, the BN whose output forms that stage's pre-ReLU output (module doc)."""
    names = {m: n for n, m in model.named_modules()}
    calls: list[nn.Module] = []
    hooks = [m.register_forward_hook(lambda mod, inp, out: calls.append(mod))
             for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    p = next(model.parameters())
    was_training = model.training
    model.eval()
    found = []
    try:
        ends = set(model.stage_ends)
        h = model.stem_forward(torch.zeros(1, 3, model.input_size, model.input_size, device=p.device,
                                           dtype=p.dtype))
        for i in range(model.num_blocks):
            calls.clear()
            if (i + 1) in ends:
                h, _ = model.block_forward(i, h, preact=True)
                main = [m for m in calls
                        if not any(k in names.get(m, "").lower() for k in ("downsample", "shortcut"))]
                if not main:
                    label = getattr(model, "label", type(model).__name__)
                    raise LakdError(f"OFD needs a BatchNorm before the pre-ReLU output of every teacher "
                                    f"stage; {label} has none at block {i + 1}; use another teacher")
                found.append(main[-1])
            else:
                h = model.block_forward(i, h)
    finally:
        for hk in hooks:
            hk.remove()
        model.train(was_training)
    return found


def connector(s_channels: int, t_channels: int, kernel_size: int = 1) -> nn.Sequential:
    conv = nn.Conv2d(s_channels, t_channels, kernel_size, padding=(kernel_size - 1) // 2, bias=False)
    nn.init.normal_(conv.weight, 0.0, math.sqrt(2.0 / (kernel_size * kernel_size * t_channels)))
    bn = nn.BatchNorm2d(t_channels)
    return nn.Sequential(conv, bn)


@register_distiller("ofd")
class OFD(Distiller):
    display_name = "OFD"
    report_order = 4
    DEFAULTS = {"ofd": {"ce_weight": 1.0, "feat_weight": 0.001, "connector_kernel": 1}}
    #: each setting's kind and range, checked before anything is built (lakd.settings; plain data)
    SETTINGS = {
        "ofd.ce_weight": {"kind": "number", "ge": 0},
        "ofd.feat_weight": {"kind": "number", "ge": 0},
        "ofd.connector_kernel": {"kind": "int", "ge": 1, "odd": True, "about": "the connector's kernel size"},
    }
    #: checks over several settings, or a setting and the run (lakd.settings)
    CHECKS = [
        {"rule": "not_all_zero", "keys": ["ofd.ce_weight", "ofd.feat_weight"]},
    ]
    #: pre-ReLU stage outputs of both models (MobileNetV2's stages end with a linear projection: none)
    needs = ("preact",)

    def __init__(self, student, teacher, cfg, num_data=0):
        super().__init__(student, teacher, cfg, num_data)
        s = self.section("ofd")
        self.ce_weight, self.feat_weight = float(s["ce_weight"]), float(s["feat_weight"])
        k = int(s["connector_kernel"])
        ch_s = [f.channels for f in student.feature_info()["stages"]]
        ch_t = [f.channels for f in teacher.feature_info()["stages"]]
        self.num_stages = n = min(len(ch_s), len(ch_t))
        self.connectors = nn.ModuleList(connector(cs, ct, k) for cs, ct in zip(ch_s[-n:], ch_t[-n:]))
        bns = bn_before_stage_outputs(teacher)[-n:]
        for i, bn in enumerate(bns):
            m = ofd_margin(bn.weight.detach().cpu(), bn.bias.detach().cpu())
            # derived from the teacher, so not saved with the distiller's state
            self.register_buffer(f"margin{i}", m.view(1, -1, 1, 1).to(bn.weight.device), persistent=False)

    def margins(self) -> list[torch.Tensor]:
        return [getattr(self, f"margin{i}") for i in range(self.num_stages)]

    def ofd_loss(self, pre_s: list, pre_t: list) -> torch.Tensor:
        n = self.num_stages
        total = 0.0
        for i, (fs, ft, conn, m) in enumerate(zip(pre_s[-n:], pre_t[-n:], self.connectors, self.margins())):
            s = conn(fs)
            t = F.adaptive_avg_pool2d(ft, s.shape[-2:])
            total = total + ofd_distance(s, t, m) / 2 ** (n - i - 1)
        return total

    def teacher_pass(self, image, **batch):
        return self.teacher_forward(image, features=True, preact=True)[1]["stages_preact"]

    def student_losses(self, image, target, t_preact, **batch):
        logits, feats = self.student(image, features=True, preact=True)
        return logits, {
            "ce": self.ce_weight * F.cross_entropy(logits, target),
            "ofd": self.feat_weight * self.ofd_loss(feats["stages_preact"], t_preact),
        }
