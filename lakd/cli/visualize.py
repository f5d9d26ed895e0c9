"""``lakd visualize``: class activation maps and NDAM attention maps of models side by side (Figures 4, 6, 7)."""
from __future__ import annotations

import argparse
import os

from ..errors import LakdError
from .common import (
    add_progress_flag,
    archs_for,
    check_out_dir,
    default_out_dir,
    progress_on,
    progress_overrides,
    split_overrides,
)

HELP = "picture grid of each model's class activation map (true class) and NDAM attention map"

EPILOG = """\
examples:
  lakd visualize --checkpoints runs/catkd_r20/best.pt runs/lakd_r20/best.pt --images 6
  lakd visualize --checkpoints r20.pth --arch resnet20 --stage 2 --out maps/ data.dataset=cifar10
  lakd visualize --checkpoints runs/lakd_r20/best.pt --indices 3,17,42 --out maps.png

One row per test image: the input, then for each model its class activation map for the true class and its
NDAM map A(F) = a*mean_c|F| + b*max_c|F| (a=1, b=2) at the chosen stage, both upsampled to the image and
min-max normalised, drawn over the image. Each row names the true label and every model's prediction.
The default images are spread over the classes (one image per class, classes evenly spaced, the first of each
class from --start on); --consecutive takes --images images in test-set order instead. The picture goes to
attention.png in the --out folder (default: visualize/ in the first checkpoint's run folder, else
./lakd-visualize/); the command prints where.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EPILOG
    parser.add_argument("--checkpoints", nargs="+", required=True, metavar="CKPT", help="model checkpoints")
    parser.add_argument("--arch", nargs="+", default=None, metavar="NAME",
                        help="model name(s) for checkpoints that do not record it: one for all or one each")
    parser.add_argument("--images", type=int, default=6,
                        help="number of test images (rows), default 6, spread over the classes")
    parser.add_argument("--start", type=int, default=0, help="test-set position to pick images from (default 0)")
    parser.add_argument("--consecutive", action="store_true",
                        help="the --images images from --start in test-set order (default: one per class)")
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
    parser.add_argument("--out", default=None, metavar="DIR|FILE.png",
                        help="output folder (the picture is DIR/attention.png) or picture file; default: "
                             "visualize/ in the first checkpoint's run folder when lakd train wrote it, else "
                             "./lakd-visualize/")
    add_progress_flag(parser)
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides for the data, e.g. data.dataset=cifar10 data.root=/data")


def _positions(args) -> list[int] | None:
    """The test-set positions named by --indices, else None (the images are then picked from --start on)."""
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
    return None


def _out_path(args, first_checkpoint: str) -> str:
    """The picture's path: --out FILE.png as given, --out DIR (or the default folder) + attention.png."""
    out = args.out or default_out_dir(first_checkpoint, "visualize")
    if out.lower().endswith(".png"):
        if os.path.isdir(out):
            raise LakdError(f"--out {out!r} is a folder; give a .png file name or a folder name without .png")
        check_out_dir(os.path.dirname(os.path.abspath(out)), "--out's folder")
        return out
    check_out_dir(out, "--out" if args.out else "--out (default)")
    return os.path.join(out, "attention.png")


def run(args) -> int:
    import torch

    from ..analysis.visualize import attention_maps, pick_images, plot_attention_grid
    from ..data import denormalize
    from ..engine.loading import load_models_and_data, unique_labels
    from ..runtime.progress import tracked

    paths, overrides = split_overrides(args.checkpoints, args.overrides)
    if args.arch:  # `--arch resnet56 data.root=...`: the key=value items are overrides
        args.arch, overrides = split_overrides(args.arch, overrides)
    if not paths:
        raise LakdError("--checkpoints needs at least one checkpoint")
    if not 0.0 <= args.alpha <= 1.0:
        raise LakdError(f"--alpha {args.alpha} must lie in 0..1")
    if args.out and os.path.splitext(args.out)[1].lower() in (".jpg", ".jpeg", ".pdf", ".svg", ".gif", ".tif"):
        raise LakdError(f"--out {args.out!r}: the picture is a PNG; give a .png file name or a folder")
    pos = _positions(args)
    out_path = _out_path(args, paths[0])
    archs = archs_for(args.arch, len(paths), "--arch")
    models, labels, _metas, bundle, cfg, device = load_models_and_data(paths, archs,
                                                                      progress_overrides(args, overrides))
    labels = unique_labels(labels, paths)
    on = progress_on(cfg)
    picks = pick_images(tracked(bundle.test, "visualize: choosing test images", on), num_classes=bundle.num_classes,
                        count=args.images, start=args.start, positions=pos,
                        spread=not args.consecutive)
    images = torch.stack([p["image"] for p in picks]).to(device)
    targets = torch.tensor([p["target"] for p in picks], device=device)
    names = list(bundle.class_names) if getattr(bundle, "class_names", None) else None

    def cname(k: int) -> str:
        return str(names[k]) if names and 0 <= k < len(names) else str(k)

    cols = []
    with torch.no_grad():
        for label, model in tracked(list(zip(labels, models)), "visualize: maps", on, unit="model"):
            maps = attention_maps(model, images, targets, stage=args.stage, ndam_avg=args.ndam_avg,
                                  ndam_max=args.ndam_max, use_abs=not args.no_abs, preact=args.preact)
            pred = maps["pred"].tolist()
            cols.append({"label": label, "stage": maps["stage"], "cam": maps["cam"].numpy(),
                         "ndam": maps["ndam"].numpy(), "pred": [cname(k) for k in pred],
                         "prob": maps["prob"].tolist(),
                         "correct": [k == t for k, t in zip(pred, targets.tolist())]})
        pics = denormalize(images, bundle.mean, bundle.std).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
    rows = [{"index": p["index"], "true": cname(p["target"])} for p in picks]
    title = f"{cfg['data']['dataset']} test images: class activation maps and NDAM maps"
    plot_attention_grid(pics, rows, cols, out_path, alpha=args.alpha, title=title)
    shown = len({p["target"] for p in picks})
    for c in cols:
        print(f"  {c['label']}: {sum(c['correct'])}/{len(picks)} shown images predicted right")
    print(f"wrote {out_path} ({len(picks)} images of {shown} classes x {len(cols)} models)")
    return 0
