"""Loss pieces shared by several methods and by the analyses: class activation maps and CAT-KD's class attention
(used by CAT-KD and LAKD), and LAKD's NDAM attention map (also drawn by ``lakd visualize``)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def class_activation_maps(fmap: torch.Tensor, classifier: nn.Linear) -> torch.Tensor:
    """CAMs: the classifier's weights applied as a 1x1 convolution to the last feature map (bias excluded).

    ``fmap`` is B x C x H x W, ``classifier.weight`` is K x C; returns B x K x H x W.
    """
    return torch.einsum("bchw,kc->bkhw", fmap, classifier.weight)


def model_class_maps(model, fmap: torch.Tensor) -> torch.Tensor:
    """``model``'s class activation maps of ``fmap``: its own ``class_maps`` (``FeatureNet``: adapted networks
    apply their post-pooling layers), else the classifier's weights as a 1x1 convolution."""
    own = getattr(model, "class_maps", None)
    return own(fmap) if own is not None else class_activation_maps(fmap, model.classifier)


def area_pool(x: torch.Tensor, size: int) -> torch.Tensor:
    """``F.adaptive_avg_pool2d(x, size)``, through ``F.avg_pool2d`` when ``size`` divides the map: the same
    windows (bitwise the same result on a CPU for size > 1), but a backward that CUDA computes without atomics.
    ``train.deterministic=true`` otherwise warns that adaptive pooling's CUDA backward is nondeterministic
    (PyTorch flags it whether or not the windows overlap; ``benchmarks/gpu_exact.py``)."""
    h, w = x.shape[-2:]
    if h % size == 0 and w % size == 0:
        return F.avg_pool2d(x, (h // size, w // size))
    return F.adaptive_avg_pool2d(x, size)


def class_attention_loss(cam_s: torch.Tensor, cam_t: torch.Tensor, resolution: int = 2,
                         normalize: bool = False) -> torch.Tensor:
    """CAT-KD's loss: both CAM stacks average-pooled to R x R, optionally L2-normalised over space, MSE."""
    s = area_pool(cam_s, resolution)
    t = area_pool(cam_t, resolution)
    if normalize:
        s = F.normalize(s.flatten(2), dim=2)
        t = F.normalize(t.flatten(2), dim=2)
    return F.mse_loss(s, t)


def ndam_map(feat: torch.Tensor, avg_weight: float = 1.0, max_weight: float = 2.0, use_abs: bool = True,
             eps: float = 1e-8) -> torch.Tensor:
    """Non-Directional Activation Map of a B x C x H x W feature: B x 1 x H x W, mean 1 per sample.

    ``A = avg_weight * mean_c(|F|) + max_weight * max_c(|F|)`` (|F| replaced by F when ``use_abs`` is off),
    divided by its spatial mean. Where the map's mean is not positive (possible without abs) it is shifted
    to be non-negative first, so the weights stay non-negative. Half-precision features (autocast) are
    computed in float32: in fp16 ``eps`` would round to 0 and an all-zero map would give 0/0.
    """
    if feat.dtype in (torch.float16, torch.bfloat16):
        feat = feat.float()
    f = feat.abs() if use_abs else feat
    a = avg_weight * f.mean(dim=1, keepdim=True) + max_weight * f.amax(dim=1, keepdim=True)
    if not use_abs:
        a = a - a.amin(dim=(2, 3), keepdim=True).clamp(max=0)
    return a / (a.mean(dim=(2, 3), keepdim=True) + eps)
