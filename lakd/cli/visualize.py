"""``lakd visualize``: class activation maps and NDAM attention maps of models side by side (Figures 4, 6, 7)."""
from __future__ import annotations

import argparse
import os

from ..errors import LakdError
from .common import archs_for, check_out_dir, split_overrides

HELP = "picture grid of each model's class activation map (true class) and NDAM attention map"

EPILOG = """\
examples:
  lakd visualize --checkpoints runs/catkd_r20/best.pt runs/lakd_r20/best.pt --images 6 --out maps.png
  lakd visualize --checkpoints r20.pth --arch resnet20 --stage 2 data.dataset=cifar10

One row per test image: the input, then for each model its class activation map for the true class and its
NDAM map A(F) = a*mean_c|F| + b*max_c|F| (a=1, b=2) at the chosen stage, both upsampled to the image and
min-max normalised, drawn over the image. Each row names the true label and every model's prediction.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EPILOG
    parser.add_argument("--checkpoints", nargs="+", required=True, metavar="CKPT", help="model checkpoints")
    parser.add_argument("--arch", nargs="+", default=None, metavar="NAME",
                        help="model name(s) for checkpoints that do not record it: one for all or one each")
    parser.add_argument("--images", type=int, default=6, help="number of test images (rows), default 6")
    parser.add_argument("--start", type=int, default=0, help="first test image (default 0)")
    parser.add_argument("--indices", default=None,
                        help="comma list of test-set positions to show instead of --start/--images")
    parser.add_argument("--stage", type=int, default=-1,
                        help="stage whose output gives the NDAM map, 1-based (default -1: the last)")
    parser.add_argument("--ndam-avg", type=float, default=1.0, help="NDAM weight of the channel mean (a)")
    parser.add_argument("--ndam-max", type=float, default=2.0, help="NDAM weight of the channel max (b)")
    parser.add_argument("--no-abs", action="store_true",
                        help="NDAM on F instead of |F| (the same map on a post-ReLU stage output; see --preact)")
    parser.add_argument("--preact", action="store_true",
                        help="NDAM from the stage's pre-activation (signed), as ndam.source=teacher_preact trains")
    parser.add_argument("--alpha", type=float, default=0.5, help="heatmap opacity over the image (0..1)")
    parser.add_argument("--out", default="attention.png", metavar="FILE.png", help="output picture")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides for the data, e.g. data.dataset=cifar10 data.root=/data")


def _positions(args) -> list[int]:
    if args.indices:
        try:
            pos = [int(p) for p in args.indices.replace(" ", "").split(",") if p]
        except ValueError:
            raise LakdError(f"--indices {args.indices!r} must be a comma list of integers, e.g. 0,5,12") from None
        if not pos or min(pos) < 0:
            raise LakdError(f"--indices {args.indices!r} must list test-set positions >= 0")
        return pos
    if args.images < 1 or args.start < 0:
        raise LakdError(f"--images must be >= 1 and --start >= 0 (got {args.images}, {args.start})")
    return list(range(args.start, args.start + args.images))


def run(args) -> int:
    import torch

    with torch.no_grad():
        return _run(args)


def _run(args) -> int:
    import torch

    from ..analysis.visualize import attention_maps, plot_attention_grid
    from ..data import denormalize
    from ..engine.loading import load_models_and_data, unique_labels

    paths, overrides = split_overrides(args.checkpoints, args.overrides)
    if not paths:
        raise LakdError("--checkpoints needs at least one checkpoint")
    if not 0.0 <= args.alpha <= 1.0:
        raise LakdError(f"--alpha {args.alpha} must lie in 0..1")
    if not args.out.lower().endswith(".png"):
        raise LakdError(f"--out {args.out!r} must name a .png file")
    if os.path.isdir(args.out):
        raise LakdError(f"--out {args.out!r} is a folder; give a .png file name")
    check_out_dir(os.path.dirname(os.path.abspath(args.out)), "--out's folder")
    pos = _positions(args)
    archs = archs_for(args.arch, len(paths), "--arch")
    models, labels, _metas, bundle, cfg, device = load_models_and_data(paths, archs, overrides)
    labels = unique_labels(labels, paths)
    # gather the chosen test images (fixed order)
    want = set(pos)
    got: dict[int, tuple] = {}
    seen = 0
    for batch in bundle.test:
        n = batch["image"].shape[0]
        for j in range(n):
            if seen + j in want:
                got[seen + j] = (batch["image"][j], int(batch["target"][j]), int(batch["index"][j]))
        seen += n
        if len(got) == len(want) or seen > max(pos):
            break
    missing = [p for p in pos if p not in got]
    if missing:
        raise LakdError(f"the test set has {seen} images; positions {missing[:5]} do not exist")
    images = torch.stack([got[p][0] for p in pos]).to(device)
    targets = torch.tensor([got[p][1] for p in pos], device=device)
    names = list(bundle.class_names) if getattr(bundle, "class_names", None) else None

    def cname(k: int) -> str:
        return str(names[k]) if names and 0 <= k < len(names) else str(k)

    cols = []
    for label, model in zip(labels, models):
        maps = attention_maps(model, images, targets, stage=args.stage, ndam_avg=args.ndam_avg,
                              ndam_max=args.ndam_max, use_abs=not args.no_abs,
                              preact=args.preact)
        pred = maps["pred"].tolist()
        cols.append({"label": label, "stage": maps["stage"], "cam": maps["cam"].numpy(),
                     "ndam": maps["ndam"].numpy(), "pred": [cname(k) for k in pred], "prob": maps["prob"].tolist(),
                     "correct": [k == t for k, t in zip(pred, targets.tolist())]})
    pics = denormalize(images, bundle.mean, bundle.std).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
    rows = [{"index": got[p][2], "true": cname(got[p][1])} for p in pos]
    title = f"{cfg['data']['dataset']} test images: class activation maps and NDAM maps"
    plot_attention_grid(pics, rows, cols, args.out, alpha=args.alpha, title=title)
    for c in cols:
        print(f"  {c['label']}: {sum(c['correct'])}/{len(pos)} shown images predicted right")
    print(f"wrote {args.out} ({len(pos)} images x {len(cols)} models)")
    return 0
