"""SDD, scale decoupled distillation (Wei, Luo, Luo, CVPR 2024): logit distillation on the logits of regions of the
last feature map at several scales, the regions where the teacher's local and global predictions disagree
weighted up.

The last feature map (the input of global pooling) is average-pooled to an ``s x s`` grid for every scale ``s``
of ``sdd.scales`` (the authors' ``M``: [1, 2, 4]), and the classifier is applied to every region's pooled vector:
N = sum s^2 region logits per image, the first (scale 1) the global one. A logit loss (``sdd.base``: ``kd`` for
SD-KD, ``dkd`` for SD-DKD) is computed for each of the N x B region pairs of student and teacher, with the label
of the image. Each pair's loss is weighted by whether the teacher's region prediction (``argmax``) and its global
one are both right or both wrong (consistent: 1) or one right and the other wrong (complementary:
``complementary_weight``, the authors' 2), and the weighted losses are summed and divided by N x B::

    SD-KD   = sum_{n,b} w_nb * T^2 KL(softmax(z^t_nb / T) || softmax(z^s_nb / T)) / (N B)
    SD-DKD  = sum_{n,b} w_nb * (alpha TCKD_nb + beta NCKD_nb) / (N B)          (DKD's terms per pair, times T^2)
    loss    = ce_weight * CE(global logits) + kd_weight * warm-up(epoch) * SD-*

as the authors' code (shicaiwei123/SDD-CVPR2024: ``SPP`` in ``mdistiller/models/cifar/utils.py``, ``sdd_kd_loss``
in ``mdistiller/distillers/KD.py``, ``multi_dkd`` in ``SDD_DKD.py``). The warm-up is DKD's ``min(epoch /
warmup, 1)`` (1-based epochs): the authors use it for SD-DKD (20 epochs on CIFAR-100, 1 on ImageNet) and none for
SD-KD (variant ``sdd_kd``: ``warmup`` 0, mdistiller's KD weights 0.1 / 0.9).

Pooling as their ``SPP``: the map is average-pooled to the finest grid of the scales and 4 (their SPP always pools
to 4 x 4 first, adaptively), and the coarser grids are averaged from that grid where it divides (on an 8 x 8
map the same as pooling the map directly; on ImageNet's 7 x 7 the overlapping adaptive windows make the scale-1
region differ slightly from the plain global average, as theirs). The region logits are the network's class maps
of the pooled grid plus the classifier's bias (``FeatureNet.class_maps``: for the zoo the classifier applied to
each region's vector, as their ``self.fc(x_spp)``), so the method needs a network with a classifier after global
pooling.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import LakdError
from .base import Distiller, register_distiller

BASES = ("kd", "dkd")
SPP_GRID = 4  # the authors' SPP pools to 4 x 4 before the coarser grids


def region_logits(model, fmap: torch.Tensor, scales) -> torch.Tensor:
    """B x K x N logits of the N = sum s^2 regions of ``fmap`` (B x C x H x W), scale by scale in ``scales`` order,
    each grid's regions row by row (the authors' ``SPP`` layout; scale 1 first, the global region)."""
    finest = max(max(scales), SPP_GRID)
    grid = F.adaptive_avg_pool2d(fmap, finest)
    pooled = []
    for s in scales:
        src = grid if finest % s == 0 else fmap
        pooled.append(F.adaptive_avg_pool2d(src, s).flatten(2))  # B x C x s^2
    x = torch.cat(pooled, dim=2).unsqueeze(3)  # B x C x N x 1: a map whose positions are the regions
    out = model.class_maps(x).squeeze(3)  # B x K x N
    bias = getattr(model.classifier, "bias", None)
    return out if bias is None else out + bias.view(1, -1, 1)


def region_weights(t_regions: torch.Tensor, target: torch.Tensor, complementary: float) -> torch.Tensor:
    """N x B weights: ``complementary`` where the teacher's region prediction is right and its global one (region 0)
    wrong or the other way round, 1 where both agree in being right or wrong."""
    pred = t_regions.argmax(dim=1).t()  # N x B
    local_ok = pred == target.unsqueeze(0)
    global_ok = local_ok[0:1]
    w = torch.ones_like(local_ok, dtype=torch.float32)
    return torch.where(local_ok != global_ok, torch.full_like(w, complementary), w)


def kd_rows(z_s: torch.Tensor, z_t: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T^2 KL(softmax(z_t / T) || softmax(z_s / T))`` per row."""
    log_p_s = F.log_softmax(z_s / temperature, dim=1)
    log_p_t = F.log_softmax(z_t / temperature, dim=1)
    return (log_p_t.exp() * (log_p_t - log_p_s)).sum(1) * temperature**2


def dkd_rows(z_s: torch.Tensor, z_t: torch.Tensor, target: torch.Tensor, temperature: float):
    """DKD's (TCKD, NCKD) per row, times T^2 (mdistiller's ``dkd_loss`` before its batch reduction)."""
    gt = F.one_hot(target, z_s.shape[1]).to(torch.bool)
    p_s = F.softmax(z_s / temperature, dim=1)
    p_t = F.softmax(z_t / temperature, dim=1)
    b_s = torch.stack([(p_s * gt).sum(1), (p_s * ~gt).sum(1)], dim=1)
    b_t = torch.stack([(p_t * gt).sum(1), (p_t * ~gt).sum(1)], dim=1)
    tckd = F.kl_div(torch.log(b_s), b_t, reduction="none").sum(1)
    log_q_s = F.log_softmax(z_s / temperature - 1000.0 * gt, dim=1)
    q_t = F.softmax(z_t / temperature - 1000.0 * gt, dim=1)
    nckd = F.kl_div(log_q_s, q_t, reduction="none").sum(1)
    return tckd * temperature**2, nckd * temperature**2


def sdd_loss(s_regions: torch.Tensor, t_regions: torch.Tensor, target: torch.Tensor, base: str = "dkd",
             temperature: float = 4.0, alpha: float = 1.0, beta: float = 8.0,
             complementary: float = 2.0) -> torch.Tensor:
    """The weighted region loss (module docstring) from B x K x N region logits of student and teacher."""
    if base not in BASES:
        raise LakdError(f"sdd.base {base!r} is not one of kd (SD-KD), dkd (SD-DKD)")
    n = s_regions.shape[2]
    z_s = s_regions.float().permute(2, 0, 1).reshape(-1, s_regions.shape[1])  # (N B) x K, region-major
    z_t = t_regions.float().permute(2, 0, 1).reshape(-1, t_regions.shape[1])
    y = target.repeat(n)
    if base == "kd":
        rows = kd_rows(z_s, z_t, temperature)
    else:
        tckd, nckd = dkd_rows(z_s, z_t, y, temperature)
        rows = alpha * tckd + beta * nckd
    w = region_weights(t_regions.float(), target, complementary).reshape(-1)
    return (rows * w).sum() / rows.shape[0]


@register_distiller("sdd")
class SDD(Distiller):
    """SDD (Wei et al., CVPR 2024) distils the logits of multi-scale regions; sdd_kd: on KD instead of DKD.

    Settings (``sdd``): ``base`` (``dkd``: SD-DKD, ``kd``: SD-KD), ``scales`` (grid sizes, 1 first),
    ``complementary_weight``, ``ce_weight``, ``kd_weight``, ``T``, ``alpha`` and ``beta`` (DKD's), ``warmup``
    (epochs)."""

    display_name = "SDD"
    report_order = 26
    needs = ("class_maps",)
    DEFAULTS = {"sdd": {"base": "dkd", "scales": [1, 2, 4], "complementary_weight": 2.0, "ce_weight": 1.0,
                        "kd_weight": 1.0, "T": 4.0, "alpha": 1.0, "beta": 8.0, "warmup": 20}}
    #: each setting's kind and range, checked before anything is built (lakd.settings; plain data)
    SETTINGS = {
        "sdd.base": {"kind": "choice", "choices": ["kd", "dkd"], "about": "the loss on each region: SD-KD or SD-DKD"},
        "sdd.scales": {"kind": "ints", "ge": 1, "nonempty": True, "about": "grid sizes, 1 (the global region) first"},
        "sdd.complementary_weight": {"kind": "number", "ge": 0},
        "sdd.ce_weight": {"kind": "number", "ge": 0},
        "sdd.kd_weight": {"kind": "number", "ge": 0},
        "sdd.T": {"kind": "number", "gt": 0, "about": "the temperature"},
        "sdd.alpha": {"kind": "number", "ge": 0, "about": "DKD's target-class weight"},
        "sdd.beta": {"kind": "number", "ge": 0, "about": "DKD's non-target weight"},
        "sdd.warmup": {"kind": "number", "ge": 0, "about": "epochs over which the region loss ramps up"},
    }
    #: checks over several settings, or a setting and the run (lakd.settings)
    CHECKS = [
        {"rule": "not_all_zero", "keys": ["sdd.ce_weight", "sdd.kd_weight"]},
        {"rule": "compare", "key": "sdd.warmup", "op": "<=", "than": "solver.epochs", "waivable": True, "about":
            "the region loss ramps up over sdd.warmup epochs and would never reach its full weight"},
    ]
    #: SD-KD: KD on the regions at mdistiller's KD weights, no warm-up (the authors' SDD_KD)
    variants = {"sdd_kd": ["sdd.base=kd", "sdd.ce_weight=0.1", "sdd.kd_weight=0.9", "sdd.warmup=0"]}

    def __init__(self, student, teacher, cfg, num_data=0):
        super().__init__(student, teacher, cfg, num_data)
        s = self.section("sdd")
        self.base = s["base"]
        scales = s["scales"]
        if (not isinstance(scales, (list, tuple)) or not scales or scales[0] != 1
                or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in scales)
                or len(set(scales)) != len(scales)):
            raise LakdError(f"sdd.scales must be a list of distinct grid sizes starting with 1 (the global region), "
                            f"e.g. [1, 2, 4]; got {scales!r}")
        self.scales = [int(v) for v in scales]
        self.ce_weight, self.kd_weight, self.alpha, self.beta = (
            float(s[k]) for k in ("ce_weight", "kd_weight", "alpha", "beta"))
        self.T, self.complementary, self.warmup = float(s["T"]), float(s["complementary_weight"]), float(s["warmup"])

    def warmup_factor(self) -> float:
        return 1.0 if self.warmup <= 0 else min((self.epoch + 1) / self.warmup, 1.0)

    def teacher_pass(self, image, **batch):
        _, feats = self.teacher_forward(image, features=True)
        return region_logits(self.teacher, feats["last"], self.scales)

    def student_losses(self, image, target, t_regions, **batch):
        logits, feats = self.student(image, features=True)
        s_regions = region_logits(self.student, feats["last"], self.scales)
        with torch.autocast(device_type=logits.device.type, enabled=False):
            loss = sdd_loss(s_regions, t_regions, target, self.base, self.T, self.alpha, self.beta,
                            self.complementary)
        return logits, {
            "ce": self.ce_weight * F.cross_entropy(logits, target),
            "sdd": self.kd_weight * self.warmup_factor() * loss,
        }
