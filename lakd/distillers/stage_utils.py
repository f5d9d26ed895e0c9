"""Small helpers shared by the feature methods (VID, FT, AB, FSP, ReviewKD, SSKD, PAD-L2, SRD): map pooling; not a
method. (Their settings are checked from their declarations: ``Distiller.SETTINGS``, ``lakd.settings``.)"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def pool_to_match(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The larger of two maps average-pooled to the smaller one's size (RepDistiller's and mdistiller's rule)."""
    if a.shape[-2:] == b.shape[-2:]:
        return a, b
    if a.shape[-2] * a.shape[-1] > b.shape[-2] * b.shape[-1]:
        return F.adaptive_avg_pool2d(a, b.shape[-2:]), b
    return a, F.adaptive_avg_pool2d(b, a.shape[-2:])
