"""A frozen teacher's forward as loaded, with its BatchNorms folded (``train.fold_teacher_bn``), and optionally
folded and compiled per block with inductor's freezing (constant weights, prepacked kernels).

Timed in interleaved rounds in one process, as CPU time per forward (``time.process_time``, 1 thread by
default: the cost of the kernels, little moved by other work on the machine), with the features a distiller
asks for (``features=True``); the compile's wall time is reported separately (cold unless the inductor cache
``TORCHINDUCTOR_CACHE_DIR`` already holds it).

Usage::

    python benchmarks/bench_fold.py [--models resnet56,wrn_40_2,vgg13,resnet32x4] [--batch-size 64]
        [--rounds 5] [--iters 8] [--threads 1] [--compile] [--json]
"""
from __future__ import annotations

import argparse
import copy
import importlib
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lakd.models import create_model  # noqa: E402
from lakd.models.fold import fold_batchnorm  # noqa: E402


def _cpu_ms(model, x, iters: int) -> float:
    t0 = time.process_time()
    for _ in range(iters):
        model(x, features=True)
    return (time.process_time() - t0) / iters * 1000


def _kd_step_ms(student, teacher, opt, x, y, iters: int) -> float:
    """CPU time of one KD training step (the teacher's forward under no_grad, the student's forward, backward and
    SGD step; 0.1 CE + 0.9 KL at T=4)."""
    t0 = time.process_time()
    for _ in range(iters):
        with torch.no_grad():
            zt = teacher(x)
        z = student(x)
        loss = 0.1 * F.cross_entropy(z, y) + 0.9 * 16 * F.kl_div(F.log_softmax(z / 4, 1), F.softmax(zt / 4, 1),
                                                                  reduction="batchmean")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return (time.process_time() - t0) / iters * 1000


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="resnet56,wrn_40_2,vgg13,resnet32x4")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--iters", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--compile", action="store_true", help="also time the folded teacher compiled per block")
    p.add_argument("--student", default="resnet20", help="the student of the KD step timed with the first model")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = {}
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        plain = create_model(name, num_classes=100).eval()
        for q in plain.parameters():
            q.requires_grad_(False)
        folded = copy.deepcopy(plain)
        n = fold_batchnorm(folded, torch.zeros(2, 3, 32, 32))
        sides = {"as loaded": plain, "folded": folded}
        row = {"folded_bn": n, "compile_s": None}
        if args.compile:
            dynamo = importlib.import_module("torch._dynamo")
            dynamo.config.recompile_limit = max(dynamo.config.recompile_limit, 256)
            compiled = copy.deepcopy(folded)
            for i in range(compiled.num_blocks):
                for m in compiled.block_modules(i):
                    m.compile(options={"freezing": True})
            sides["folded + compiled"] = compiled
        for m in sides.values():
            m.to(memory_format=torch.channels_last)
        x = torch.randn(args.batch_size, 3, 32, 32).contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            for label, m in sides.items():
                t0 = time.perf_counter()
                m(x, features=True)
                if label == "folded + compiled":
                    row["compile_s"] = time.perf_counter() - t0
            times = {label: [] for label in sides}
            for _ in range(args.rounds):
                for label, m in sides.items():
                    times[label].append(_cpu_ms(m, x, args.iters))
        base = min(times["as loaded"])
        row.update({f"{k} ms": min(v) for k, v in times.items()})
        row.update({f"{k} speed-up": base / min(v) for k, v in times.items() if k != "as loaded"})
        if not out:  # the first model also as the teacher of a whole KD step (what a user pays per step)
            student = create_model(args.student, num_classes=100).to(memory_format=torch.channels_last)
            opt = torch.optim.SGD(student.parameters(), lr=0.01, momentum=0.9)
            y = torch.randint(0, 100, (args.batch_size,))
            steps = {"as loaded": [], "folded": []}
            for _ in range(args.rounds):
                for label in steps:
                    steps[label].append(_kd_step_ms(student, sides[label], opt, x, y, max(args.iters // 2, 1)))
            row["kd_step"] = {"student": args.student, "as loaded ms": min(steps["as loaded"]),
                              "folded ms": min(steps["folded"]),
                              "speed-up": min(steps["as loaded"]) / min(steps["folded"])}
        out[name] = row
    if args.json:
        print(json.dumps({"batch_size": args.batch_size, "threads": args.threads, "torch": torch.__version__,
                          "results": out}))
        return 0
    for name, row in out.items():
        parts = [f"{k} {v:.1f}" + ("" if k.endswith("ms") else "x") for k, v in row.items()
                 if isinstance(v, float) and k != "compile_s"]
        extra = f", compile {row['compile_s']:.0f} s" if row["compile_s"] is not None else ""
        print(f"{name}: {row['folded_bn']} BatchNorms folded; " + ", ".join(parts) + extra)
        if "kd_step" in row:
            k = row["kd_step"]
            print(f"  KD step {name} -> {k['student']}: as loaded {k['as loaded ms']:.1f} ms, folded "
                  f"{k['folded ms']:.1f} ms ({k['speed-up']:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
