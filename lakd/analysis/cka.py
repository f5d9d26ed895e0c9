"""Linear CKA (centered kernel alignment) between the layers of a teacher and its students.

Two estimators:

- **full** (Kornblith et al. 2019): every image's features in memory, one row per image (``X`` is
  ``n x (C*H*W)``). With ``K = X X^T`` and ``L = Y Y^T`` centred by ``H = I - 11^T/n``::

      CKA(X, Y) = <HKH, HLH>_F / (||HKH||_F ||HLH||_F)  (= ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F)
                                                           for column-centred X, Y)

  computed from the ``n x n`` Gram matrices, which is cheap when the feature dimension exceeds ``n``.
- **minibatch** (Nguyen, Raghu and Kornblith 2021): the images come in minibatches; per minibatch the unbiased
  HSIC estimator ``HSIC_1`` (Song et al. 2012) is computed for every pair of representations and summed::

      CKA = sum_b HSIC_1(K_b, L_b) / sqrt(sum_b HSIC_1(K_b, K_b) * sum_b HSIC_1(L_b, L_b))

Both estimators handle many representations at once: the CKA of every pair among ``M`` representations
is an ``M x M`` matrix, from which the teacher-by-student blocks are cut.

``run_cka`` runs the models over a test loader and returns the matrices; the ``lakd analyze cka`` command
(``lakd/cli/analyze.py``) loads the checkpoints and data and writes ``cka.json`` and the figures.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch

from ..errors import LakdError

# ----------------------------------------------------------------------------------------------------
# Estimators
# ----------------------------------------------------------------------------------------------------


def _flat(x: torch.Tensor) -> torch.Tensor:
    x = torch.as_tensor(x)
    if x.ndim < 2:
        raise LakdError(f"CKA needs one row of features per example (n x ...), got shape {tuple(x.shape)}")
    x = x.reshape(x.shape[0], -1)
    return x if x.is_floating_point() else x.double()


def gram_linear(x: torch.Tensor) -> torch.Tensor:
    """The linear-kernel Gram matrix ``X X^T`` (n x n, float64) of ``n`` examples' flattened features."""
    x = _flat(x)
    return (x @ x.T).double()


def center_gram(k: torch.Tensor) -> torch.Tensor:
    """``H K H`` with ``H = I - 11^T / n`` (double-centring of a symmetric Gram matrix)."""
    k = k.double()
    return k - k.mean(0, keepdim=True) - k.mean(1, keepdim=True) + k.mean()


def cka_from_grams(k: torch.Tensor, l: torch.Tensor) -> float:
    """Full (biased-HSIC) linear CKA from two uncentred ``n x n`` Gram matrices."""
    kc, lc = center_gram(k), center_gram(l)
    den = torch.linalg.norm(kc) * torch.linalg.norm(lc)
    if den <= 0:
        return float("nan")
    return float((kc * lc).sum() / den)


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Full linear CKA between two representations of the same ``n`` examples (rows).

    Uses the feature-space form ``||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F)`` when both feature dimensions are
    below ``n`` and the Gram form otherwise (the two are equal).
    """
    x, y = _flat(x).double(), _flat(y).double()
    if x.shape[0] != y.shape[0]:
        raise LakdError(f"CKA needs the same examples in both representations: {x.shape[0]} vs "
                        f"{y.shape[0]} rows")
    n = x.shape[0]
    if max(x.shape[1], y.shape[1]) < n:
        x = x - x.mean(0, keepdim=True)
        y = y - y.mean(0, keepdim=True)
        num = torch.linalg.norm(y.T @ x) ** 2
        den = torch.linalg.norm(x.T @ x) * torch.linalg.norm(y.T @ y)
        return float(num / den) if den > 0 else float("nan")
    return cka_from_grams(x @ x.T, y @ y.T)


def hsic_unbiased(k: torch.Tensor, l: torch.Tensor) -> float:
    """Song et al. (2012)'s unbiased HSIC estimator of two ``n x n`` Gram matrices (``n >= 4``)."""
    return float(hsic_unbiased_matrix(torch.stack([k, l]))[0, 1])


def hsic_unbiased_matrix(grams: torch.Tensor) -> torch.Tensor:
    """Unbiased HSIC between every pair of ``M`` Gram matrices (``M x n x n``) -> ``M x M`` (float64).

    With ``K~`` the Gram matrix with its diagonal set to zero::

        HSIC_1(K, L) = [tr(K~ L~) + 1'K~1 * 1'L~1 / ((n-1)(n-2)) - 2/(n-2) * 1'K~L~1] / (n (n-3))
    """
    g = grams.double()
    m, n = g.shape[0], g.shape[1]
    if n < 4:
        raise LakdError(f"the unbiased HSIC estimator needs at least 4 examples per minibatch, got {n}; "
                        f"use a larger --batch-size")
    g = g * (1 - torch.eye(n, dtype=g.dtype, device=g.device))  # zero diagonal
    flat = g.reshape(m, -1)
    trace = flat @ flat.T  # tr(K~ L~) for symmetric K~, L~
    rows = g.sum(2)  # K~ 1
    total = rows.sum(1)  # 1' K~ 1
    cross = rows @ rows.T  # 1' K~ L~ 1
    out = trace + torch.outer(total, total) / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * cross
    return out / (n * (n - 3))


def normalize_hsic(s: torch.Tensor) -> torch.Tensor:
    """CKA matrix ``S_ij / sqrt(S_ii S_jj)`` from a matrix of (summed) HSIC values."""
    d = torch.sqrt(torch.clamp(torch.diagonal(s), min=0))
    den = torch.outer(d, d)
    return torch.where(den > 0, s / torch.where(den > 0, den, torch.ones_like(den)),
                       torch.full_like(s, float("nan")))


class MinibatchCKA:
    """Accumulates the unbiased HSIC between every pair of ``M`` representations over minibatches.

    ``update(feats)`` takes the ``M`` representations of one minibatch (each ``b x ...``, ``b >= 4``);
    ``compute()`` returns the ``M x M`` CKA matrix (float64, on the CPU).
    """

    def __init__(self) -> None:
        self.sums: torch.Tensor | None = None
        self.batches = 0
        self.examples = 0

    def update(self, feats: Sequence[torch.Tensor]) -> None:
        grams = torch.stack([gram_linear(f) for f in feats])
        h = hsic_unbiased_matrix(grams).cpu()
        if self.sums is not None and self.sums.shape != h.shape:
            raise LakdError(f"MinibatchCKA got {h.shape[0]} representations after {self.sums.shape[0]}")
        self.sums = h if self.sums is None else self.sums + h
        self.batches += 1
        self.examples += int(grams.shape[1])

    def compute(self) -> torch.Tensor:
        if self.sums is None:
            raise LakdError("MinibatchCKA.compute() called before any minibatch was added")
        return normalize_hsic(self.sums)


def minibatch_cka(x: torch.Tensor, y: torch.Tensor, batch_size: int) -> float:
    """Minibatch CKA of two representations whose rows are split into consecutive minibatches.

    A last minibatch smaller than 4 examples is left out (the unbiased estimator needs 4).
    """
    x, y = _flat(x), _flat(y)
    acc = MinibatchCKA()
    for i in range(0, x.shape[0], batch_size):
        if x[i:i + batch_size].shape[0] >= 4:
            acc.update([x[i:i + batch_size], y[i:i + batch_size]])
    return float(acc.compute()[0, 1])


def full_cka_matrix(grams: Sequence[torch.Tensor]) -> torch.Tensor:
    """Full-estimator CKA between every pair of representations, given their ``n x n`` Gram matrices."""
    centred = [center_gram(g) for g in grams]
    m = len(centred)
    out = torch.empty(m, m, dtype=torch.float64)
    norms = [torch.linalg.norm(c) for c in centred]
    for i in range(m):
        for j in range(i, m):
            den = norms[i] * norms[j]
            v = float((centred[i] * centred[j]).sum() / den) if den > 0 else float("nan")
            out[i, j] = out[j, i] = v
    return out


# ----------------------------------------------------------------------------------------------------
# Representations of a model: which block outputs to compare
# ----------------------------------------------------------------------------------------------------


def parse_points(spec: str, model) -> list[int]:
    """Block indices (1-based; 0 = the stem) named by ``spec``: ``stages`` (default), ``blocks`` (every
    block, i.e. the outputs of LAKD's possible local modules) or a comma list such as ``1,4,9``."""
    spec = (spec or "stages").strip().lower()
    n = model.num_blocks
    if spec == "stages":
        return list(model.stage_ends)
    if spec == "blocks":
        return list(range(1, n + 1))
    try:
        idx = [int(p) for p in spec.replace(" ", "").split(",") if p]
    except ValueError:
        raise LakdError(f"points {spec!r} must be 'stages', 'blocks' or a comma list of 1-based block "
                        f"indices such as 1,4,9") from None
    bad = [i for i in idx if not 0 <= i <= n]
    if not idx or bad:
        raise LakdError(f"points {spec!r}: block indices must lie in 0..{n} for this model (0 = stem), "
                        f"got {bad or idx}")
    return sorted(set(idx))


def point_label(model, block: int, spec: str) -> str:
    if block == 0:
        return "stem"
    ends = list(model.stage_ends)
    if (spec or "stages").strip().lower() == "stages" and block in ends:
        return f"stage{ends.index(block) + 1}"
    if block in ends:
        return f"block{block} (stage{ends.index(block) + 1})"
    return f"block{block}"


def _block_features(model, image: torch.Tensor, blocks: Iterable[int]):
    logits, feats = model(image, features=True, blocks=True)
    out = {b: (feats["stem"] if b == 0 else feats["blocks"][b - 1]) for b in blocks}
    return logits, out


def _feature_numel(model, block: int, image_size: int) -> int:
    info = model.feature_info(image_size)
    s = info["stem"] if block == 0 else info["blocks"][block - 1]
    return s.channels * s.height * s.width


# ----------------------------------------------------------------------------------------------------
# Running the models
# ----------------------------------------------------------------------------------------------------


@dataclass
class CKAResult:
    estimator: str
    num_images: int
    batch_size: int
    teacher_points: list[str]
    #: per student: label, its points, the teacher x student matrix, the stage diagonal
    students: list[dict] = field(default_factory=list)
    teacher_top1: float = float("nan")
    dropped_images: int = 0

    def to_dict(self) -> dict:
        """JSON-ready (NaN, e.g. the CKA of a constant representation, becomes null)."""
        def clean(v):
            if isinstance(v, float):
                return None if math.isnan(v) else v
            if isinstance(v, list):
                return [clean(x) for x in v]
            if isinstance(v, dict):
                return {k: clean(x) for k, x in v.items()}
            return v

        return clean({
            "estimator": self.estimator, "num_images": self.num_images, "batch_size": self.batch_size,
            "dropped_images": self.dropped_images, "teacher_points": self.teacher_points,
            "teacher_top1": self.teacher_top1, "students": self.students,
        })


def _iter_images(loader, num_images: int, batch_size: int = 0):
    """Yield ``(image, target)`` batches covering the first ``num_images`` images of ``loader``.

    With ``batch_size > 0`` batches are re-cut to exactly that size (the last one may be smaller).
    """
    seen = 0
    buf_x: list[torch.Tensor] = []
    buf_y: list[torch.Tensor] = []
    buffered = 0
    for batch in loader:
        x, y = batch["image"], batch["target"]
        take = min(x.shape[0], num_images - seen)
        if take <= 0:
            break
        x, y = x[:take], y[:take]
        seen += take
        if batch_size <= 0:
            yield x, y
            continue
        buf_x.append(x)
        buf_y.append(y)
        buffered += take
        while buffered >= batch_size:
            bx, by = torch.cat(buf_x), torch.cat(buf_y)
            yield bx[:batch_size], by[:batch_size]
            buf_x, buf_y = [bx[batch_size:]], [by[batch_size:]]
            buffered -= batch_size
        if seen >= num_images:
            break
    if batch_size > 0 and buffered > 0:
        yield torch.cat(buf_x), torch.cat(buf_y)


def _representations(models: list, chosen: list[list[int]]) -> list[tuple[int, int]]:
    """``(model index, block index)`` of every representation to compare: each model's chosen points plus its
    stage ends (the stage-by-stage diagonal needs them)."""
    return [(mi, b) for mi, m in enumerate(models) for b in sorted(set(chosen[mi]) | set(m.stage_ends))]


def _minibatch_pass(models: list, keys: list[tuple[int, int]], loader, num_images: int, batch_size: int):
    """One pass of the minibatch estimator: ``(CKA matrix over keys, correct per model, images, dropped)``."""
    correct = [0] * len(models)
    counted = dropped = 0
    acc = MinibatchCKA()
    for x, y in _iter_images(loader, num_images, batch_size):
        if x.shape[0] < 4:  # the unbiased estimator needs 4 images: a short last minibatch is left out
            dropped += x.shape[0]
            continue
        feats: list[torch.Tensor] = []
        for mi, m in enumerate(models):
            blocks = [b for (i, b) in keys if i == mi]
            logits, fb = _block_features(m, x, blocks)
            correct[mi] += int((logits.argmax(1) == y).sum())
            feats += [fb[b].flatten(1).float() for b in blocks]
        counted += x.shape[0]
        acc.update(feats)
    if counted < 4:
        raise LakdError("the test loader gave fewer than 4 images; check the dataset (data.test_subset?)")
    return acc.compute(), correct, counted, dropped


def _memory_groups(models: list, keys: list[tuple[int, int]], num_images: int, image_size: int,
                   max_memory_gb: float) -> list[list[int]]:
    """The full estimator keeps every image's features: split the representations into groups whose features
    fit ``max_memory_gb`` next to the Gram matrices (one pass over the data per group)."""
    budget = max_memory_gb * 2**30
    sizes = [4 * num_images * _feature_numel(models[mi], b, image_size) for (mi, b) in keys]
    gram_bytes = 8 * num_images**2 * len(keys)
    if gram_bytes > budget:
        raise LakdError(f"the full CKA estimator would keep {len(keys)} Gram matrices of {num_images}^2 "
                        f"({gram_bytes / 2**30:.1f} GiB); use fewer --images or the minibatch estimator "
                        f"(--batch-size 256)")
    groups: list[list[int]] = [[]]
    used = 0.0
    for i, size in enumerate(sizes):
        if groups[-1] and used + size > budget - gram_bytes:
            groups.append([])
            used = 0.0
        groups[-1].append(i)
        used += size
    return groups


def _full_pass(models: list, keys: list[tuple[int, int]], loader, num_images: int, image_size: int,
               max_memory_gb: float):
    """The full estimator: ``(CKA matrix over keys, correct per model, images)``, from one centred Gram matrix
    per representation (features gathered as float32 on the CPU, group by group)."""
    pos = {k: i for i, k in enumerate(keys)}
    correct = [0] * len(models)
    counted = 0
    grams: list[torch.Tensor | None] = [None] * len(keys)
    for gi, group in enumerate(_memory_groups(models, keys, num_images, image_size, max_memory_gb)):
        store: dict[int, list[torch.Tensor]] = {i: [] for i in group}
        need = {mi for (mi, _) in (keys[i] for i in group)}
        for x, y in _iter_images(loader, num_images):
            for mi, m in enumerate(models):
                if mi not in need and gi > 0:
                    continue
                blocks = [keys[i][1] for i in group if keys[i][0] == mi]
                logits, fb = _block_features(m, x, blocks)
                if gi == 0:  # accuracy and image count from the first pass
                    correct[mi] += int((logits.argmax(1) == y).sum())
                for b in blocks:
                    store[pos[(mi, b)]].append(fb[b].flatten(1).float().cpu())
            if gi == 0:
                counted += x.shape[0]
        for i in group:
            feats = torch.cat(store.pop(i))
            feats = feats - feats.double().mean(0, keepdim=True).float()
            dev = next(models[keys[i][0]].parameters()).device
            f = feats.to(dev)
            grams[i] = (f @ f.T).double().cpu()
            del feats, f
    if counted < 4:
        raise LakdError("the test loader gave fewer than 4 images; check the dataset (data.test_subset?)")
    return full_cka_matrix(grams), correct, counted  # type: ignore[arg-type]


@torch.no_grad()
def run_cka(teacher, students: Sequence[tuple[str, object]], loader, num_images: int = 1000,
            batch_size: int = 0, teacher_points: str = "stages", student_points: str | Sequence[str] = "stages",
            image_size: int = 32, max_memory_gb: float = 8.0) -> CKAResult:
    """CKA between the teacher's and each student's chosen block outputs on the first ``num_images`` images.

    ``batch_size == 0`` uses the full estimator (features of all images kept, as float32 on the CPU, in as
    many passes over the data as ``max_memory_gb`` needs); ``batch_size > 0`` the minibatch estimator with
    minibatches of that many images. ``student_points`` is one spec for all students or one per student (see
    ``parse_points``). Each student's result also holds the "diagonal": teacher stage ``i`` vs student stage
    ``i``.
    """
    if num_images < 4:
        raise LakdError(f"CKA needs at least 4 images, got --images {num_images}")
    if 0 < batch_size < 4:
        raise LakdError(f"--batch-size {batch_size} is too small: the unbiased HSIC estimator needs "
                        f">= 4 images per minibatch")
    models = [teacher] + [m for _, m in students]
    for m in models:
        m.eval()
    specs = [student_points] * len(students) if isinstance(student_points, str) else list(student_points)
    if len(specs) != len(students):
        raise LakdError(f"{len(specs)} student point specs for {len(students)} students")
    chosen = [parse_points(teacher_points, teacher)] + [parse_points(sp, m) for sp, (_, m) in zip(specs, students)]
    keys = _representations(models, chosen)
    if batch_size > 0:
        matrix, correct, counted, dropped = _minibatch_pass(models, keys, loader, num_images, batch_size)
        estimator = "minibatch"
    else:
        matrix, correct, counted = _full_pass(models, keys, loader, num_images, image_size, max_memory_gb)
        estimator, dropped = "full", 0
    return _result(matrix, keys, teacher, students, chosen, teacher_points, specs, correct, counted, estimator,
                   batch_size, dropped)


def _result(matrix, keys, teacher, students, chosen, teacher_points, specs, correct, counted, estimator,
            batch_size, dropped) -> CKAResult:
    """Cut the teacher x student blocks and the stage diagonals out of the CKA matrix over all representations."""
    pos = {k: i for i, k in enumerate(keys)}
    t_rows = [pos[(0, b)] for b in chosen[0]]
    t_stage_rows = [pos[(0, b)] for b in teacher.stage_ends]
    result = CKAResult(estimator=estimator, num_images=counted, batch_size=batch_size,
                       teacher_points=[point_label(teacher, b, teacher_points) for b in chosen[0]],
                       dropped_images=dropped)
    result.teacher_top1 = 100.0 * correct[0] / counted
    for si, (label, m) in enumerate(students, start=1):
        cols = [pos[(si, b)] for b in chosen[si]]
        s_stage_cols = [pos[(si, b)] for b in m.stage_ends]
        k = min(len(t_stage_rows), len(s_stage_cols))
        diag = [float(matrix[t_stage_rows[i], s_stage_cols[i]]) for i in range(k)]
        result.students.append({
            "label": label,
            "points": [point_label(m, b, specs[si - 1]) for b in chosen[si]],
            "matrix": [[float(matrix[r, c]) for c in cols] for r in t_rows],
            "diagonal": diag,
            "diagonal_labels": [f"stage{i + 1}" for i in range(k)],
            "top1": 100.0 * correct[si] / counted,
        })
    return result
