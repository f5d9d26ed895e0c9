"""ReviewKD, knowledge review (Chen et al., CVPR 2021), in mdistiller's CIFAR form.

The student's stage outputs and its pooled feature (as a 1x1 map), ``[s_1, ..., s_n, s_pool]``, are fused from
the deepest one down by attention-based fusion (ABF) modules: each ABF maps its level to ``mid`` channels
(1x1 conv + BN), mixes it with the residual coming from the level below (upsampled, nearest) through two
per-position attention weights (1x1 conv on the concatenation, sigmoid), resizes to the teacher's map (nearest)
and outputs a 3x3 conv + BN to the teacher's channels; the mixed map is the next level's residual. The outputs
are compared with the teacher's pre-ReLU stage outputs and its pooled feature by the hierarchical context loss
(HCL): at each level the MSE of the maps plus, for every ``l`` of 4, 2, 1 smaller than the map, the MSE of the
``l x l`` average-pooled maps with weights 1/2, 1/4, 1/8, divided by the sum of the weights used.

Loss ``ce_weight * CE + weight * min(epoch / warmup, 1) * sum_levels HCL`` (epoch 1-based). mdistiller:
CE weight 1, warm-up 20 epochs, ``mid = min(512, channels of the student's pooled feature)``, the student's
post-ReLU features (``stu_preact: false``); the loss weight per pair is the authors' (ReviewKD repository,
``CIFAR-100/script/reviewKD.sh``): 0.6 resnet56->resnet20, 1.0 resnet110->resnet32, 5.0 for the others.
With ``teacher_preact: false`` the teacher's post-ReLU stage outputs are used (for teachers without
pre-activations, e.g. MobileNetV2).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import Distiller, register_distiller


def hcl_loss(fs: list, ft: list) -> torch.Tensor:
    """ReviewKD's hierarchical context loss, summed over the levels (module doc)."""
    total = 0.0
    for s, t in zip(fs, ft):
        s, t = s.float(), t.float()
        h = s.shape[2]
        loss, cnt, tot = F.mse_loss(s, t), 1.0, 1.0
        for size in (4, 2, 1):
            if size >= h:
                continue
            cnt /= 2.0
            loss = loss + cnt * F.mse_loss(F.adaptive_avg_pool2d(s, size), F.adaptive_avg_pool2d(t, size))
            tot += cnt
        total = total + loss / tot
    return total


class ABF(nn.Module):
    """Attention-based fusion of one student level with the residual from the deeper levels."""

    def __init__(self, c_in: int, c_mid: int, c_out: int, fuse: bool):
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(c_in, c_mid, 1, bias=False), nn.BatchNorm2d(c_mid))
        self.conv2 = nn.Sequential(nn.Conv2d(c_mid, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out))
        self.att = nn.Sequential(nn.Conv2d(2 * c_mid, 2, 1), nn.Sigmoid()) if fuse else None
        nn.init.kaiming_uniform_(self.conv1[0].weight, a=1)
        nn.init.kaiming_uniform_(self.conv2[0].weight, a=1)

    def forward(self, x, residual=None, out_size=None):
        x = self.conv1(x)
        if self.att is not None:
            residual = F.interpolate(residual, x.shape[-2:], mode="nearest")
            a = self.att(torch.cat([x, residual], dim=1))
            x = x * a[:, 0:1] + residual * a[:, 1:2]
        if out_size is not None and tuple(x.shape[-2:]) != tuple(out_size):
            x = F.interpolate(x, out_size, mode="nearest")
        return self.conv2(x), x


@register_distiller("reviewkd")
class ReviewKD(Distiller):
    """ReviewKD (Chen et al., CVPR 2021) distils teacher stages from attention-fused deeper student stages.

    Attention-based fusion (ABF) modules and the hierarchical context loss (HCL)."""

    display_name = "ReviewKD"
    report_order = 54
    DEFAULTS = {"reviewkd": {"ce_weight": 1.0, "weight": 1.0, "warmup": 20, "max_mid_channel": 512,
                             "stu_preact": False, "teacher_preact": True}}
    #: each setting's kind and range, checked before anything is built (lakd.settings; plain data)
    SETTINGS = {
        "reviewkd.ce_weight": {"kind": "number", "ge": 0},
        "reviewkd.weight": {"kind": "number", "ge": 0},
        "reviewkd.warmup": {"kind": "int", "ge": 0, "about":
            "epochs over which the review loss ramps up; the authors': 20"},
        "reviewkd.max_mid_channel": {"kind": "int", "ge": 1, "about": "the ABF modules' widest middle layer"},
        "reviewkd.stu_preact": {"kind": "bool"},
        "reviewkd.teacher_preact": {"kind": "bool"},
    }
    #: checks over several settings, or a setting and the run (lakd.settings)
    CHECKS = [
        {"rule": "not_all_zero", "keys": ["reviewkd.ce_weight", "reviewkd.weight"]},
        {"rule": "compare", "key": "reviewkd.warmup", "op": "<=", "than": "solver.epochs", "waivable": True, "about":
            "the review loss ramps up over reviewkd.warmup epochs and would never reach its full weight"},
        {"rule": "compare", "key": "@smallest_batch", "op": ">=", "than": 2, "about":
            "the BatchNorm of its fusion modules needs two images per step"},
    ]

    def requirements(self):
        s = self.section("reviewkd")
        return {"student": (("preact", "reviewkd.stu_preact", "true"),) if s["stu_preact"] else (),
                "teacher": (("preact", "reviewkd.teacher_preact", "true"),) if s["teacher_preact"] else ()}

    def __init__(self, student, teacher, cfg, num_data=0):
        super().__init__(student, teacher, cfg, num_data)
        s = self.section("reviewkd")
        self.ce_weight = float(s["ce_weight"])
        self.weight = float(s["weight"])
        self.warmup, mid_max = int(s["warmup"]), int(s["max_mid_channel"])
        self.stu_preact, self.teacher_preact = s["stu_preact"], s["teacher_preact"]
        info_s, info_t = student.feature_info(), teacher.feature_info()
        n = min(len(info_s["stages"]), len(info_t["stages"]))
        self.num_stages = n
        ch_s = [f.channels for f in info_s["stages"][-n:]] + [info_s["embedding_dim"]]
        ch_t = [f.channels for f in info_t["stages"][-n:]] + [info_t["embedding_dim"]]
        mid = min(mid_max, ch_s[-1])
        # abfs[i] serves level i (shallowest first); the deepest (pooled) level has nothing to fuse with
        self.abfs = nn.ModuleList(ABF(cs, mid, ct, fuse=i < n) for i, (cs, ct) in enumerate(zip(ch_s, ch_t)))

    def warmup_factor(self) -> float:
        return 1.0 if self.warmup <= 0 else min((self.epoch + 1) / self.warmup, 1.0)

    def fuse(self, levels: list, out_sizes: list) -> list:
        """ABF outputs for ``levels`` (shallowest first, the pooled feature last as a 1x1 map), each resized to
        the teacher's map of its level (``out_sizes``)."""
        outs = [None] * len(levels)
        residual = None
        for i in range(len(levels) - 1, -1, -1):
            outs[i], residual = self.abfs[i](levels[i], residual, out_sizes[i])
        return outs

    def teacher_pass(self, image, **batch):
        _, f = self.teacher_forward(image, features=True, preact=self.teacher_preact)
        stages = f["stages_preact"] if self.teacher_preact else f["stages"]
        return [*stages[-self.num_stages:], f["embedding"][:, :, None, None]]

    def student_losses(self, image, target, t_levels, **batch):
        logits, f = self.student(image, features=True, preact=self.stu_preact)
        stages = f["stages_preact"] if self.stu_preact else f["stages"]
        levels = [*stages[-self.num_stages:], f["embedding"][:, :, None, None]]
        return logits, {
            "ce": self.ce_weight * F.cross_entropy(logits, target),
            "reviewkd": self.weight * self.warmup_factor() * hcl_loss(self.fuse(levels, [t.shape[-2:] for t in t_levels]),
                                                                    t_levels),
        }
