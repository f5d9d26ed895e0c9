"""Small helpers shared by the feature methods (VID, FT, AB, FSP, ReviewKD, SSKD, PAD-L2, SRD): map pooling and
the checks of their settings; not a method."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import LakdError


def pool_to_match(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The larger of two maps average-pooled to the smaller one's size (RepDistiller's and mdistiller's rule)."""
    if a.shape[-2:] == b.shape[-2:]:
        return a, b
    if a.shape[-2] * a.shape[-1] > b.shape[-2] * b.shape[-1]:
        return F.adaptive_avg_pool2d(a, b.shape[-2:]), b
    return a, F.adaptive_avg_pool2d(b, a.shape[-2:])


def check_int(section: str, key: str, value, low: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise LakdError(f"{section}.{key} must be an integer >= {low}, got {value!r}")
    return value


def check_nonneg(section: str, key: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise LakdError(f"{section}.{key} must be a number >= 0, got {value!r}")
    return float(value)


def check_positive(section: str, key: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise LakdError(f"{section}.{key} must be a positive number, got {value!r}")
    return float(value)
