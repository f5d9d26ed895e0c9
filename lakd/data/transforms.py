"""Batched on-device augmentation and normalisation, plus the per-sample torchvision transforms.

Batched augmentations split into ``sample(n, generator, ...)`` (all parameters of an epoch, drawn on the CPU in
permutation order) and ``apply(images, params)`` (one batch, on the images' device, no per-sample Python).
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..errors import LakdError


def _as_stats(values: Sequence[float], name: str, channels: int = 3) -> tuple[float, ...]:
    try:
        out = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        raise LakdError(f"data.{name} must be a list of {channels} numbers, got {values!r}") from None
    if len(out) != channels:
        raise LakdError(f"data.{name} must have {channels} values (one per channel), got {list(values)!r}")
    if name == "std" and any(not v > 0 for v in out):
        raise LakdError(f"data.std values must be positive, got {list(values)!r}")
    return out


class Normalizer:
    """uint8 (or 0..255 float) NCHW batch -> float32 ``(x/255 - mean)/std`` on ``device``.

    Optionally resizes to ``size`` (bilinear) first and returns channels_last memory format.
    """

    def __init__(self, mean, std, device, channels_last: bool = False, size: int | None = None):
        self.device = torch.device(device)
        mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self.scale = (1.0 / (255.0 * std)).to(self.device)
        self.shift = (-mean / std).to(self.device)
        self.channels_last = channels_last
        self.size = size

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True).float()
        if self.size and tuple(x.shape[-2:]) != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False,
                              antialias=x.shape[-1] > self.size)
        x = torch.addcmul(self.shift, x, self.scale)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x


def denormalize(images: torch.Tensor, mean, std) -> torch.Tensor:
    """Undo the normalisation: ``images*std + mean`` clamped to [0, 1] (NCHW or CHW)."""
    mean_t = torch.as_tensor(mean, dtype=images.dtype, device=images.device).view(-1, 1, 1)
    std_t = torch.as_tensor(std, dtype=images.dtype, device=images.device).view(-1, 1, 1)
    return (images * std_t + mean_t).clamp_(0.0, 1.0)


class CropFlip:
    """Random crop of the zero-padded image (``pad`` pixels each side) plus a random horizontal flip.

    One gather per batch does both: output pixel ``(y, x)`` of sample ``i`` reads padded pixel
    ``(dy_i + y, dx_i + x)``, or ``(dy_i + y, dx_i + W-1-x)`` when sample ``i`` is flipped.
    """

    def __init__(self, pad: int = 4, flip: bool = True):
        self.pad = int(pad)
        self.flip = flip

    def sample(self, n: int, generator: torch.Generator, height: int, width: int) -> dict[str, torch.Tensor]:
        offsets = torch.randint(0, 2 * self.pad + 1, (n, 2), generator=generator)
        flips = torch.rand(n, generator=generator) < 0.5 if self.flip else torch.zeros(n, dtype=torch.bool)
        return {"dy": offsets[:, 0], "dx": offsets[:, 1], "flip": flips}

    def apply(self, x: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        b, c, h, w = x.shape
        p = self.pad
        dev = x.device
        dy, dx, flip = (params[k].to(dev, non_blocking=True) for k in ("dy", "dx", "flip"))
        xp = F.pad(x, (p, p, p, p)) if p else x
        wp = w + 2 * p
        ar_h = torch.arange(h, device=dev)
        ar_w = torch.arange(w, device=dev)
        rows = dy[:, None] + ar_h  # (b, h)
        cols = dx[:, None] + torch.where(flip[:, None], (w - 1) - ar_w, ar_w)  # (b, w)
        idx = (rows[:, :, None] * wp + cols[:, None, :]).reshape(b, 1, h * w).expand(b, c, h * w)
        return xp.reshape(b, c, -1).gather(2, idx).view(b, c, h, w)


class ResizedCropFlip:
    """torchvision's RandomResizedCrop (scale, ratio, 10 tries then centre fallback) + flip, batched.

    The crop boxes are resampled to ``size`` x ``size`` with one ``grid_sample`` (bilinear) per batch.
    """

    def __init__(self, size: int, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), flip: bool = True, tries: int = 10):
        self.size = int(size)
        self.scale = scale
        self.ratio = ratio
        self.flip = flip
        self.tries = tries

    def sample(self, n: int, generator: torch.Generator, height: int, width: int) -> dict[str, torch.Tensor]:
        g = generator
        area = height * width
        t = self.tries
        target = area * (self.scale[0] + (self.scale[1] - self.scale[0]) * torch.rand(n, t, generator=g,
                                                                                       dtype=torch.float64))
        lr = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        aspect = torch.exp(lr[0] + (lr[1] - lr[0]) * torch.rand(n, t, generator=g, dtype=torch.float64))
        w = torch.round(torch.sqrt(target * aspect))
        h = torch.round(torch.sqrt(target / aspect))
        ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
        first = torch.where(ok.any(1), ok.float().argmax(1), torch.full((n,), -1))
        # fallback (no try fits): the whole image cropped to the allowed aspect range, centred
        in_ratio = width / height
        if in_ratio < self.ratio[0]:
            fw, fh = width, round(width / self.ratio[0])
        elif in_ratio > self.ratio[1]:
            fh, fw = height, round(height * self.ratio[1])
        else:
            fw, fh = width, height
        rows = torch.arange(n)
        sel = first.clamp(min=0)
        cw = torch.where(first >= 0, w[rows, sel], torch.full((n,), float(fw), dtype=torch.float64))
        ch = torch.where(first >= 0, h[rows, sel], torch.full((n,), float(fh), dtype=torch.float64))
        u = torch.rand(n, 2, generator=g, dtype=torch.float64)
        top = torch.floor(u[:, 0] * (height - ch + 1))
        left = torch.floor(u[:, 1] * (width - cw + 1))
        top = torch.where(first >= 0, top, (height - ch) // 2)
        left = torch.where(first >= 0, left, (width - cw) // 2)
        flips = torch.rand(n, generator=g) < 0.5 if self.flip else torch.zeros(n, dtype=torch.bool)
        box = torch.stack([top, left, ch, cw], 1).float()
        return {"box": box, "flip": flips}

    def apply(self, x: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        b, c, h, w = x.shape
        dev = x.device
        box = params["box"].to(dev, non_blocking=True)
        flip = params["flip"].to(dev, non_blocking=True)
        top, left, ch, cw = box.unbind(1)
        sx = cw / w * torch.where(flip, -1.0, 1.0)
        sy = ch / h
        cx = (2 * left + cw) / w - 1  # box centre in normalised coordinates (align_corners=False)
        cy = (2 * top + ch) / h - 1
        zero = torch.zeros_like(sx)
        theta = torch.stack([torch.stack([sx, zero, cx], 1), torch.stack([zero, sy, cy], 1)], 1)
        grid = F.affine_grid(theta, [b, c, self.size, self.size], align_corners=False)
        return F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)


def center_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    h, w = x.shape[-2:]
    if (h, w) == (size, size) or h < size or w < size:
        return x
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))  # as torchvision's CenterCrop
    return x[..., top:top + size, left:left + size]


@contextlib.contextmanager
def seeded_torch_rng(seed: int | None):
    """Seed torch's default CPU generator for one sample's transforms (restored afterwards in the main
    process; DataLoader workers own their generator, so there it is simply reseeded)."""
    if seed is None:
        yield
        return
    gen = torch.default_generator
    restore = torch.utils.data.get_worker_info() is None
    state = gen.get_state() if restore else None
    gen.manual_seed(seed)
    try:
        yield
    finally:
        if restore:
            gen.set_state(state)


def cifar_transforms(native: int, augment: bool, pad: int = 4):
    """Per-sample torchvision transforms for uint8 CHW tensors (the DataLoader path for array datasets);
    resizing to another image size happens on the device (``Normalizer``)."""
    from torchvision import transforms as T

    if not augment:
        return None
    return T.Compose([T.RandomCrop(native, padding=pad), T.RandomHorizontalFlip()])


def folder_transforms(size: int, augment: bool):
    """ImageNet-style per-sample transforms for PIL images -> uint8 CHW tensors."""
    from torchvision import transforms as T

    if augment:
        return T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), T.PILToTensor()])
    return T.Compose([T.Resize(resize_size(size)), T.CenterCrop(size), T.PILToTensor()])


def resize_size(size: int) -> int:
    """Evaluation resize before the centre crop (256 for 224)."""
    return int(round(size * 256 / 224))
