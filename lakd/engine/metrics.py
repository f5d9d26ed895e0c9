"""Accuracy, Extracurricular Knowledge (EK), evaluation over a loader, and the reader of a run's metrics.jsonl."""
from __future__ import annotations

import json
import os

import torch
import torch.nn.functional as F

from ..runtime import distributed as dist


def topk_correct(logits: torch.Tensor, target: torch.Tensor, ks=(1, 5)) -> list[torch.Tensor]:
    """Per-sample booleans: is the target among the top-k predictions, for each k."""
    maxk = min(max(ks), logits.shape[1])
    pred = logits.topk(maxk, dim=1).indices
    hit = pred.eq(target[:, None])
    return [hit[:, : min(k, maxk)].any(dim=1) for k in ks]


def extracurricular_knowledge(student_correct, teacher_correct) -> float | None:
    """EK (%): among the samples the teacher gets wrong, the share the student gets right.

    ``100 * #{student right and teacher wrong} / #{teacher wrong}``; None when the teacher is never wrong.
    """
    s = torch.as_tensor(student_correct, dtype=torch.bool)
    t = torch.as_tensor(teacher_correct, dtype=torch.bool)
    wrong = (~t).sum().item()
    if wrong == 0:
        return None
    return 100.0 * (s & ~t).sum().item() / wrong


@torch.no_grad()
def evaluate(model, loader, device, amp_dtype=None, teacher_correct: dict | None = None) -> dict:
    """Top-1, top-5 (percent), mean cross-entropy and, given the teacher's per-index correctness, EK.

    Under DDP each rank evaluates its shard; sums are reduced across ranks. Returns also ``correct``:
    {dataset index: student right?} for this rank's shard.
    """
    was_training = model.training
    model.eval()
    n = torch.zeros((), dtype=torch.float64, device=device)
    c1, c5, loss_sum, ek_hit, ek_den = (torch.zeros_like(n) for _ in range(5))
    correct: dict[int, bool] = {}
    try:
        for batch in loader:
            image, target = batch["image"], batch["target"]
            with torch.autocast(device_type=device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                logits = model(image)
            logits = logits.float()
            top1, top5 = topk_correct(logits, target)
            n += target.numel()
            c1 += top1.sum()
            c5 += top5.sum()
            loss_sum += F.cross_entropy(logits, target, reduction="sum")
            idx = batch["index"].tolist()
            correct.update(zip(idx, top1.tolist()))
            if teacher_correct is not None:
                t = torch.tensor([teacher_correct[i] for i in idx], device=device)
                ek_den += (~t).sum()
                ek_hit += (top1 & ~t).sum()
    finally:
        model.train(was_training)
    totals = dist.all_reduce_sum(torch.stack([n, c1, c5, loss_sum, ek_hit, ek_den]))
    n, c1, c5, loss_sum, ek_hit, ek_den = totals.tolist()
    out = {
        "top1": 100.0 * c1 / max(n, 1),
        "top5": 100.0 * c5 / max(n, 1),
        "loss": loss_sum / max(n, 1),
        "ek": (100.0 * ek_hit / ek_den) if teacher_correct is not None and ek_den > 0 else None,
        "num_images": int(n),
        "correct": correct,
    }
    return out


def read_metrics(path: str) -> tuple[list[dict], int]:
    """The records of a run's ``metrics.jsonl`` (one JSON object per line) and the number of unreadable lines
    (a torn last line, as left by a killed run, is skipped and counted). A missing file gives no records."""
    rows, bad = [], 0
    if not os.path.exists(path):
        return rows, bad
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                bad += 1
    return rows, bad
