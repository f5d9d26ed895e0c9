"""Training-loader throughput (images/s) on CIFAR-10 without and with a method's per-sample views.

Rows: the in-memory loader (``fast``) and the DataLoader path (``data.fast=false``, ``--workers`` workers), each
for a method without views (KD's batches), SSKD's three rotated copies (``sskd.views: per_sample``) and MLKD's
strong view (``mlkd.views: 2``: own crop + RandAugment + Cutout). Each row is the median of ``--repeats``
measurements of ``--images`` images after two warm-up batches; the loader only (no model).

``--lakd PATH`` imports lakd from another checkout (e.g. one without per-sample views, to compare the loader of a
method without views before and after); rows with views need a lakd that has them.

Usage: ``python benchmarks/bench_views.py --root $DATA [--batch 128] [--lakd PATH] [--json]``
"""
from __future__ import annotations

import argparse
import copy
import inspect
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np


def measure(loader, images: int, warmup: int = 2) -> float:
    seen, epoch, start = 0, 0, None
    while seen < images:
        loader.set_epoch(epoch)
        for k, batch in enumerate(loader):
            if start is None:
                if k + 1 >= warmup:
                    start = time.perf_counter()
                continue
            seen += batch["image"].shape[0]
            if seen >= images:
                break
        epoch += 1
    return seen / (time.perf_counter() - start)


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
    p.add_argument("--only", default="", help="comma-separated rows to run (default: all), e.g. fast/none")
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
    rows = []
    for fast in (True, False):
        for name, views in cases.items():
            row = f"{'fast' if fast else 'dataloader'}/{name}"
            if wanted and row not in wanted:
                continue
            cfg = copy.deepcopy(DEFAULTS)
            cfg["solver"]["batch_size"] = args.batch
            cfg["data"].update(root=os.path.abspath(args.root), fast=fast, num_workers=args.workers,
                               persistent_workers=args.workers > 0)
            bundle = build_data(cfg, "cpu", views=views) if views else build_data(cfg, "cpu")
            runs = [measure(bundle.train, args.images) for _ in range(max(args.repeats, 1))]
            rows.append({"loader": row, "images_per_s": float(np.median(runs)), "runs": [round(r) for r in runs]})
            del bundle
    info = {"lakd": os.path.dirname(os.path.dirname(os.path.abspath(lakd.__file__))), "batch": args.batch,
            "threads": args.threads, "workers": args.workers, "cores": os.cpu_count(),
            "cpu": platform.processor() or platform.machine(), "torch": torch.__version__, "results": rows}
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    print(f"CIFAR-10 training loader, batch {args.batch}, {args.threads} main thread(s), {args.workers} workers "
          f"(DataLoader rows), {os.cpu_count()} cores; images/s, median of {args.repeats} x {args.images}")
    for r in rows:
        print(f"{r['loader']:>16} {r['images_per_s']:>9.0f}   runs {r['runs']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
