"""MLKD, multi-level logit distillation (Jin et al., CVPR 2023): instance, batch and class alignment.

As the authors' code (github.com/Jin-Ying/Multi-Level-Logit-Distillation, ``mdistiller/distillers/KD_ours.py``,
class ``KD_ours``; the same losses as ``MLKD`` in sunshangquan/logit-standardization-KD,
``mdistiller/distillers/MLKD.py``). With softmaxes ``P_s``, ``P_t`` (B x C) at each temperature ``T`` of
``temperatures`` (prediction augmentation; theirs ``KD.TEMPERATURE`` = 4, then 3, 5, 2, 6):

- instance level ``KL(T) = mean_i KL(P_t[i] || P_s[i]) * T^2`` (their ``kd_loss``);
- batch level ``BC(T) = sum (P_t P_t^T - P_s P_s^T)^2 / B`` over the B x B Gram matrices (``bc_loss``);
- class level ``CC(T) = sum (P_t^T P_t - P_s^T P_s)^2 / C`` over the C x C matrices (``cc_loss``).

Confidence masks, from the teacher's ``softmax(z_t)`` at T = 1: ``m_i = [max_c p_t[i, c] <= q]`` with ``q`` the
batch's ``mask_percentile`` (50: the median; linear interpolation, as ``np.percentile``), and per class
``c_j = [sum_i p_t[i, j] <= q']``, the percentile over classes.

How the masks act, ``mlkd.mask_mode``:

- ``reference`` (default; the authors' code): each term is computed already reduced to a scalar and then
  multiplied by the mask vector and averaged, ``(loss * mask).mean()``, which is the scalar times the kept
  fraction ``mean_i m_i`` (``mean_j c_j`` for the class term). No sample is selected: the masks only scale the
  weak-view terms, by about 1/2 at the median;
- ``per_sample`` (the paper's reading, selection): the per-sample KL and Gram-row errors (per-class Gram-column
  errors) times the mask, averaged over all B samples (C classes), ``mean_i m_i KL_i`` etc.

The authors train on two views of every image, a weak (crop + flip) and a strong (+ RandAugment(2, 10)) one, and
add, with ``w`` = ``kd_weight``::

    ce_weight * (CE_weak + CE_strong)
    + w * sum_T frac_m * KL_weak(T)                        masked, every T
    + w * (KL_strong(4) + KL_strong(3) + KL_strong(5) + KL_weak(2) + KL_weak(6))   unmasked (the last two
                                                                                   on the weak view, as coded)
    + w * sum_T frac_c * CC_weak(T) + w * sum_T frac_m * BC_weak(T)

(their strong-view batch and class terms are computed but left out of the loss, so they are left out here).
``mlkd.views: 2`` runs it so: the batch image is the weak view (crop + flip) and the data pipeline makes the strong view
of every image per sample (``views``: ``STRONG_VIEW``, ``lakd.data.views``), as the authors' dataset does: its own crop
and flip, then their RandAugment (two of their 14 operations at uniform random magnitudes, then a Cutout of up to half
the side in their grey), in the DataLoader workers with PIL's operations (``data.fast: false``) or batched on the device
with the same pixels (the in-memory loader); student and teacher run on both views, and the unmasked instance terms at
the first three temperatures are on the strong view (the only difference from theirs: the random numbers come from
torch's seeded generators, not Python's ``random`` and numpy's). ``mlkd.views: 1`` (the default, and the library's
one-view reading) lets the one view stand for both: the CE term is ``2 * ce_weight * CE`` (a CE per view, each at
``ce_weight``), the instance term ``w * sum_T (frac_m + 1) * KL(T)``, the batch and class terms as above on that view.
``mlkd.logit_stand: true`` z-scores the logits of the instance level only (Sun et al., CVPR 2024, as in their ``MLKD``;
the masks and the batch and class levels keep the raw logits); variant ``mlkd_ls``: temperatures 2, 3, 5, 2, 6 (their
``--base-temp 2``) and ``kd_weight`` 9 (``--kd-weight 9``). No warm-up (the authors' ``forward_train`` ignores the
epoch). Weights 0.1 / 0.9 are mdistiller's ``KD`` defaults, which the authors' configs leave unchanged.

Scale: at the authors' weights the distillation part is ``0.9 * 1.5 = 1.35`` times a five-temperature KD, whose
logit gradients are each about KD's, against a CE of 0.2: about 7x the gradient of a CE 0.1 / KD 0.9 KD. The
authors train at lr 0.025 (half mdistiller's 0.05) for 240 epochs (480 in their first release, March 2023).
The class level is divided by C but not by the batch size: ``P^T P`` sums over the batch, so with few classes it
is large (at a student's start, batch 64: about 14 with 10 classes, 0.01 with 100). At a short budget and a
larger lr, and above all with 10 classes, it learns slowly (docs/methods.md gives the measurements).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import LakdError
from .base import Distiller, register_distiller
from .kd import standardize


def instance_kl(logits_s: torch.Tensor, logits_t: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per-sample ``KL(p_t || p_s) * T^2`` (a vector of B values)."""
    log_p_s = F.log_softmax(logits_s / temperature, dim=1)
    log_p_t = F.log_softmax(logits_t / temperature, dim=1)
    return (log_p_t.exp() * (log_p_t - log_p_s)).sum(1) * temperature**2


def batch_errors(p_s: torch.Tensor, p_t: torch.Tensor) -> torch.Tensor:
    """Per-sample row errors of the B x B Gram matrices ``P P^T`` (the authors' batch-level consistency)."""
    return ((p_t @ p_t.t() - p_s @ p_s.t()) ** 2).sum(1)


def class_errors(p_s: torch.Tensor, p_t: torch.Tensor) -> torch.Tensor:
    """Per-class column errors of the C x C matrices ``P^T P`` (the authors' class-level consistency)."""
    return ((p_t.t() @ p_t - p_s.t() @ p_s) ** 2).sum(0)


def below_percentile(values: torch.Tensor, percentile: float) -> torch.Tensor:
    """1.0 where ``values <= `` their ``percentile`` (linear interpolation, numpy's default), else 0.0."""
    thresh = torch.quantile(values.float(), percentile / 100.0)
    return (values <= thresh).float()


MASK_MODES = ("reference", "per_sample")


STRONG_TERMS = 3  # the authors' unmasked instance terms on the strong view: their first three temperatures
#: the authors' strong view (Jin-Ying/Multi-Level-Logit-Distillation, mdistiller/dataset/cifar100.py,
#: ``get_cifar100_train_transform_strong``): its own crop and flip, RandAugment(2, 10), Cutout of up to half the
#: side; a ``lakd.data.views`` spec, reusable by other methods trained on weak and strong views
STRONG_VIEW = {"strong": {"randaugment": 2, "cutout": 0.5}}


def mlkd_terms(logits_s, logits_t, temperatures, percentile: float = 50.0, logit_stand: bool = False,
               mask_mode: str = "reference", strong: tuple[torch.Tensor, torch.Tensor] | None = None):
    """(instance, batch, class) losses summed over ``temperatures``, masked as ``mask_mode`` says (module
    docstring): instance ``sum_T (masked KL(T) + KL(T))``, batch ``sum_T masked BC(T)``, class ``sum_T masked
    CC(T)``, all on the (weak) view ``logits_s``/``logits_t``; with ``strong = (student, teacher)`` logits of the
    strong view, the unmasked ``KL(T)`` of the first three temperatures is taken on it (the authors' code)."""
    if mask_mode not in MASK_MODES:
        raise LakdError(f"mlkd.mask_mode {mask_mode!r} is not one of {', '.join(MASK_MODES)}")
    logits_s, logits_t = logits_s.float(), logits_t.float()
    with torch.no_grad():
        p1 = F.softmax(logits_t, dim=1)
        mask = below_percentile(p1.max(dim=1).values, percentile)
        class_mask = below_percentile(p1.sum(dim=0), percentile)
    reference = mask_mode == "reference"
    if reference:  # (scalar * mask).mean(): the scalar times the kept fraction
        mask, class_mask = mask.mean(), class_mask.mean()
    zs, zt = (standardize(logits_s), standardize(logits_t)) if logit_stand else (logits_s, logits_t)
    if strong is not None:
        ss, st = strong[0].float(), strong[1].float()
        ss, st = (standardize(ss), standardize(st)) if logit_stand else (ss, st)
    inst = bat = cls = logits_s.new_zeros(())
    for k, t in enumerate(temperatures):
        kl = instance_kl(zs, zt, t)
        # the unmasked instance term: on the strong view for the first three temperatures when there is one
        kl_free = instance_kl(ss, st, t) if strong is not None and k < STRONG_TERMS else kl
        p_s, p_t = F.softmax(logits_s / t, dim=1), F.softmax(logits_t / t, dim=1)
        b_err, c_err = batch_errors(p_s, p_t), class_errors(p_s, p_t)
        if reference:
            inst = inst + kl.mean() * mask + kl_free.mean()
            bat = bat + b_err.mean() * mask
            cls = cls + c_err.mean() * class_mask
        else:
            inst = inst + (kl * mask).mean() + kl_free.mean()
            bat = bat + (b_err * mask).mean()
            cls = cls + (c_err * class_mask).mean()
    return inst, bat, cls


@register_distiller("mlkd")
class MLKD(Distiller):
    """MLKD (Jin et al. CVPR 2023) distils instance, batch, class logit relations; mlkd_ls: + logit standardization.

    Settings (``mlkd``): ``ce_weight`` (per view; with one view its CE counts twice, as the authors' weak +
    strong), ``kd_weight``, ``temperatures``, ``mask_percentile``, ``mask_mode`` (``reference``: the authors' masks,
    which scale by the kept fraction; ``per_sample``: the paper's selection), ``logit_stand`` (variant ``mlkd_ls``:
    + logit standardization, Sun et al. CVPR 2024), ``views`` (2: the authors' weak + RandAugment views, the strong
    one made per sample by the data pipeline; 1: one view for both)."""

    display_name = "MLKD"
    report_order = 23
    DEFAULTS = {"mlkd": {"ce_weight": 0.1, "kd_weight": 0.9, "temperatures": [4.0, 3.0, 5.0, 2.0, 6.0],
                         "mask_percentile": 50.0, "mask_mode": "reference", "logit_stand": False, "views": 1}}
    #: each setting's kind and range, checked before anything is built (lakd.settings; plain data)
    SETTINGS = {
        "mlkd.ce_weight": {"kind": "number", "ge": 0},
        "mlkd.kd_weight": {"kind": "number", "ge": 0},
        "mlkd.temperatures": {"kind": "numbers", "gt": 0, "nonempty": True, "about": "the authors': [4, 3, 5, 2, 6]"},
        "mlkd.mask_percentile": {"kind": "number", "ge": 0, "le": 100, "about": "the authors': 50"},
        "mlkd.mask_mode": {"kind": "choice", "choices": list(MASK_MODES), "about":
            "reference: the authors' code, per_sample: the paper's selection"},
        "mlkd.logit_stand": {"kind": "bool", "about": "logit standardization"},
        "mlkd.views": {"kind": "choice", "choices": [1, 2], "about":
            "1: one view stands for both, 2: the authors' weak and RandAugment views"},
    }
    #: checks over several settings, or a setting and the run (lakd.settings)
    CHECKS = [
        {"rule": "not_all_zero", "keys": ["mlkd.ce_weight", "mlkd.kd_weight"]},
    ]
    #: MLKD with logit standardization as the LS reference runs it (--logit-stand --base-temp 2 --kd-weight 9)
    variants = {"mlkd_ls": ["mlkd.logit_stand=true", "mlkd.temperatures=[2.0,3.0,5.0,2.0,6.0]",
                            "mlkd.kd_weight=9.0"]}

    def __init__(self, student, teacher, cfg, num_data=0):
        super().__init__(student, teacher, cfg, num_data)
        s = self.section("mlkd")
        self.ce_weight, self.kd_weight = float(s["ce_weight"]), float(s["kd_weight"])
        self.temperatures = [float(t) for t in s["temperatures"]]
        self.percentile, self.mask_mode = float(s["mask_percentile"]), s["mask_mode"]
        self.logit_stand = bool(s["logit_stand"])
        self.num_views = self._num_views(s["views"])

    @staticmethod
    def _num_views(views) -> int:
        if views not in (1, 2) or isinstance(views, bool):
            raise LakdError(f"mlkd.views must be 1 (one view stands for both) or 2 (the authors' weak and "
                            f"RandAugment views), got {views!r}")
        return int(views)

    @classmethod
    def views(cls, cfg: dict) -> dict[str, dict]:
        """With ``mlkd.views: 2``, the authors' strong view (``STRONG_VIEW``)."""
        n = cls._num_views({**cls.DEFAULTS["mlkd"], **(cfg.get("mlkd") or {})}["views"])
        return dict(STRONG_VIEW) if n == 2 else {}

    @staticmethod
    def _strong(image: torch.Tensor, views: dict | None) -> torch.Tensor:
        strong = (views or {}).get("strong")
        if strong is None:
            raise LakdError("mlkd.views=2 trains on a strong view of every image (its own crop, RandAugment, Cutout) "
                            "that the data pipeline makes (batch['views']['strong']), but this batch has none; train "
                            "through lakd (lakd train, lakd.build), pass batch['views'] = {'strong': images} "
                            "yourself, or set mlkd.views=1")
        if strong.shape != image.shape:
            raise LakdError(f"mlkd: the strong view {tuple(strong.shape)} does not match the batch "
                            f"{tuple(image.shape)}; it must hold a view of each of the batch's images")
        if not image.is_contiguous() and image.is_contiguous(memory_format=torch.channels_last):
            strong = strong.contiguous(memory_format=torch.channels_last)
        return strong

    def teacher_pass(self, image, views=None, **batch):
        if self.num_views == 1:
            return super().teacher_pass(image, **batch)
        strong = self._strong(image, views)
        return self.teacher_forward(torch.cat([image, strong])), strong  # eval mode: one pass is two

    def student_losses(self, image, target, t_out, **batch):
        if self.num_views == 1:
            logits = self.student(image)
            inst, bat, cls = mlkd_terms(logits, t_out, self.temperatures, self.percentile, self.logit_stand,
                                        self.mask_mode)
            # the authors' ce_weight * (CE_weak + CE_strong), both views being this one
            ce = 2.0 * self.ce_weight * F.cross_entropy(logits, target)
        else:
            t_logits, strong = t_out
            b = image.shape[0]
            # two passes, as the authors': in training mode each view's BatchNorm statistics are its own
            logits, s_strong = self.student(image), self.student(strong)
            inst, bat, cls = mlkd_terms(logits, t_logits[:b], self.temperatures, self.percentile,
                                        self.logit_stand, self.mask_mode, strong=(s_strong, t_logits[b:]))
            ce = self.ce_weight * (F.cross_entropy(logits, target) + F.cross_entropy(s_strong, target))
        return logits, {
            "ce": ce,
            "instance": self.kd_weight * inst,
            "batch": self.kd_weight * bat,
            "class": self.kd_weight * cls,
        }
