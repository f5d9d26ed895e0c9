"""SSKD, knowledge distillation meets self-supervision (Xu et al., ECCV 2020), as the authors' ``student.py``.

Every training batch of ``B`` images is expanded to ``4B``: each image followed by its copies rotated by 90, 180 and 270
degrees (``torch.rot90`` over H x W, as the authors' ``np.rot90``; row ``4i + k`` is image ``i`` rotated ``k`` times,
their layout; where the copies come from: ``sskd.views`` below). Student and teacher run on all ``4B`` images (the
student's BatchNorm sees them all). An SS head (``Linear(d, d), ReLU, Linear(d, d)`` on the penultimate embedding,
``feats["embedding"]``, of width ``d``) gives each network a representation ``z``; ``S`` (3B x B) holds the cosine
similarity of each rotated copy's ``z`` to every normal image's ``z``, the column of its own image being the "right
answer". With the teacher's class probabilities ``p^t`` and the student's ``p^s``:

- ``ce``: cross-entropy of the student on the ``B`` normal images;
- ``kd``: ``KL(p^t_T || p^s_T) * T^2`` on the normal images (``kd_T``), batch mean;
- ``tf``: the same KL on the ``3B`` rotated copies (``tf_T``), over the copies kept by the teacher's error
  ranking (below, ``ratio_tf``), averaged over the kept ones;
- ``ss``: ``KL(softmax(S_t / ss_T) || softmax(S_s / ss_T)) * ss_T^2`` row by row, over the rows kept by the
  teacher's error ranking of ``S_t`` (``ratio_ss``), averaged over the kept ones.

Error ranking (the authors' "error level ranking"): a row's error level is the rank of its right answer among the
teacher's scores of that row (0: the teacher is right). Every right row is kept, and of the ``w`` wrong ones the
``floor(ratio * w)`` of lowest level (ties: the earlier row; the authors' unstable ``argsort`` leaves them to
chance, and a level with tied scores counts only the strictly larger ones).

The teacher's SS head is trained first, the teacher frozen (in eval mode, its embedding detached), by
``prepare``: cross-entropy of ``S_t`` (no temperature) against the right column, ``pretrain_epochs`` (60) at
``pretrain_lr`` (0.05) times ``pretrain_gamma`` (0.1) at the epochs ``pretrain_milestones`` (30, 45), the
authors' ``--t-epoch 60 --t-lr 0.05 --t-milestones 30 45``; the head is fixed afterwards. The student's SS head
trains with the student. Defaults: the authors' ``student.py`` (CE 0.1, KD 0.9, TF 2.7, SS 10, ``kd_T = tf_T =
4``, ``ss_T = 0.5``, ``ratio_tf = 1``, ``ratio_ss = 0.75``), the same for every CIFAR-100 pair of their
``command.sh``.

The copies, ``sskd.views``: ``per_sample`` (default, the authors' ``cifar.py``) asks the data pipeline for three views
of every image (``views``: ``rot90``, ``rot180``, ``rot270``), each the image rotated with a random crop of its own and
the flip of the normal image (theirs flips the image once, then rotates it and crops every copy; a random crop of the
padded square image, then the rotation, is distributed as theirs), made per sample in the DataLoader workers or batched
on the device (``lakd.data.views``); ``batch`` rotates the batch's (cropped, flipped) image in the method, so the four
copies share one crop (the library's former reading, and the way for one's own loop without those views).

Differences from the authors' code: the losses and the ranking are computed in float32 (also under AMP). Under
torchrun each process ranks and averages its own batch.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import LakdError
from .base import Distiller, register_distiller

ROTATIONS = 4
#: the rotated copies the data pipeline makes with ``sskd.views: per_sample`` (``Distiller.views``; a spec of
#: ``lakd.data.views``): quarter turns 1, 2, 3, each with its own crop and the normal image's flip
ROTATED_COPIES = {f"rot{90 * k}": {"flip": "shared", "rotate": k} for k in range(1, ROTATIONS)}
VIEW_MODES = ("per_sample", "batch")


def rotated_batch(image: torch.Tensor) -> torch.Tensor:
    """``4B`` images from ``B``: row ``4i + k`` is image ``i`` rotated by ``k * 90`` degrees (counter-clockwise,
    ``np.rot90``'s direction), in the batch's memory format (``train.channels_last``)."""
    if image.dim() != 4 or image.shape[-1] != image.shape[-2]:
        raise LakdError(f"sskd rotates every image by 90 degrees, which needs square B x C x H x W images, got "
                        f"{tuple(image.shape)}; train on square crops (data.image_size) or use another method")
    out = torch.stack([torch.rot90(image, k, (2, 3)) for k in range(ROTATIONS)], dim=1).flatten(0, 1)
    if not image.is_contiguous() and image.is_contiguous(memory_format=torch.channels_last):
        out = out.contiguous(memory_format=torch.channels_last)
    return out


def stacked_copies(image: torch.Tensor, views: dict | None) -> torch.Tensor:
    """``4B`` images from the batch ``image`` and its rotated copies ``views`` (``ROTATED_COPIES``, made per sample
    by the data pipeline): row ``4i + k`` is copy ``k`` of image ``i`` (copy 0: the image itself), in the batch's
    memory format."""
    missing = [k for k in ROTATED_COPIES if k not in (views or {})]
    if missing:
        raise LakdError(f"sskd.views=per_sample trains on rotated copies of every image with crops of their own, "
                        f"which the data pipeline makes (batch['views'] with {', '.join(ROTATED_COPIES)}), but this "
                        f"batch lacks {', '.join(missing)}; train through lakd (lakd train, lakd.build), or set "
                        f"sskd.views=batch to rotate the batch's images in the method (e.g. options={{'sskd': "
                        f"{{'views': 'batch'}}}} in lakd.distiller)")
    copies = [image] + [views[k] for k in ROTATED_COPIES]
    if any(c.shape != image.shape for c in copies):
        raise LakdError(f"sskd: the rotated copies {[tuple(c.shape) for c in copies[1:]]} do not match the batch "
                        f"{tuple(image.shape)}; they must be made from the same images (lakd.data views)")
    out = torch.stack(copies, dim=1).flatten(0, 1)
    if not image.is_contiguous() and image.is_contiguous(memory_format=torch.channels_last):
        out = out.contiguous(memory_format=torch.channels_last)
    return out


def split_rotations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows of the normal images (B) and of their rotated copies (3B, image-major) of a ``4B`` batch."""
    x = x.reshape(-1, ROTATIONS, *x.shape[1:])
    return x[:, 0], x[:, 1:].flatten(0, 1)


def rotation_similarity(z: torch.Tensor) -> torch.Tensor:
    """3B x B: the cosine similarity of each rotated copy's representation to each normal image's."""
    normal, rotated = split_rotations(z.flatten(1))
    return F.normalize(rotated, dim=1, eps=1e-8) @ F.normalize(normal, dim=1, eps=1e-8).t()


def rotation_targets(batch: int, device=None) -> torch.Tensor:
    """The right column of each row of ``rotation_similarity``: the copy's own image."""
    return torch.arange(batch, device=device).repeat_interleave(ROTATIONS - 1)


def error_levels(scores: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Each row's error level: how many entries score above the right one (0: the row's top entry is right)."""
    return (scores > scores.gather(1, target[:, None])).sum(1)


def kept_rows(levels: torch.Tensor, ratio: float) -> torch.Tensor:
    """Boolean mask of the rows kept: every right row (level 0) and ``floor(ratio * wrong)`` of the wrong ones, of
    lowest level (ties: the earlier row). Computed on the device (no synchronisation)."""
    n = levels.shape[0]
    wrong = (levels > 0).sum()
    keep = n - wrong + torch.floor(wrong.double() * ratio).long()
    order = torch.argsort(levels, stable=True)
    position = torch.empty_like(order)
    position[order] = torch.arange(n, device=levels.device)
    return position < keep


def kept_kl(log_p_s: torch.Tensor, log_p_t: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    """``KL(p_t || p_s)`` per row, averaged over the kept rows (all without ``keep``; 0 when none is kept)."""
    rows = (log_p_t.exp() * (log_p_t - log_p_s)).sum(1)
    if keep is None:
        return rows.mean()
    return (rows * keep).sum() / keep.sum().clamp(min=1)


def sskd_terms(s_logits: torch.Tensor, t_logits: torch.Tensor, s_z: torch.Tensor, t_z: torch.Tensor,
               target: torch.Tensor, kd_t: float = 4.0, tf_t: float = 4.0, ss_t: float = 0.5,
               ratio_tf: float = 1.0, ratio_ss: float = 0.75) -> dict[str, torch.Tensor]:
    """The four unweighted terms (module doc) from the ``4B``-row logits and SS-head outputs of both networks
    (rotation layout of ``rotated_batch``) and the ``B`` targets. The teacher side has no gradient."""
    s_logits, t_logits, s_z = s_logits.float(), t_logits.detach().float(), s_z.float()
    s_nor, s_rot = split_rotations(s_logits)
    t_nor, t_rot = split_rotations(t_logits)
    kd = kept_kl(F.log_softmax(s_nor / kd_t, 1), F.log_softmax(t_nor / kd_t, 1)) * kd_t**2
    log_t_rot = F.log_softmax(t_rot / tf_t, 1)
    keep_tf = kept_rows(error_levels(log_t_rot, target.repeat_interleave(ROTATIONS - 1)), ratio_tf)
    tf = kept_kl(F.log_softmax(s_rot / tf_t, 1), log_t_rot, keep_tf) * tf_t**2
    s_sim, t_sim = rotation_similarity(s_z), rotation_similarity(t_z.detach().float())
    log_t_sim = F.log_softmax(t_sim / ss_t, 1)
    keep_ss = kept_rows(error_levels(t_sim, rotation_targets(len(target), target.device)), ratio_ss)
    ss = kept_kl(F.log_softmax(s_sim / ss_t, 1), log_t_sim, keep_ss) * ss_t**2
    return {"ce": F.cross_entropy(s_nor, target), "kd": kd, "tf": tf, "ss": ss}


class SSHead(nn.Sequential):
    """The authors' projection head: ``Linear(d, d), ReLU, Linear(d, d)`` on the penultimate embedding."""

    def __init__(self, dim: int):
        super().__init__(nn.Linear(dim, dim), nn.ReLU(inplace=True), nn.Linear(dim, dim))


@register_distiller("sskd")
class SSKD(Distiller):
    """SSKD (Xu et al., ECCV 2020) distils the teacher's similarities between rotated copies of every image.

    The student also matches the teacher's class probabilities on the copies; the teacher's projection head is
    trained first by ``prepare`` (module doc)."""

    display_name = "SSKD"
    report_order = 55
    needs = ("features",)
    DEFAULTS = {"sskd": {"ce_weight": 0.1, "kd_weight": 0.9, "tf_weight": 2.7, "ss_weight": 10.0,
                         "kd_T": 4.0, "tf_T": 4.0, "ss_T": 0.5, "ratio_tf": 1.0, "ratio_ss": 0.75,
                         "pretrain_epochs": 60, "pretrain_lr": 0.05, "pretrain_milestones": [30, 45],
                         "pretrain_gamma": 0.1, "views": "per_sample"}}
    #: each setting's kind and range, checked before anything is built (lakd.settings; plain data)
    SETTINGS = {
        "sskd.ce_weight": {"kind": "number", "ge": 0},
        "sskd.kd_weight": {"kind": "number", "ge": 0},
        "sskd.tf_weight": {"kind": "number", "ge": 0},
        "sskd.ss_weight": {"kind": "number", "ge": 0},
        "sskd.kd_T": {"kind": "number", "gt": 0, "about": "the KD temperature"},
        "sskd.tf_T": {"kind": "number", "gt": 0, "about": "the transformed images' temperature"},
        "sskd.ss_T": {"kind": "number", "gt": 0, "about": "the self-supervision temperature"},
        "sskd.ratio_tf": {"kind": "number", "ge": 0, "le": 1, "about": "the share of the teacher's wrong rows kept"},
        "sskd.ratio_ss": {"kind": "number", "ge": 0, "le": 1, "about": "the share of the teacher's wrong rows kept"},
        "sskd.pretrain_epochs": {"kind": "int", "ge": 0, "about": "epochs of the teacher SS head's stage"},
        "sskd.pretrain_lr": {"kind": "number", "gt": 0, "about": "the SS head stage's learning rate"},
        "sskd.pretrain_milestones": {"kind": "ints", "ge": 0, "increasing": True, "about":
            "epochs of the SS head stage at which its learning rate is multiplied by pretrain_gamma"},
        "sskd.pretrain_gamma": {"kind": "number", "gt": 0},
        "sskd.views": {"kind": "choice", "choices": list(VIEW_MODES), "about":
            "per_sample: rotated copies with crops of their own, made by the data pipeline (the authors'); batch: "
            "the batch's image rotated in the method"},
    }
    #: checks over several settings, or a setting and the run (lakd.settings)
    CHECKS = [
        {"rule": "not_all_zero", "keys": ["sskd.ce_weight", "sskd.kd_weight", "sskd.tf_weight", "sskd.ss_weight"]},
        {"rule": "compare", "key": "@smallest_batch", "op": ">=", "than": 2, "about":
            "its self-supervision tells each image's rotated copies from the other images of the batch: at 1 image "
            "its loss is 0"},
    ]

    def __init__(self, student, teacher, cfg, num_data=0):
        super().__init__(student, teacher, cfg, num_data)
        s = self.section("sskd")
        self.weights = {k: float(s[f"{k}_weight"]) for k in ("ce", "kd", "tf", "ss")}
        self.kd_t, self.tf_t, self.ss_t = (float(s[k]) for k in ("kd_T", "tf_T", "ss_T"))
        self.ratio_tf, self.ratio_ss = float(s["ratio_tf"]), float(s["ratio_ss"])
        self.pretrain_epochs, self.pretrain_lr = int(s["pretrain_epochs"]), float(s["pretrain_lr"])
        self.pretrain_gamma, self.pretrain_milestones = float(s["pretrain_gamma"]), tuple(s["pretrain_milestones"])
        self.view_mode = self._view_mode(s["views"])
        self.s_head = SSHead(student.feature_info()["embedding_dim"])
        self.t_head = SSHead(teacher.feature_info()["embedding_dim"])
        self.t_head.requires_grad_(False)  # trained by prepare() only, then fixed

    @staticmethod
    def _view_mode(mode) -> str:
        if mode not in VIEW_MODES:
            raise LakdError(f"sskd.views must be per_sample (rotated copies with crops of their own, made by the data "
                            f"pipeline: the authors') or batch (the batch's image rotated in the method), got {mode!r}")
        return mode

    @classmethod
    def views(cls, cfg: dict) -> dict[str, dict]:
        """With ``sskd.views: per_sample``, the three rotated copies (``ROTATED_COPIES``)."""
        mode = cls._view_mode({**cls.DEFAULTS["sskd"], **(cfg.get("sskd") or {})}["views"])
        return dict(ROTATED_COPIES) if mode == "per_sample" else {}

    def four_views(self, image: torch.Tensor, views: dict | None = None) -> torch.Tensor:
        """The ``4B`` batch of the images and their rotated copies (``sskd.views``)."""
        return rotated_batch(image) if self.view_mode == "batch" else stacked_copies(image, views)

    def _head(self, head: nn.Module, emb: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=emb.device.type, enabled=False):
            return head(emb.flatten(1).float())

    def prepare(self, train_loader, device=None) -> None:
        """Train the teacher's SS head on the frozen teacher: rotated copies told apart by similarity (module doc)."""
        params = list(self.t_head.parameters())
        self.t_head.requires_grad_(True)
        try:
            def loss(image, target, views=None):
                emb = self.teacher_forward(self.four_views(image, views), features=True)[1]["embedding"]
                sim = rotation_similarity(self._head(self.t_head, emb))
                return F.cross_entropy(sim, rotation_targets(image.shape[0], image.device))

            self.run_stage(train_loader, device, params, loss, self.pretrain_epochs, self.pretrain_lr,
                           "teacher SS head", self.pretrain_milestones, self.pretrain_gamma)
        finally:
            self.t_head.requires_grad_(False)

    def teacher_pass(self, image, views=None, **batch):
        x4 = self.four_views(image, views)
        logits, feats = self.teacher_forward(x4, features=True)
        with torch.no_grad():
            return logits, self._head(self.t_head, feats["embedding"]), x4

    def student_losses(self, image, target, t_out, **batch):
        t_logits, t_z, x4 = t_out
        logits, feats = self.student(x4, features=True)
        with torch.autocast(device_type=logits.device.type, enabled=False):  # float32 similarities under AMP too
            terms = sskd_terms(logits, t_logits, self._head(self.s_head, feats["embedding"]), t_z, target,
                               self.kd_t, self.tf_t, self.ss_t, self.ratio_tf, self.ratio_ss)
        return split_rotations(logits)[0], {k: self.weights[k] * v for k, v in terms.items()}
