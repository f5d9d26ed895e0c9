"""Input-pipeline throughput on CIFAR-10: the in-memory fast path vs torchvision's DataLoader pipeline.

All pipelines produce the same thing -- shuffled batches, random crop 32 (zero padding 4) + horizontal flip,
normalised float32 NCHW:

- ``lakd fast``: ``lakd.data`` fast path (uint8 dataset in memory, batched gather/augment/normalise);
- ``lakd DataLoader``: ``lakd.data`` with ``data.fast=false`` (tensor transforms in workers, uint8 batches,
  normalisation after collation);
- ``torchvision``: the classic recipe, as ``torchvision.datasets.CIFAR10`` does it (``Image.fromarray`` per
  sample, RandomCrop, RandomHorizontalFlip, ToTensor, Normalize in ``--workers`` DataLoader workers).

Usage: ``python benchmarks/bench_data.py [--root DATA] [--batch-sizes 64 256] [--json]``
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pil_cifar import TorchvisionCIFAR  # noqa: E402  (benchmarks/)

from lakd.config import DEFAULTS  # noqa: E402
from lakd.data import build_data  # noqa: E402

MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)


def torchvision_loader(bundle, batch: int, workers: int):
    from torchvision import transforms as T

    loader = bundle.train
    images = loader.images.permute(0, 2, 3, 1).contiguous().cpu().numpy()
    targets = loader.targets.cpu().tolist()
    tf = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(MEAN, STD)])
    return DataLoader(TorchvisionCIFAR(images, targets, tf), batch_size=batch, shuffle=True, num_workers=workers,
                      persistent_workers=workers > 0, prefetch_factor=4 if workers > 0 else None)


def to_device(it, device):
    """Move torchvision's CPU batches to the training device (what a training loop would do)."""
    for images, targets in it:
        yield images.to(device, non_blocking=True), targets.to(device, non_blocking=True)


def measure(make_iter, images: int, warmup: int = 2) -> float:
    """Images/s over about ``images`` images after ``warmup`` batches (worker start-up excluded)."""
    seen, epoch, start = 0, 0, None
    while seen < images:
        for k, batch in enumerate(make_iter(epoch)):
            if start is None:
                if k + 1 >= warmup:
                    start = time.perf_counter()
                continue
            seen += (batch["image"] if isinstance(batch, dict) else batch[0]).shape[0]
            if seen >= images:
                break
        epoch += 1
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return seen / (time.perf_counter() - start)


def median_of(repeats: int, make_iter, images: int) -> float:
    return float(np.median([measure(make_iter, images) for _ in range(max(repeats, 1))]))


def cfg_for(root: str, batch: int, fast: bool, workers: int) -> dict:
    cfg = copy.deepcopy(DEFAULTS)
    cfg["data"].update(root=root, fast=fast, num_workers=workers, persistent_workers=workers > 0)
    cfg["solver"]["batch_size"] = batch
    return cfg


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--root", default=os.environ.get("LAKD_DATA") or "data",
                   help="folder holding cifar-10-batches-py (default: $LAKD_DATA, else ./data)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 256])
    p.add_argument("--images", type=int, default=12800, help="images timed per measurement")
    p.add_argument("--repeats", type=int, default=3, help="measurements per pipeline (the median is shown)")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers of the DataLoader pipelines")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the main process (fast path)")
    p.add_argument("--device", default="cpu", help="where the batches are needed: cpu or cuda")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    root = os.path.abspath(args.root)

    rows = []
    for batch in args.batch_sizes:
        fast = build_data(cfg_for(root, batch, True, args.workers), device)
        slow = build_data(cfg_for(root, batch, False, args.workers), device)

        def run_fast(e, loader=fast.train):
            loader.set_epoch(e)
            return iter(loader)

        def run_slow(e, loader=slow.train):
            loader.set_epoch(e)
            return iter(loader)

        tv = torchvision_loader(fast, batch, args.workers)
        result = {"batch": batch,
                  "torchvision": median_of(args.repeats, lambda e, tv=tv: to_device(iter(tv), device), args.images),
                  "lakd_dataloader": median_of(args.repeats, run_slow, args.images),
                  "lakd_fast": median_of(args.repeats, run_fast, args.images)}
        result["speedup_fast_vs_torchvision"] = result["lakd_fast"] / result["torchvision"]
        rows.append(result)
        del tv, slow

    info = {"device": str(device), "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "threads": args.threads, "workers": args.workers, "images_timed": args.images,
            "repeats": args.repeats,
            "torch": torch.__version__, "results": rows}
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    print(f"CIFAR-10 train pipeline (crop 32 pad 4 + flip + normalise), {device}, {os.cpu_count()} cores, "
          f"{args.threads} main thread(s), {args.workers} DataLoader workers; images/s "
          f"(median of {args.repeats} x {args.images} images)")
    print(f"{'batch':>6} {'torchvision':>12} {'lakd DataLoader':>16} {'lakd fast':>11} {'fast/torchvision':>17}")
    for r in rows:
        print(f"{r['batch']:>6} {r['torchvision']:>12.0f} {r['lakd_dataloader']:>16.0f} {r['lakd_fast']:>11.0f} "
              f"{r['speedup_fast_vs_torchvision']:>16.1f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
