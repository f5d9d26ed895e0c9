"""``lakd bench memory|speed``: what a training step costs per method, measured in one run; ``lakd bench
gradients``: how hard each loss term of a config pulls on a fresh student (the scale check before a long run)."""
from __future__ import annotations

import argparse
import json

HELP = ("measure peak memory at the allocator (bench memory) or training images/s (bench speed) per method, in one "
        "run; or each loss term's gradient on a fresh student (bench gradients)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    # no method list here: building it imports every method (and torch), which `lakd --help` must not
    sub = p.add_subparsers(dest="what", metavar="WHAT", required=True)
    for what in ("memory", "speed"):
        q = sub.add_parser(what, help=f"{what} per method")
        q.add_argument("--teacher", default="resnet56", help="teacher model, optionally MODEL=CHECKPOINT")
        q.add_argument("--student", default="resnet20")
        q.add_argument("--methods", default=None,
                       help="comma-separated methods or variants (`lakd methods` lists them, variants such as "
                            "lakd_joint included); default: the methods of the paper's Table 4")
        q.add_argument("--batch-size", type=int, default=64)
        q.add_argument("--image-size", type=int, default=None,
                       help="input size (default 32; 224 for ImageNet models and torchvision:/timm: names)")
        q.add_argument("--num-classes", type=int, default=100)
        q.add_argument("--device", default="auto")
        q.add_argument("--amp", default="none", choices=["none", "bf16", "fp16"])
        q.add_argument("--json", action="store_true", help="print one JSON object")
        q.add_argument("--no-progress", action="store_true",
                       help="no progress bar (same as train.progress=false; there is none when stderr is not a "
                            "terminal)")
        q.add_argument("overrides", nargs="*", help="config overrides for the methods, e.g. sdm.splits=[1,4,9]")
        if what == "speed":
            q.add_argument("--steps", type=int, default=10, help="timed steps per method and round")
            q.add_argument("--warmup", type=int, default=2)
            q.add_argument("--rounds", type=int, default=1, help="interleaved timing rounds (best kept)")
        q.add_argument("--channels-last", action="store_true")
        if what == "memory":
            q.add_argument("--same-process", action="store_true",
                           help="measure every method in this process (quicker smoke test; the published figures "
                                "use a fresh process per method, the default)")
    g = sub.add_parser("gradients", help="each loss term's gradient norm on the fresh student of a config",
                       description="The norm of the gradient of each of the config's losses (as weighted in the run) "
                                   "and of their sum over the student's parameters, at the seed's fresh student, "
                                   "averaged over the first training batches (the student is not stepped). A term "
                                   "many times KD's or cross-entropy's at the start is a weight set for another "
                                   "data set.")
    g.add_argument("config", help="YAML config file or a shipped config's name (`lakd configs`); or, as for `lakd "
                                  "train`, a first key=value with no file")
    g.add_argument("overrides", nargs="*", help="config overrides, e.g. data.root=$DATA teacher.checkpoint=$TEACHER")
    g.add_argument("--batches", type=int, default=4, help="training batches to average over (default 4)")
    g.add_argument("--against", default=None, metavar="METHOD",
                   help="also measure METHOD (e.g. kd) on the same config (data, models, teacher, seed) and print "
                        "each figure's ratio to its total")
    g.add_argument("--device", default="cpu", help="cpu (default), cuda, or auto")
    g.add_argument("--json", action="store_true", help="print one JSON object")


def _gradients(args) -> int:
    from ..analysis.gradients import TOTAL, start_gradients
    from ..config import load_config
    from ..distillers import resolve_method
    from ..errors import LakdError
    from ..runtime.device import resolve_device
    from .common import config_and_overrides

    if args.batches < 1:
        raise LakdError(f"--batches {args.batches}: average over at least one training batch (e.g. --batches 4)")
    # a method or a variant (kd_ls: kd with its overrides); an unknown one is refused before any measuring
    against = resolve_method(args.against) if args.against else None
    device = str(resolve_device(args.device))
    config, over = config_and_overrides(args.config, args.overrides + ["train.progress=false"])
    cfg = load_config(config, over)
    out = {"config": args.config, "overrides": list(args.overrides), "method": cfg["method"], "device": device,
           "batches": args.batches, "gradients": start_gradients(cfg, args.batches, device)}
    if against:
        ref_cfg = load_config(config, over + [f"method={against[0]}", *against[1]])
        out["against"] = {"method": args.against, "gradients": start_gradients(ref_cfg, args.batches, device)}
    if args.json:
        print(json.dumps(out))
        return 0
    print(f"gradient norm of each loss on the fresh student ({cfg['method']}, seed {cfg['seed']}, mean of the first "
          f"{args.batches} training batch(es) of {cfg['solver']['batch_size']}, {device})")
    rows = [(cfg["method"], out["gradients"])]
    ref_total = None
    if against:
        rows.append((args.against, out["against"]["gradients"]))
        ref_total = out["against"]["gradients"][TOTAL]
    print(f"  {'method':<12} {'loss':<14} {'grad norm':>10}" + (f" {'vs ' + args.against + ' total':>14}" if against else ""))
    for method, grads in rows:
        for name, v in grads.items():
            ratio = "" if ref_total is None else f" {f'{v / ref_total:.2f}x' if ref_total > 0 else 'n/a':>14}"
            print(f"  {method:<12} {name:<14} {v:>10.3f}{ratio}")
    return 0


def run(args) -> int:
    if args.what == "gradients":
        return _gradients(args)
    from ..analysis.cost import measure_memory, measure_speed
    from ..config import load_config
    from ..distillers import bench_default_methods, resolve_method
    from ..errors import LakdError
    from ..runtime.device import AMP_DTYPES, resolve_device

    teacher, _, ckpt = args.teacher.partition("=")
    methods = [m.strip() for m in (args.methods or ",".join(bench_default_methods())).split(",") if m.strip()]
    for m in methods:
        resolve_method(m)  # clear error for an unknown method or variant
    if args.batch_size < 1:
        raise LakdError(f"--batch-size {args.batch_size}: must be a positive number of images")
    if args.num_classes < 2:
        raise LakdError(f"--num-classes {args.num_classes}: a classifier needs at least 2 classes")
    if args.what == "speed":
        if args.steps < 1:
            raise LakdError(f"--steps {args.steps}: time at least one step (e.g. --steps 10)")
        if args.warmup < 0 or args.rounds < 1:
            raise LakdError(f"--warmup {args.warmup} / --rounds {args.rounds}: use --warmup >= 0 and --rounds >= 1")
    device = str(resolve_device(args.device))
    # the progress switch of training (train.progress among the overrides, or --no-progress)
    progress = not args.no_progress and bool(load_config(None, list(args.overrides))["train"]["progress"])
    common = dict(progress=progress, teacher=teacher, student=args.student, methods=methods, batch_size=args.batch_size,
                  teacher_ckpt=ckpt or None, num_classes=args.num_classes, device=device,
                  overrides=args.overrides, amp_dtype=AMP_DTYPES[args.amp], image_size=args.image_size)
    if args.what == "memory":
        out = measure_memory(channels_last=args.channels_last, isolated=not args.same_process, **common)
        key, unit = "peak_bytes", "MiB"
    else:
        out = measure_speed(steps=args.steps, warmup=args.warmup, rounds=args.rounds,
                            channels_last=args.channels_last, **common)
        key, unit = "images_per_s", "img/s"
    if args.json:
        print(json.dumps(out))
        return 0
    size = f", {args.image_size}px" if args.image_size else ""
    print(f"{args.what}: {teacher} -> {args.student}, batch {args.batch_size}{size}, {out['device']}"
          + (f"\n  measure: {out['measure']}" if "measure" in out else ""))
    if args.what == "memory":
        cols = [("peak_bytes", "ratio_to_scratch", "allocator peak")]
        res = out["results"].values()
        if any("rss_peak_bytes" in r for r in res):
            cols.append(("rss_peak_bytes", "rss_peak_ratio_to_scratch", "peak RSS (check)"))
        cols.append(("saved_bytes", "saved_ratio_to_scratch", "saved-for-backward"))
        print(f"{'method':<12}" + "".join(f" {title + ' MiB':>22} {'vs scratch':>10}" for _, _, title in cols))
        for m, r in out["results"].items():
            cells = []
            for key, rk, _ in cols:
                v, ratio = r.get(key), r.get(rk)
                cells.append(f" {'' if v is None else f'{v / 2**20:.1f}':>22} "
                             f"{'' if ratio is None else f'{ratio:.3f}':>10}")
            print(f"{m:<12}" + "".join(cells))
        return 0
    print(f"{'method':<12} {unit:>12} {'vs scratch':>11}")
    for m, r in out["results"].items():
        ratio = "" if r["ratio_to_scratch"] is None else f"{r['ratio_to_scratch']:.3f}"
        print(f"{m:<12} {r[key]:>12.1f} {ratio:>11}")
    return 0
