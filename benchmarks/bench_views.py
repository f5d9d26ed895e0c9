"""Training-loader throughput (images/s) on CIFAR-10 without and with a method's per-sample views.

Rows: the in-memory loader (``fast``) and the DataLoader path (``data.fast=false``, ``--workers`` workers), each
for a method without views (KD's batches), SSKD's three rotated copies (``sskd.views: per_sample``) and MLKD's
strong view (``mlkd.views: 2``: own crop + RandAugment + Cutout). Each row is the median of ``--repeats``
measurements of ``--images`` images after two warm-up batches; the loader only (no model).

``--lakd PATH`` imports lakd from another checkout; rows with views need a lakd that has them. ``--baseline PATH``
times, for a method without views, the training loaders of another checkout (its ``lakd/data/fast.py`` and
``lakd/data/loader.py``, loaded beside this one's on the same data, batches checked equal) interleaved with this
checkout's in one process, and prints the ratio: the before/after comparison on a busy machine.

Usage: ``python benchmarks/bench_views.py --root $DATA [--batch 128] [--lakd PATH] [--cpu-time --workers 0] [--json]``
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import inspect
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np


def measure(loader, images: int, warmup: int = 2, clock=time.perf_counter) -> float:
    seen, epoch, start = 0, 0, None
    while seen < images:
        loader.set_epoch(epoch)
        for k, batch in enumerate(loader):
            if start is None:
                if k + 1 >= warmup:
                    start = clock()
                continue
            seen += batch["image"].shape[0]
            if seen >= images:
                break
        epoch += 1
    return seen / (clock() - start)


def _module_from(checkout: str, name: str):
    """``lakd/data/<name>.py`` of another checkout as the module ``lakd.data.<name>_baseline`` (its relative
    imports resolve to this lakd's ``lakd.data`` modules)."""
    path = os.path.join(os.path.abspath(checkout), "lakd", "data", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"lakd.data.{name}_baseline", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def baseline_rows(args, build_data, cfg_for) -> list[dict]:
    """This checkout's loaders against ``args.baseline``'s for a method without views, interleaved."""
    import torch

    fast_b, loader_b = _module_from(args.baseline, "fast"), _module_from(args.baseline, "loader")
    rows = []
    for fast in (True, False):
        cur = build_data(cfg_for(fast), "cpu").train
        if fast:
            base = fast_b.FastTrainLoader(cur.images, cur.targets, global_batch=cur.global_batch, seed=cur.seed,
                                          normalizer=cur.normalizer, augment=cur.augment, rank=cur.rank,
                                          world_size=cur.world_size, max_steps=cur.max_steps)
        else:
            ds, smp = cur.loader.dataset, cur.sampler
            base = loader_b.TorchLoader(
                loader_b.ArrayDataset(ds.images, ds.targets, ds.transform),
                loader_b.TrainBatchSampler(smp.n, smp.global_batch, seed=smp.seed), cur.normalizer,
                num_workers=args.workers, persistent_workers=args.workers > 0, seed=smp.seed)
        for loader in (cur, base):
            loader.set_epoch(0)
        first = (next(iter(cur)), next(iter(base)))
        assert all(torch.equal(first[0][k], first[1][k]) for k in ("image", "target", "index")), "batches differ"
        clock = time.process_time if args.cpu_time else time.perf_counter
        runs = {"this": [], "baseline": []}
        for r in range(max(args.repeats, 1)):  # alternate which runs first
            for name in (("this", "baseline") if r % 2 == 0 else ("baseline", "this")):
                runs[name].append(measure(cur if name == "this" else base, args.images, clock=clock))
        ratios = [a / b for a, b in zip(runs["this"], runs["baseline"])]
        rows.append({"loader": f"{'fast' if fast else 'dataloader'}/none", "this": float(np.median(runs["this"])),
                     "baseline": float(np.median(runs["baseline"])), "ratio": float(np.median(ratios)),
                     "runs": {k: [round(v) for v in r] for k, r in runs.items()}})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--root", default=os.environ.get("LAKD_DATA") or "data",
                   help="folder holding cifar-10-batches-py (default: $LAKD_DATA, else ./data)")
    p.add_argument("--lakd", default=str(Path(__file__).resolve().parents[1]),
                   help="the checkout whose lakd is measured (default: this one)")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--images", type=int, default=12800, help="images timed per measurement")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers (data.fast=false rows)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the main process")
    p.add_argument("--baseline", default="", help="another checkout whose loaders (without views) to time "
                   "against this one's, interleaved in this process")
    p.add_argument("--only", default="", help="comma-separated rows to run (default: all), e.g. fast/none")
    p.add_argument("--cpu-time", action="store_true",
                   help="images per CPU second of this process (time.process_time) instead of per wall second: "
                        "steadier on a busy machine; with --workers 0 it counts all the loader's work")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    sys.path.insert(0, os.path.abspath(args.lakd))
    import torch

    import lakd
    from lakd.config import DEFAULTS
    from lakd.data import build_data

    torch.set_num_threads(args.threads)
    has_views = "views" in inspect.signature(build_data).parameters
    cases = {"none": None}
    if has_views:
        from lakd.distillers.mlkd import MLKD
        from lakd.distillers.sskd import SSKD

        cases.update(sskd=SSKD.views({}), mlkd=MLKD.views({"mlkd": {"views": 2}}))
    wanted = set(filter(None, args.only.split(",")))

    def cfg_for(fast: bool) -> dict:
        cfg = copy.deepcopy(DEFAULTS)
        cfg["solver"]["batch_size"] = args.batch
        cfg["data"].update(root=os.path.abspath(args.root), fast=fast, num_workers=args.workers,
                           persistent_workers=args.workers > 0)
        return cfg

    if args.baseline:
        rows = baseline_rows(args, build_data, cfg_for)
        info = {"baseline": os.path.abspath(args.baseline), "batch": args.batch, "threads": args.threads,
                "workers": args.workers, "clock": "process_time" if args.cpu_time else "perf_counter",
                "repeats": args.repeats, "images": args.images, "results": rows}
        if args.json:
            print(json.dumps(info, indent=1))
        else:
            for r in rows:
                print(f"{r['loader']:>16} this {r['this']:>9.0f} baseline {r['baseline']:>9.0f} "
                      f"ratio {r['ratio']:.3f} (median of {args.repeats} paired runs)")
        return 0
    rows = []
    for fast in (True, False):
        for name, views in cases.items():
            row = f"{'fast' if fast else 'dataloader'}/{name}"
            if wanted and row not in wanted:
                continue
            cfg = cfg_for(fast)
            bundle = build_data(cfg, "cpu", views=views) if views else build_data(cfg, "cpu")
            clock = time.process_time if args.cpu_time else time.perf_counter
            runs = [measure(bundle.train, args.images, clock=clock) for _ in range(max(args.repeats, 1))]
            rows.append({"loader": row, "images_per_s": float(np.median(runs)), "runs": [round(r) for r in runs]})
            del bundle
    info = {"lakd": os.path.dirname(os.path.dirname(os.path.abspath(lakd.__file__))), "batch": args.batch,
            "clock": "process_time" if args.cpu_time else "perf_counter",
            "threads": args.threads, "workers": args.workers, "cores": os.cpu_count(),
            "cpu": platform.processor() or platform.machine(), "torch": torch.__version__, "results": rows}
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    per = "CPU second of the main process" if args.cpu_time else "second"
    print(f"CIFAR-10 training loader, batch {args.batch}, {args.threads} main thread(s), {args.workers} workers "
          f"(DataLoader rows), {os.cpu_count()} cores; images per {per}, median of {args.repeats} x {args.images}")
    for r in rows:
        print(f"{r['loader']:>16} {r['images_per_s']:>9.0f}   runs {r['runs']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
