"""CRD, contrastive representation distillation (Tian et al., 2020), in RepDistiller/mdistiller's NCE form.

Student and teacher embeddings (``feats["embedding"]``) pass through learnable linear maps to ``feat_dim``
(128) and are L2-normalised. Two memory banks hold one unit vector per training image, ``memory_s`` (student side)
and ``memory_t`` (teacher side). For each image ``i`` of the batch, ``K`` negatives ``j`` are drawn and the
scores ``P(i, j) = exp(<v, m_j> / T) / Z`` are computed against the *other* side's bank (the student embedding
against the teacher bank and vice versa), with ``Z = mean(exp(.)) * N`` fixed on the first batch (``N`` =
number of training images). The NCE loss of each side (``m = K``, ``Pn = 1/N``)::

    - [ log(P_pos / (P_pos + m Pn + eps)) + sum_neg log(m Pn / (P_neg + m Pn + eps)) ], batch mean

and after the step the banks' rows of the batch images move to
``normalize(momentum * m_i + (1 - momentum) v_i)``.
mdistiller's CRD config: K = 16384, T = 0.07, momentum 0.5, CE weight 1, CRD weight 0.8, no KD term.

Negatives. mdistiller's ``exact`` mode draws them (in the dataset) among images of other classes. Here the
batch only carries the images' indices, so the distiller records the label of every image it has seen
(``labels`` buffer) and, with ``negatives: other_class``, redraws up to 3 times any uniform draw that hits the
image itself or an image known to share its class (after the first epoch every label is known; leftovers are
rare and kept). ``negatives: uniform`` is RepDistiller's plain uniform draw. When the training set is smaller
than ``K + 1`` images (tiny test sets), ``K`` becomes ``N - 1``.

The contrast is computed in float32 (``exp(1/0.07)`` overflows float16 under AMP).

Randomness and multi-process training. The negatives come from the memory's own generator, re-seeded at every
draw from ``(seed, number of draws so far)`` (the count is the ``draws`` buffer, saved with the banks), so they do
not depend on the global RNG and a resumed run draws what the uninterrupted one would. Under DDP every rank
all-gathers the global batch's embeddings, indices and targets (one ``all_gather``): all ranks draw the
negatives of the whole global batch with the same generator and keep their own rows, fix ``Z`` from the global
batch's scores, and apply the same bank and label updates, so the banks, ``Z`` and the labels stay identical on
every rank and equal to a single process's at the same global batch.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import LakdError
from ..runtime import distributed as dist
from ..runtime.seeding import mix_seed
from .base import Distiller, register_distiller

NCE_EPS = 1e-7


class Embed(nn.Module):
    """Linear map to ``dim_out`` followed by L2 normalisation."""

    def __init__(self, dim_in: int, dim_out: int = 128):
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.linear(x.flatten(1)), p=2, dim=1)


def nce_loss(scores: torch.Tensor, num_data: int) -> torch.Tensor:
    """NCE loss of RepDistiller's ``ContrastLoss``: column 0 holds the positive scores, the rest negatives."""
    m = scores.shape[1] - 1
    noise = m / float(num_data)  # m * Pn
    p_pos = scores[:, 0]
    p_neg = scores[:, 1:]
    log_d1 = torch.log(p_pos / (p_pos + noise + NCE_EPS))
    log_d0 = torch.log(noise / (p_neg + noise + NCE_EPS))
    return -(log_d1.sum() + log_d0.sum()) / scores.shape[0]


#: largest B x N score block computed at once (float32 elements, 64 MiB)
SCORE_BLOCK = 16 * 2**20


def bank_scores(v: torch.Tensor, bank: torch.Tensor, contrast_index: torch.Tensor,
                block: int = SCORE_BLOCK) -> torch.Tensor:
    """``<v_i, bank[contrast_index[i, j]]>`` for every row ``i`` and column ``j`` (B x (K+1)).

    The direct form gathers ``B x (K+1) x D`` bank rows (64 x 16,385 x 128 floats = 537 MB per side and step on
    CIFAR) and contracts them; that copy, not the arithmetic, is what made CRD 6.8x slower than KD on a CPU.
    When the bank holds fewer rows than the gathered copy would (``N <= B (K+1)``, CIFAR's 50,000 against
    64 x 16,385), one matrix product against the whole bank (``B x N``, through the BLAS) followed by a gather of
    the B x (K+1) scores costs less; it is done in blocks of at most ``block`` scores so a large bank never needs a
    large temporary. Otherwise (a bank far larger than the batch's negatives, e.g. ImageNet's 1.28M rows) the
    rows are gathered, again in blocks of the batch, so the temporary stays bounded. The gradient reaches ``v``
    only (the bank is a buffer) and equals the direct form's up to float summation order.
    """
    b, k1 = contrast_index.shape
    n, d = bank.shape
    if n <= b * k1:
        rows = max(1, min(b, block // max(n, 1)))
        parts = [(v[i:i + rows] @ bank.t()).gather(1, contrast_index[i:i + rows]) for i in range(0, b, rows)]
    else:
        rows = max(1, min(b, block // max(k1 * d, 1)))
        parts = [torch.bmm(bank[contrast_index[i:i + rows].reshape(-1)].view(-1, k1, d),
                           v[i:i + rows].unsqueeze(2)).squeeze(2) for i in range(0, b, rows)]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)


class ContrastMemory(nn.Module):
    """The two memory banks, the normalisation constants and the sampling of negatives."""

    def __init__(self, dim: int, num_data: int, k: int, temperature: float, momentum: float,
                 negatives: str = "other_class", seed: int = 0):
        super().__init__()
        self.num_data, self.k, self.temperature, self.momentum = num_data, k, temperature, momentum
        self.negatives = negatives
        self.seed = int(seed)
        self._gen: torch.Generator | None = None
        stdv = 1.0 / math.sqrt(dim / 3)
        self.register_buffer("memory_s", torch.rand(num_data, dim).mul_(2 * stdv).add_(-stdv))
        self.register_buffer("memory_t", torch.rand(num_data, dim).mul_(2 * stdv).add_(-stdv))
        # normalisation constants Z (student side, teacher side); negative = not set yet
        self.register_buffer("z", torch.tensor([-1.0, -1.0]))
        # label of each training image, -1 until seen
        self.register_buffer("labels", torch.full((num_data,), -1, dtype=torch.long))
        # number of negative draws so far (seeds the next one; identical on every rank)
        self.register_buffer("draws", torch.zeros((), dtype=torch.long))

    def _generator(self, device: torch.device) -> torch.Generator:
        if self._gen is None or self._gen.device != device:
            self._gen = torch.Generator(device=device)
        self._gen.manual_seed(mix_seed(self.seed, int(self.draws)))
        self.draws += 1
        return self._gen

    @torch.no_grad()
    def sample(self, index: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
        """B x (K+1) bank indices: column 0 the image itself, then K negatives."""
        b = index.shape[0]
        g = self._generator(index.device)
        neg = torch.randint(0, self.num_data, (b, self.k), device=index.device, generator=g)
        if self.negatives == "other_class" and target is not None:
            for _ in range(3):
                bad = (neg == index[:, None]) | (self.labels[neg] == target[:, None])
                n_bad = int(bad.sum())
                if n_bad == 0:
                    break
                neg[bad] = torch.randint(0, self.num_data, (n_bad,), device=index.device, generator=g)
        return torch.cat([index[:, None], neg], dim=1)

    @staticmethod
    def _gather_batch(v_s, v_t, index, target):
        """The global batch (rank order) of the detached embeddings, indices and targets: one all-gather of
        a float64 pack (exact for the float32 embeddings and for indices below 2**53). Needs the same local
        batch size on every rank, which the training loaders guarantee."""
        b = index.shape[0]
        cols = [v_s.detach().double(), v_t.detach().double(), index.double()[:, None]]
        if target is not None:
            cols.append(target.double()[:, None])
        packed = dist.all_gather_cat(torch.cat(cols, dim=1))
        d_s, d_t = v_s.shape[1], v_t.shape[1]
        g_s = packed[:, :d_s].to(v_s.dtype)
        g_t = packed[:, d_s:d_s + d_t].to(v_t.dtype)
        g_index = packed[:, d_s + d_t].long()
        g_target = packed[:, d_s + d_t + 1].long() if target is not None else None
        rank = torch.distributed.get_rank() if dist.is_enabled() else 0
        return g_s, g_t, g_index, g_target, slice(rank * b, (rank + 1) * b)

    def forward(self, v_s: torch.Tensor, v_t: torch.Tensor, index: torch.Tensor,
                contrast_index: torch.Tensor | None = None, target: torch.Tensor | None = None):
        """Scores (B x (K+1)) of the student embeddings against the teacher bank and of the teacher
        embeddings against the student bank; then the banks are updated with this batch."""
        # the global batch (all ranks' rows; this batch itself without DDP) drives the sampling and updates
        g_s, g_t, g_index, g_target, mine = v_s, v_t, index, target, slice(None)
        if dist.is_enabled():
            g_s, g_t, g_index, g_target, mine = self._gather_batch(v_s, v_t, index, target)
        if contrast_index is None:
            contrast_index = self.sample(g_index, g_target)[mine]
        out_s = torch.exp(bank_scores(v_s, self.memory_t, contrast_index) / self.temperature)
        out_t = torch.exp(bank_scores(v_t, self.memory_s, contrast_index) / self.temperature)
        if bool((self.z < 0).any()):  # first batch: Z = mean score of the global batch * N
            with torch.no_grad():
                stats = torch.stack([out_s.sum(), out_t.sum(), torch.tensor(float(out_s.numel()),
                                                                            device=out_s.device)]).double()
                s_sum, t_sum, count = dist.all_reduce_sum(stats).tolist()
                if self.z[0] < 0:
                    self.z[0] = s_sum / count * self.num_data
                if self.z[1] < 0:
                    self.z[1] = t_sum / count * self.num_data
        out_s, out_t = out_s / self.z[0], out_t / self.z[1]
        with torch.no_grad():
            # out of place: the score product saved the banks for its backward (a copy of N x D per side, far
            # less than the gathered negatives it replaces)
            for name, v in (("memory_s", g_s), ("memory_t", g_t)):
                bank = getattr(self, name)
                rows = bank[g_index] * self.momentum + v.detach().to(bank.dtype) * (1 - self.momentum)
                setattr(self, name, bank.index_copy(0, g_index, F.normalize(rows, p=2, dim=1)))
            if g_target is not None:
                self.labels[g_index] = g_target
        return out_s, out_t


#: how one's own loop gives CRD what it needs (the hint of CRD's errors; README's "Your own teacher and student")
OWN_LOOP_EXAMPLE = ("d = lakd.distiller(student, teacher, \"crd\", num_data=len(train_set)); a Dataset whose "
                    "__getitem__(i) returns (image, target, i); then d.train_step({\"image\": x, \"target\": y, "
                    "\"index\": i}, backward=...) for each (x, y, i) of the DataLoader")


@register_distiller("crd")
class CRD(Distiller):
    display_name = "CRD"
    report_order = 3
    DEFAULTS = {"crd": {"ce_weight": 1.0, "feat_weight": 0.8, "feat_dim": 128, "nce_k": 16384,
                        "nce_t": 0.07, "momentum": 0.5, "negatives": "other_class"}}
    #: each setting's kind and range, checked before anything is built (lakd.settings; plain data)
    SETTINGS = {
        "crd.ce_weight": {"kind": "number", "ge": 0},
        "crd.feat_weight": {"kind": "number", "ge": 0},
        "crd.feat_dim": {"kind": "int", "ge": 1, "about": "the embedding's width"},
        "crd.nce_k": {"kind": "int", "ge": 1, "about": "negatives per image"},
        "crd.nce_t": {"kind": "number", "gt": 0, "about": "the NCE temperature"},
        "crd.momentum": {"kind": "number", "ge": 0, "lt": 1, "about": "the memory bank's momentum"},
        "crd.negatives": {"kind": "choice", "choices": ["other_class", "uniform"]},
    }
    #: checks over several settings, or a setting and the run (lakd.settings)
    CHECKS = [
        {"rule": "not_all_zero", "keys": ["crd.ce_weight", "crd.feat_weight"]},
        {"rule": "compare", "key": "crd.nce_k", "op": "<", "than": "@train_size", "about":
            "each image's negatives are other training images"},
    ]

    def __init__(self, student, teacher, cfg, num_data=0):
        if num_data < 2:  # before the declared checks, which compare crd.nce_k with it
            raise LakdError(f"CRD needs the training set size for its memory bank (num_data >= 2), got {num_data}: "
                            f"in your own loop pass num_data=len(train_dataset) to lakd.distiller(...) and give "
                            f"every batch the images' positions in that dataset as \"index\", e.g. "
                            f"{OWN_LOOP_EXAMPLE} (lakd train does both)")
        super().__init__(student, teacher, cfg, num_data)
        s = self.section("crd")
        self.ce_weight, self.feat_weight = float(s["ce_weight"]), float(s["feat_weight"])
        self.num_data = int(num_data)
        self._index_checked = False
        k = int(s["nce_k"])  # < num_data: a declared check (CHECKS)
        dim = int(s["feat_dim"])
        self.embed_s = Embed(student.feature_info()["embedding_dim"], dim)
        self.embed_t = Embed(teacher.feature_info()["embedding_dim"], dim)
        self.contrast = ContrastMemory(dim, self.num_data, k, float(s["nce_t"]), float(s["momentum"]),
                                       s["negatives"], seed=int(cfg.get("seed") or 0))

    def crd_loss(self, emb_s: torch.Tensor, emb_t: torch.Tensor, index: torch.Tensor,
                 target: torch.Tensor | None = None, contrast_index: torch.Tensor | None = None):
        with torch.autocast(device_type=emb_s.device.type, enabled=False):
            v_s = self.embed_s(emb_s.float())
            v_t = self.embed_t(emb_t.float())
            out_s, out_t = self.contrast(v_s, v_t, index, contrast_index, target)
            return nce_loss(out_s, self.num_data) + nce_loss(out_t, self.num_data)

    def teacher_pass(self, image, index=None, **batch):
        if index is None:
            raise LakdError(f"CRD needs each image's position in the training set (0..{self.num_data - 1}) as "
                            f"batch[\"index\"], the key of its memory bank: in your own loop add it to the batch, "
                            f"e.g. {OWN_LOOP_EXAMPLE} (lakd's data loaders add it)")
        if not self._index_checked:  # once: a check costs a device sync
            lo, hi = int(index.min()), int(index.max())
            if lo < 0 or hi >= self.num_data:
                raise LakdError(f"batch[\"index\"] holds {lo}..{hi}, outside 0..{self.num_data - 1}: give each "
                                f"image's position in the training set, and num_data=len(train_dataset) (now "
                                f"{self.num_data}) to lakd.distiller(...)")
            self._index_checked = True
        return self.teacher_forward(image, features=True)[1]["embedding"]

    def dry_step(self, batch, backward):
        out = super().dry_step(batch, backward)
        self._index_checked = False  # the construction's dry step is not the user's data: check their first batch
        return out

    def student_losses(self, image, target, t_emb, index=None, **batch):
        logits, feats = self.student(image, features=True)
        index = index.to(image.device).long()
        return logits, {
            "ce": self.ce_weight * F.cross_entropy(logits, target),
            "crd": self.feat_weight * self.crd_loss(feats["embedding"], t_emb, index, target),
        }
