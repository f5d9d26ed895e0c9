"""Loss pieces shared by several methods (CAT-KD's class attention is used by CAT-KD and LAKD)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def class_activation_maps(fmap: torch.Tensor, classifier: nn.Linear) -> torch.Tensor:
    """CAMs: the classifier's weights applied as a 1x1 convolution to the last feature map (bias excluded).

    ``fmap`` is B x C x H x W, ``classifier.weight`` is K x C; returns B x K x H x W.
    """
    return torch.einsum("bchw,kc->bkhw", fmap, classifier.weight)


def class_attention_loss(cam_s: torch.Tensor, cam_t: torch.Tensor, resolution: int = 2,
                         normalize: bool = False) -> torch.Tensor:
    """CAT-KD's loss: both CAM stacks average-pooled to R x R, optionally L2-normalised over space, MSE."""
    s = F.adaptive_avg_pool2d(cam_s, resolution)
    t = F.adaptive_avg_pool2d(cam_t, resolution)
    if normalize:
        s = F.normalize(s.flatten(2), dim=2)
        t = F.normalize(t.flatten(2), dim=2)
    return F.mse_loss(s, t)
