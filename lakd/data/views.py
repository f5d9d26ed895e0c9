"""Extra views of every training image, made per sample by the data pipeline for the methods that ask for them.

A method that trains on several views of each image (SSKD's rotated copies, MLKD's strong view) declares them as
plain data, ``{name: spec}`` (``Distiller.views(cfg)``); the engine passes that to ``build_data(..., views=...)``
and every training batch then carries ``batch["views"][name]``: a tensor like ``batch["image"]`` (the same
samples in the same order, normalised the same way), each sample's view made from the same stored image with its
own random draws. A spec is a dict of (all optional):

- ``crop``: ``"own"`` (default: the view draws its own crop of the dataset's training augmentation, the random
  crop of the zero-padded image for arrays, RandomResizedCrop for folders) or ``"shared"`` (the batch image's);
- ``flip``: ``"own"`` (default: its own random horizontal flip) or ``"shared"`` (the batch image's);
- ``rotate``: quarter turns counter-clockwise, 0 to 3 (``np.rot90``'s direction; odd turns need square images);
- ``randaugment``: how many RandAugment operations (0: none) to apply, each drawn from ``OPS`` (FixMatch's list,
  as MLKD's authors use it: ``mdistiller/dataset/cifar100.py`` of Jin-Ying/Multi-Level-Logit-Distillation) at a
  uniform random magnitude in its range;
- ``cutout``: the largest Cutout side as a fraction of the image width (0: none): a square of side
  ``u * cutout * width`` (``u`` uniform) filled with ``CUTOUT_FILL``, placed as the authors' ``CutoutAbs``.

Order: crop and flip, rotation, RandAugment, Cutout. With ``data.augment=false`` there is no crop or flip.
Examples (the methods' own files hold them): SSKD's rotated copies ``{"rot90": {"flip": "shared", "rotate": 1},
...}``, MLKD's strong view ``{"strong": {"randaugment": 2, "cutout": 0.5}}``.

Two implementations of the same operations on the same parameters:

- DataLoader path (``loader.py``): in the workers, per sample, with PIL's own operations (``RandAugment.pil``),
  the authors' code path; the draws (``RandAugment.draw``) come from the sample's seeded generator after the
  batch image's own;
- in-memory path (``fast.py``): batched on the training device (``RandAugment.apply``), every operation
  re-implemented on integer-valued tensors to give PIL's pixels (same lookup tables, the same float32 blends
  and 3x3 smoothing, the same 16.16 fixed-point nearest-neighbour affine maps); the parameters of every view of
  the epoch are drawn by the epoch's generator after the permutation and the batch images' augmentation.

Methods without views get exactly the batches they got before: no draw is added to their generators.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import LakdError

VIEW_KEYS = ("crop", "flip", "rotate", "randaugment", "cutout")
#: the authors' RandAugment list (FixMatch's): (name, low, high); magnitudes uniform in [low, high]
OPS = (("autocontrast", 0.0, 1.0), ("brightness", 0.05, 0.95), ("color", 0.05, 0.95), ("contrast", 0.05, 0.95),
       ("equalize", 0.0, 1.0), ("identity", 0.0, 1.0), ("posterize", 4.0, 8.0), ("rotate", -30.0, 30.0),
       ("sharpness", 0.05, 0.95), ("shear_x", -0.3, 0.3), ("shear_y", -0.3, 0.3), ("solarize", 0.0, 256.0),
       ("translate_x", -0.3, 0.3), ("translate_y", -0.3, 0.3))
OP_INDEX = {name: i for i, (name, _, _) in enumerate(OPS)}
CUTOUT_FILL = (125, 123, 114)  # the authors' Cutout colour
_FIX = 65536  # PIL's 16.16 fixed point (libImaging/Geometry.c, affine_fixed)

@dataclass(frozen=True)
class ViewSpec:
    name: str
    crop: str = "own"
    flip: str = "own"
    rotate: int = 0
    randaugment: int = 0
    cutout: float = 0.0

    @property
    def own_draw(self) -> bool:
        """Whether the view draws a crop or a flip of its own."""
        return self.crop == "own" or self.flip == "own"


def parse_views(views: dict | None) -> tuple[ViewSpec, ...]:
    """Check a ``{name: spec}`` declaration; the specs in declaration order."""
    if not views:
        return ()
    if not isinstance(views, dict):
        raise LakdError(f"views must be a dict {{name: spec}}, e.g. {{'strong': {{'randaugment': 2}}}}, "
                        f"got {views!r}")
    out = []
    for name, spec in views.items():
        if not isinstance(name, str) or not name.isidentifier():
            raise LakdError(f"view name {name!r} must be an identifier such as 'strong'")
        spec = {} if spec is None else spec
        if not isinstance(spec, dict):
            raise LakdError(f"view {name!r}: the spec must be a dict of {', '.join(VIEW_KEYS)}, got {spec!r}")
        unknown = sorted(set(spec) - set(VIEW_KEYS))
        if unknown:
            raise LakdError(f"view {name!r}: unknown key(s) {', '.join(map(str, unknown))}; a spec holds "
                            f"{', '.join(VIEW_KEYS)}, e.g. {{'flip': 'shared', 'rotate': 1}}")
        for key in ("crop", "flip"):
            if spec.get(key, "own") not in ("own", "shared"):
                raise LakdError(f"view {name!r}: {key} must be 'own' or 'shared', got {spec[key]!r}")
        rot = spec.get("rotate", 0)
        if isinstance(rot, bool) or not isinstance(rot, int) or not 0 <= rot <= 3:
            raise LakdError(f"view {name!r}: rotate counts quarter turns, 0 to 3 (e.g. 1: 90 degrees), got {rot!r}")
        ra = spec.get("randaugment", 0)
        if isinstance(ra, bool) or not isinstance(ra, int) or ra < 0:
            raise LakdError(f"view {name!r}: randaugment is a number of operations >= 0 (MLKD's: 2), got {ra!r}")
        cut = spec.get("cutout", 0.0)
        if isinstance(cut, bool) or not isinstance(cut, (int, float)) or not 0 <= cut <= 1:
            raise LakdError(f"view {name!r}: cutout is the largest side as a fraction of the width, in [0, 1] "
                            f"(MLKD's: 0.5), got {cut!r}")
        out.append(ViewSpec(name, spec.get("crop", "own"), spec.get("flip", "own"), rot, ra, float(cut)))
    return tuple(out)


def check_views(specs: tuple[ViewSpec, ...], channels: int, height: int, width: int) -> None:
    """Refuse views the data cannot give (odd rotations of non-square images, RandAugment of non-RGB ones)."""
    for v in specs:
        if v.rotate % 2 and height != width:
            raise LakdError(f"view {v.name!r} rotates by {90 * v.rotate} degrees, which needs square images; the "
                            f"training images are {height} x {width}: set data.image_size (square crops)")
        if (v.randaugment or v.cutout) and channels != 3:
            raise LakdError(f"view {v.name!r} applies RandAugment/Cutout, made for RGB images; the dataset has "
                            f"{channels} channel(s)")


# ----- RandAugment: one parameter draw, two implementations ----------------------------------------------------------
def _pil_rotate_matrix(angle: float, width: int, height: int) -> list[float]:
    """The inverse affine map of ``PIL.Image.rotate(angle)`` (no expand, centre of the image), as Pillow builds it."""
    angle = -math.radians(angle % 360.0)
    m = [round(math.cos(angle), 15), round(math.sin(angle), 15), 0.0,
         round(-math.sin(angle), 15), round(math.cos(angle), 15), 0.0]
    cx, cy = width / 2, height / 2
    m[2], m[5] = m[0] * -cx + m[1] * -cy + m[2], m[3] * -cx + m[4] * -cy + m[5]
    m[2] += cx
    m[5] += cy
    return m


def _fixed(a: list[float]) -> list[int]:
    """Pillow's 16.16 fixed-point coefficients of an affine map (``affine_fixed``): pixel ``(x, y)`` reads
    ``((a2 + x a0 + y a1) >> 16, (a5 + x a3 + y a4) >> 16)``."""
    def fix(v):
        return math.floor(v * 65536.0 + 0.5)

    return [fix(a[0]), fix(a[1]), fix(a[2] + a[0] * 0.5 + a[1] * 0.5),
            fix(a[3]), fix(a[4]), fix(a[5] + a[3] * 0.5 + a[4] * 0.5)]


def _scale_shift(c: float) -> int:
    """Integer shift of Pillow's scale-only path (``ImagingScaleAffine``) for a translation ``c``: pixel ``x``
    reads ``floor(c + 0.5 + x)``."""
    return math.floor(c + 0.5)


class RandAugment:
    """``n`` operations drawn with replacement from ``OPS``, each at a uniform magnitude in its range, then (with
    ``cutout > 0``) a Cutout: the authors' ``RandAugment(2, 10)`` (its ``m`` is unused) for ``n = 2, cutout = 0.5``.
    """

    def __init__(self, n: int = 2, cutout: float = 0.5):
        self.n = int(n)
        self.cutout = float(cutout)

    # --- parameters ---------------------------------------------------------------------------------------------
    def sample(self, count: int, generator: torch.Generator | None, height: int, width: int) -> dict:
        """Parameters of ``count`` samples (CPU tensors): operation ``op`` and magnitude ``mag`` per round, the
        fixed-point affine map ``aff`` of each round (the identity for the non-geometric operations) and the
        Cutout box ``box`` (inclusive ``y0, y1, x0, x1``; ``y1 < y0`` for none), all as Pillow computes them."""
        g = generator
        k = self.n
        op = torch.randint(len(OPS), (count, k), generator=g)
        u = torch.rand(count, k, generator=g, dtype=torch.float64)
        low = torch.tensor([lo for _, lo, _ in OPS], dtype=torch.float64)[op]
        high = torch.tensor([hi for _, _, hi in OPS], dtype=torch.float64)[op]
        mag = low + (high - low) * u
        aff = torch.tensor([_FIX, 0, 0, 0, _FIX, 0], dtype=torch.int64).repeat(count, k, 1)
        for i, r in (op == OP_INDEX["rotate"]).nonzero().tolist():  # Pillow's matrix, in Python floats as Pillow
            aff[i, r] = torch.tensor(_fixed(_pil_rotate_matrix(float(mag[i, r]), width, height)))
        for name, col in (("shear_x", 1), ("shear_y", 3)):  # (1, v, 0, 0, 1, 0) and (1, 0, 0, v, 1, 0)
            sel = op == OP_INDEX[name]
            v = mag[sel]
            fix = torch.floor(v * 65536.0 + 0.5).long()
            shift = torch.floor((0.0 + 0.5 + v * 0.5) * 65536.0 + 0.5).long()
            rows = aff[sel]
            rows[:, col] = fix
            rows[:, 2 if name == "shear_x" else 5] = shift
            rows[:, 5 if name == "shear_x" else 2] = _FIX // 2
            aff[sel] = rows
        for name, col, side in (("translate_x", 2, width), ("translate_y", 5, height)):  # scale-only path
            sel = op == OP_INDEX[name]
            shift = torch.floor(mag[sel] * side + 0.5).long()
            rows = aff[sel]
            rows[:, col] = shift * _FIX
            aff[sel] = rows
        out = {"op": op, "mag": mag, "aff": aff}
        if self.cutout > 0:
            c = torch.rand(count, 3, generator=g, dtype=torch.float64)
            out["cut"] = c
            out["box"] = self._boxes(c, height, width)
        return out

    def _boxes(self, c: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """The authors' ``Cutout``/``CutoutAbs`` box from uniforms ``c`` (side, x, y): side ``v = c0 * cutout *
        width``; ``x0 = np.random.uniform(width)`` (numpy's ``uniform(low=width, high=1)``: in (1, width]), the same
        for ``y0`` with the height; the box ``[int(max(0, x0 - v/2)), min(width, x0' + v)]`` drawn inclusive by PIL
        (ends truncated, clipped to the image)."""
        val = c[:, 0] * self.cutout
        v = val * width
        x0 = torch.clamp(width + (1.0 - width) * c[:, 1] - v / 2.0, min=0).floor()
        y0 = torch.clamp(height + (1.0 - height) * c[:, 2] - v / 2.0, min=0).floor()
        x1 = torch.minimum(torch.full_like(x0, float(width)), x0 + v).floor().clamp(max=width - 1)
        y1 = torch.minimum(torch.full_like(y0, float(height)), y0 + v).floor().clamp(max=height - 1)
        none = val <= 0
        y1 = torch.where(none, y0 - 1, y1)
        return torch.stack([y0, y1, x0, x1], 1).long()

    # --- PIL, per sample (the authors' operations) --------------------------------------------------------------
    def draw(self, generator: torch.Generator | None = None) -> tuple[list[int], list[float], list[float]]:
        """One sample's parameters as Python numbers (two generator calls; the DataLoader path's per-sample
        draw): the operations, their magnitudes and the Cutout's three uniforms (side, x, y; empty without one)."""
        ops = torch.randint(len(OPS), (self.n,), generator=generator).tolist()
        u = torch.rand(self.n + (3 if self.cutout > 0 else 0), generator=generator, dtype=torch.float64).tolist()
        mags = [OPS[k][1] + (OPS[k][2] - OPS[k][1]) * v for k, v in zip(ops, u)]
        return ops, mags, u[self.n:]

    def pil(self, img, ops, mags, cut=()):
        """The operations ``ops`` at magnitudes ``mags``, then the Cutout of uniforms ``cut``, on a PIL RGB image
        with PIL's operations, as the authors' ``RandAugment.__call__`` (the DataLoader path)."""
        from PIL import ImageDraw

        for k, v in zip(ops, mags):
            img = _PIL_OPS[int(k)](img, float(v))
        if self.cutout > 0:
            val = cut[0] * self.cutout  # the authors' Cutout(img, v) with v = random() * 0.5
            if val > 0:
                w, h = img.size
                v = val * w
                x0 = int(max(0, w + (1.0 - w) * cut[1] - v / 2.0))
                y0 = int(max(0, h + (1.0 - h) * cut[2] - v / 2.0))
                img = img.copy()
                ImageDraw.Draw(img).rectangle((x0, y0, min(w, x0 + v), min(h, y0 + v)), CUTOUT_FILL)
        return img

    # --- tensors, batched (the in-memory path) ------------------------------------------------------------------
    def apply(self, x: torch.Tensor, params: dict) -> torch.Tensor:
        """The same operations on a batch of integer-valued images ``x`` (``B x 3 x H x W``, 0..255, any float
        or integer dtype), on ``x``'s device; float32 integer values out, equal to PIL's pixels."""
        x = x.float()
        op = params["op"]  # on the CPU where it can be (grouping the samples by operation)
        mag = params["mag"].to(x.device)
        aff = params["aff"].to(x.device)
        for r in range(self.n):
            x = _apply_round(x, op[:, r], mag[:, r], aff[:, r])
        if self.cutout > 0:
            x = _cutout(x, params["box"].to(x.device))
        return x


def _affine(img, coeffs):
    from PIL import Image

    return img.transform(img.size, Image.AFFINE, coeffs)


def _pil_ops():
    from PIL import ImageEnhance, ImageOps

    table = {
        "autocontrast": lambda img, v: ImageOps.autocontrast(img),
        "brightness": lambda img, v: ImageEnhance.Brightness(img).enhance(v),
        "color": lambda img, v: ImageEnhance.Color(img).enhance(v),
        "contrast": lambda img, v: ImageEnhance.Contrast(img).enhance(v),
        "equalize": lambda img, v: ImageOps.equalize(img),
        "identity": lambda img, v: img,
        "posterize": lambda img, v: ImageOps.posterize(img, max(1, int(v))),
        "rotate": lambda img, v: img.rotate(v),
        "sharpness": lambda img, v: ImageEnhance.Sharpness(img).enhance(v),
        "shear_x": lambda img, v: _affine(img, (1, v, 0, 0, 1, 0)),
        "shear_y": lambda img, v: _affine(img, (1, 0, 0, v, 1, 0)),
        "solarize": lambda img, v: ImageOps.solarize(img, v),
        "translate_x": lambda img, v: _affine(img, (1, 0, v * img.size[0], 0, 1, 0)),
        "translate_y": lambda img, v: _affine(img, (1, 0, 0, 0, 1, v * img.size[1])),
    }
    return [table[name] for name, _, _ in OPS]


class _LazyOps:
    """PIL imported on first use (the in-memory path never needs it)."""

    ops = None

    def __getitem__(self, i):
        if _LazyOps.ops is None:
            _LazyOps.ops = _pil_ops()
        return _LazyOps.ops[i]


_PIL_OPS = _LazyOps()


# ----- the batched operations: PIL's arithmetic on integer-valued float tensors ---------------------------------------
def _col(v: torch.Tensor) -> torch.Tensor:
    return v.view(-1, 1, 1, 1)


def _blend(degenerate: torch.Tensor, x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``Image.blend(degenerate, image, factor)`` (libImaging/Blend.c): ``in1 + alpha * (in2 - in1)`` in float32,
    truncated to uint8 (``factor`` in [0, 1])."""
    return torch.trunc(degenerate + _col(factor.float()) * (x - degenerate))


def _gray(x: torch.Tensor) -> torch.Tensor:
    """PIL's RGB -> L: ``(19595 R + 38470 G + 7471 B + 0x8000) >> 16`` (exact in float32: below 2**24)."""
    return torch.floor((x[:, 0:1] * 19595 + x[:, 1:2] * 38470 + x[:, 2:3] * 7471 + 32768) / 65536)


def _smooth(x: torch.Tensor) -> torch.Tensor:
    """``ImageFilter.SMOOTH`` (3x3 kernel 1 1 1 / 1 5 1 / 1 1 1 over 13, libImaging/Filter.c): float32 sums in
    Pillow's order with 0.5 added for rounding, truncated; the border pixels are copied."""
    one = torch.tensor(1.0, dtype=torch.float32) / torch.tensor(13.0, dtype=torch.float32)
    five = torch.tensor(5.0, dtype=torch.float32) / torch.tensor(13.0, dtype=torch.float32)
    one, five = one.to(x.device), five.to(x.device)
    if x.shape[-1] < 3 or x.shape[-2] < 3:
        return x

    def row(r, centre):
        return (r[..., :-2] * one + r[..., 1:-1] * centre) + r[..., 2:] * one

    below, mid, above = x[..., 2:, :], x[..., 1:-1, :], x[..., :-2, :]
    ss = ((0.5 + row(below, one)) + row(mid, five)) + row(above, one)
    out = x.clone()
    out[..., 1:-1, 1:-1] = torch.trunc(ss.clamp(0.0, 255.0))
    return out


def _autocontrast(x: torch.Tensor) -> torch.Tensor:
    """``ImageOps.autocontrast`` per channel: ``int(v * 255 / (hi - lo) - lo * scale)`` in float64, clipped."""
    xd = x.double()
    lo = xd.amin(dim=(2, 3), keepdim=True)
    hi = xd.amax(dim=(2, 3), keepdim=True)
    ok = hi > lo
    # a tensor / tensor division: torch divides a scalar by a tensor through the reciprocal (not Python's rounding)
    scale = torch.full_like(hi, 255.0) / torch.where(ok, hi - lo, torch.ones_like(hi))
    offset = -lo * scale
    out = torch.trunc(xd * scale + offset).clamp(0, 255)
    return torch.where(ok, out, xd).float()


def _equalize(x: torch.Tensor) -> torch.Tensor:
    """``ImageOps.equalize`` per channel: the lookup ``(step // 2 + pixels below) // step`` with ``step = (N -
    count of the highest level) // 255`` (identity with one level or ``step = 0``), clipped to 255."""
    b, c, h, w = x.shape
    idx = x.long().clamp(0, 255).view(b, c, h * w)
    hist = torch.zeros(b, c, 256, dtype=torch.int64, device=x.device).scatter_add_(2, idx, torch.ones_like(idx))
    levels = torch.arange(256, device=x.device)
    present = hist > 0
    last = torch.where(present, levels, torch.full_like(levels, -1)).amax(dim=2, keepdim=True)
    top = hist.gather(2, last.clamp(min=0))
    step = (h * w - top) // 255
    ok = (present.sum(dim=2, keepdim=True) > 1) & (step > 0)
    below = hist.cumsum(2) - hist
    lut = ((step // 2 + below) // step.clamp(min=1)).clamp(max=255)
    out = lut.gather(2, idx).view(b, c, h, w)
    return torch.where(ok.view(b, c, 1, 1), out, x.long()).float()


def _posterize(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    bits = torch.clamp(torch.trunc(v), min=1)
    q = _col(torch.pow(2.0, 8 - bits).float())
    return torch.floor(x / q) * q


def _solarize(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return torch.where(x.double() < _col(v), x, 255.0 - x)


def _gather_affine(x: torch.Tensor, aff: torch.Tensor) -> torch.Tensor:
    """Nearest-neighbour affine maps in Pillow's fixed point: pixel ``(y, x)`` of sample ``i`` reads
    ``(yin, xin) = ((a5 + x a3 + y a4) >> 16, (a2 + x a0 + y a1) >> 16)``, black outside the image."""
    b, c, h, w = x.shape
    dev = x.device
    ys = torch.arange(h, device=dev).view(1, h, 1)
    xs = torch.arange(w, device=dev).view(1, 1, w)
    a = [aff[:, k].view(b, 1, 1) for k in range(6)]
    xin = torch.div(a[2] + xs * a[0] + ys * a[1], _FIX, rounding_mode="floor")
    yin = torch.div(a[5] + xs * a[3] + ys * a[4], _FIX, rounding_mode="floor")
    ok = (xin >= 0) & (xin < w) & (yin >= 0) & (yin < h)
    idx = (yin.clamp(0, h - 1) * w + xin.clamp(0, w - 1)).view(b, 1, h * w).expand(b, c, h * w)
    out = x.reshape(b, c, h * w).gather(2, idx).view(b, c, h, w)
    return out * ok.view(b, 1, h, w)


def _contrast(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``ImageEnhance.Contrast``: blend with the grey image of the rounded mean grey level (ImageStat's sum /
    count, correctly rounded: torch's ``mean`` and scalar divisions go through a reciprocal)."""
    gray = _gray(x)
    total = gray.double().sum(dim=(1, 2, 3))
    mean = torch.floor(total / torch.full_like(total, float(gray[0].numel())) + 0.5).float()
    return _blend(_col(mean).expand_as(x), x, v)


#: the batched operations, by name: ``fn(images, magnitudes, affine maps)``; the geometric ones share one gather
_BATCHED = {
    "autocontrast": lambda x, v, a: _autocontrast(x),
    "brightness": lambda x, v, a: _blend(torch.zeros_like(x), x, v),
    "color": lambda x, v, a: _blend(_gray(x).expand_as(x), x, v),
    "contrast": lambda x, v, a: _contrast(x, v),
    "equalize": lambda x, v, a: _equalize(x),
    "posterize": lambda x, v, a: _posterize(x, v),
    "sharpness": lambda x, v, a: _blend(_smooth(x), x, v),
    "solarize": lambda x, v, a: _solarize(x, v),
    "geometric": lambda x, v, a: _gather_affine(x, a),
}
_GROUPS = [(name, (OP_INDEX[name],)) for name in _BATCHED if name != "geometric"] + [
    ("geometric", tuple(OP_INDEX[n] for n in ("rotate", "shear_x", "shear_y", "translate_x", "translate_y")))]


def _apply_round(x: torch.Tensor, op: torch.Tensor, v: torch.Tensor, aff: torch.Tensor) -> torch.Tensor:
    """One RandAugment round: each operation on the samples that drew it. ``op`` (the operation of every sample)
    should be a CPU tensor (the in-memory loader keeps it there): the grouping then needs no device sync."""
    op = op.cpu()
    out = x.clone()
    for name, ids in _GROUPS:
        sel = torch.isin(op, torch.tensor(ids)).nonzero().flatten()
        if sel.numel() == 0:
            continue
        sel = sel.to(x.device, non_blocking=True)
        out.index_copy_(0, sel, _BATCHED[name](x.index_select(0, sel), v.index_select(0, sel),
                                               aff.index_select(0, sel)))
    return out


def _cutout(x: torch.Tensor, box: torch.Tensor) -> torch.Tensor:
    b, c, h, w = x.shape
    ys = torch.arange(h, device=x.device).view(1, h, 1)
    xs = torch.arange(w, device=x.device).view(1, 1, w)
    y0, y1, x0, x1 = (box[:, k].view(b, 1, 1) for k in range(4))
    inside = ((ys >= y0) & (ys <= y1) & (xs >= x0) & (xs <= x1)).unsqueeze(1)
    fill = torch.tensor(CUTOUT_FILL, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return torch.where(inside, fill, x)


# ----- the views of a batch (in-memory path) and of one sample (DataLoader path) --------------------------------------
class BatchViews:
    """The views of the in-memory loader: parameters of the whole epoch drawn at once (``sample``), views of one
    batch made on the device (``make``)."""

    def __init__(self, specs: tuple[ViewSpec, ...], augment=None):
        self.specs = specs
        self.augment = augment
        self.randaugment = {v.name: RandAugment(v.randaugment, v.cutout) for v in specs if v.randaugment or v.cutout}

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(v.name for v in self.specs)

    def sample(self, n: int, generator: torch.Generator, height: int, width: int,
               main: dict[str, torch.Tensor] | None) -> dict[str, dict[str, torch.Tensor]]:
        """Every view's parameters for the ``n`` positions of an epoch (after the batch images' draws)."""
        out = {}
        for v in self.specs:
            p: dict[str, torch.Tensor] = {}
            if self.augment is not None:
                own = self.augment.sample(n, generator, height, width) if v.own_draw else {}
                for k, val in main.items():
                    shared = (v.flip == "shared") if k == "flip" else (v.crop == "shared")
                    p[f"aug.{k}"] = val if shared else own[k]
            if v.name in self.randaugment:
                size = self._out_size(v, height, width)
                for k, val in self.randaugment[v.name].sample(n, generator, *size).items():
                    p[f"ra.{k}"] = val
            out[v.name] = p
        return out

    @staticmethod
    def to_device(params: dict[str, dict[str, torch.Tensor]], device) -> dict[str, dict[str, torch.Tensor]]:
        """``sample``'s parameters on ``device``, but the RandAugment operation ids, which stay on the CPU (the
        samples are grouped by operation without a device sync)."""
        return {n: {k: v if k == "ra.op" else v.to(device) for k, v in p.items()} for n, p in params.items()}

    def _out_size(self, v: ViewSpec, height: int, width: int) -> tuple[int, int]:
        if self.augment is not None and hasattr(self.augment, "size"):
            height = width = self.augment.size
        return (width, height) if v.rotate % 2 else (height, width)

    def make(self, raw: torch.Tensor, image: torch.Tensor, params: dict[str, dict[str, torch.Tensor]]
             ) -> dict[str, torch.Tensor]:
        """The views of one batch: ``raw`` the stored images, ``image`` the batch image (augmented, before
        normalisation), ``params`` the batch's slice of ``sample``'s (on the device)."""
        out = {}
        for v in self.specs:
            p = params[v.name]
            if self.augment is None or (v.crop == "shared" and v.flip == "shared"):
                x = image
            else:
                x = self.augment.apply(raw, {k[4:]: val for k, val in p.items() if k.startswith("aug.")})
            if v.rotate:
                x = torch.rot90(x, v.rotate, (2, 3))
            if v.name in self.randaugment:
                if x.is_floating_point():  # resampled crops (folders): back to 8-bit levels first
                    x = x.round().clamp_(0, 255)
                x = self.randaugment[v.name].apply(x, {k[3:]: val for k, val in p.items() if k.startswith("ra.")})
            out[v.name] = x
        return out


class SampleViews:
    """The batch image and the views of one sample (DataLoader path, in the workers), every random draw from
    torch's default generator, which the dataset seeds per sample; the batch image is drawn first, exactly as the
    torchvision transforms it replaces (``cifar_transforms``/``folder_transforms``), so a method's views leave
    its batch images as they are without views.

    ``kind``: ``"array"`` (uint8 CHW tensors: random crop of the zero-padded image, ``pad``) or ``"folder"`` (PIL
    images: RandomResizedCrop to ``size``); ``augment=False``: no crop or flip (folders: resize and centre crop).
    """

    def __init__(self, specs: tuple[ViewSpec, ...], kind: str, augment: bool, *, pad: int = 4, size: int = 0):
        self.specs = specs
        self.kind = kind
        self.augment = augment
        self.pad = int(pad)
        self.size = int(size)
        self.randaugment = {v.name: RandAugment(v.randaugment, v.cutout) for v in specs if v.randaugment or v.cutout}

    # crop parameters drawn as torchvision's RandomCrop / RandomResizedCrop draw them
    def _crop_params(self, img):
        if self.kind == "array":
            span = 2 * self.pad + 1
            return (int(torch.randint(0, span, size=(1,)).item()), int(torch.randint(0, span, size=(1,)).item()))
        from torchvision import transforms as T

        return tuple(T.RandomResizedCrop.get_params(img, scale=[0.08, 1.0], ratio=[3.0 / 4.0, 4.0 / 3.0]))

    def _crop(self, img, params, flip: bool) -> torch.Tensor:
        import torch.nn.functional as F
        from torchvision.transforms import functional as TF

        if self.kind == "array":
            if params is not None:
                h, w = img.shape[-2:]
                p = self.pad
                img = F.pad(img, (p, p, p, p))[..., params[0]:params[0] + h, params[1]:params[1] + w]
            return img.flip(-1) if flip else img
        if params is None:
            from .transforms import resize_size

            img = TF.center_crop(TF.resize(img, resize_size(self.size)), self.size)
        else:
            i, j, h, w = params
            img = TF.resized_crop(img, i, j, h, w, [self.size, self.size], antialias=True)
        if flip:
            img = TF.hflip(img)
        return TF.pil_to_tensor(img)

    def __call__(self, img) -> tuple[torch.Tensor, list[torch.Tensor]]:
        crop = flip = None
        if self.augment:
            crop = self._crop_params(img)
            flip = bool(torch.rand(1) < 0.5)
        main = self._crop(img, crop, bool(flip))
        views = []
        for v in self.specs:
            if not self.augment or (v.crop == "shared" and v.flip == "shared"):
                x = main
            else:
                vc = crop if v.crop == "shared" else self._crop_params(img)
                vf = flip if v.flip == "shared" else bool(torch.rand(1) < 0.5)
                x = self._crop(img, vc, vf)
            if v.rotate:
                x = torch.rot90(x, v.rotate, (1, 2))
            if v.name in self.randaugment:
                x = _pil_randaugment(self.randaugment[v.name], x)
            views.append(x.contiguous())
        return main.contiguous(), views


def _pil_randaugment(ra: RandAugment, x: torch.Tensor) -> torch.Tensor:
    from PIL import Image

    img = Image.fromarray(x.permute(1, 2, 0).contiguous().numpy())
    out = np.asarray(ra.pil(img, *ra.draw()))
    return torch.from_numpy(out.copy()).permute(2, 0, 1).contiguous()
