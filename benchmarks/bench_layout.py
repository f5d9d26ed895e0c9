"""CPU training speed per model family: memory format (contiguous vs channels_last), optionally bf16 autocast
and torch.compile, measured as interleaved ratios in one process.

What ``train.channels_last: auto`` decides on a CPU comes from this script: each family's class declares
``CHANNELS_LAST_CPU`` (``lakd/models``) from the ratios it prints. One training step = forward, cross-entropy,
backward, SGD step of a student alone (the layout's effect on distillation follows the student's and teacher's
own families).

Usage::

    python benchmarks/bench_layout.py [--models resnet20,resnet8x4,wrn_16_2,vgg8,mobilenetv2,shufflev1,shufflev2]
        [--batch-size 64] [--steps 5] [--rounds 3] [--bf16] [--compile] [--json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lakd.models import FAMILY, create_model  # noqa: E402


def make_step(model, batch: int, size: int, channels_last: bool, amp: bool):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, size, size, generator=g).contiguous(memory_format=fmt)
    y = torch.randint(0, 10, (batch,), generator=g)

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()

    return step


def timed(step, steps: int) -> float:
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return time.perf_counter() - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="resnet20,resnet8x4,wrn_16_2,vgg8,mobilenetv2,shufflev1,shufflev2")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--bf16", action="store_true", help="also time bf16 autocast on channels_last")
    p.add_argument("--compile", action="store_true",
                   help="also time torch.compile (channels_last): compile time and the steps it takes to pay off")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    out = {}
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        size = 224 if FAMILY.get(name) == "imagenet" else 32
        torch.manual_seed(0)
        base = create_model(name, 10)
        variants = {"contiguous": make_step(base, args.batch_size, size, False, False)}
        variants["channels_last"] = make_step(_copy(base), args.batch_size, size, True, False)
        if args.bf16:
            variants["channels_last_bf16"] = make_step(_copy(base), args.batch_size, size, True, True)
        compile_s = None
        if args.compile:
            m = _copy(base)
            m.compile()
            step = make_step(m, args.batch_size, size, True, False)
            t0 = time.perf_counter()
            step()  # the first call compiles
            compile_s = time.perf_counter() - t0
            variants["channels_last_compiled"] = step
        for step in variants.values():
            step()  # warm-up
        times = {k: [] for k in variants}
        for _ in range(max(args.rounds, 1)):
            for k, step in variants.items():
                times[k].append(timed(step, args.steps) / args.steps)
        best = {k: min(v) for k, v in times.items()}
        row = {"family": type(base).__name__,
               "images_per_s": {k: args.batch_size / v for k, v in best.items()},
               "speedup_vs_contiguous": {k: best["contiguous"] / v for k, v in best.items()},
               "channels_last_ratio_per_round": [a / b for a, b in zip(times["contiguous"], times["channels_last"])]}
        if compile_s is not None:
            saved = best["channels_last"] - best["channels_last_compiled"]
            row["compile_s"] = compile_s
            row["compile_break_even_steps"] = (compile_s / saved) if saved > 0 else None
        out[name] = row
    info = {"batch_size": args.batch_size, "threads": torch.get_num_threads(), "load_average": list(os.getloadavg()),
            "torch": torch.__version__, "results": out}
    if args.json:
        print(json.dumps(info))
        return 0
    print(f"CPU, {torch.get_num_threads()} threads, batch {args.batch_size}, best of {args.rounds} interleaved rounds "
          f"of {args.steps} steps, load average {info['load_average'][0]:.1f}; speed-up vs contiguous fp32")
    for name, r in out.items():
        cells = " ".join(f"{k} {v:.2f}x" for k, v in r["speedup_vs_contiguous"].items() if k != "contiguous")
        rounds = " ".join(f"{x:.2f}" for x in r["channels_last_ratio_per_round"])
        extra = (f" | compile {r['compile_s']:.0f}s, pays off after {r['compile_break_even_steps']:.0f} steps"
                 if r.get("compile_break_even_steps") else (" | compile: no gain" if "compile_s" in r else ""))
        print(f"{name:<12} {r['family']:<18} {r['images_per_s']['contiguous']:>7.0f} img/s  {cells} "
              f"(channels_last per round: {rounds}){extra}")
    return 0


def _copy(model):
    import copy

    return copy.deepcopy(model)


if __name__ == "__main__":
    raise SystemExit(main())
