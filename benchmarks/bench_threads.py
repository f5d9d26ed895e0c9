"""OpenMP's wait policy on a CPU: a training step with libgomp's default (idle threads spin at every barrier)
against ``OMP_WAIT_POLICY=PASSIVE`` (they sleep) and a short spin (``GOMP_SPINCOUNT=10000``), on an idle
machine and next to busy processes.

libgomp reads the policy once, when torch loads, so every (policy, load) cell runs in a fresh process; cells
are interleaved over rounds and each keeps its best round. ``--load 0,1`` times each policy alone and next to
one busy process (a pure-Python loop, i.e. any other job on the machine). ``lakd.runtime.threads`` chooses
the ``lakd`` command's policy from these figures.

Usage::

    python benchmarks/bench_threads.py [--model resnet20] [--batch-size 64] [--steps 10] [--rounds 3]
        [--load 0,1] [--json]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CHILD = r"""
import sys, time
import torch
sys.path.insert(0, {repo!r})
from lakd.models import create_model
torch.manual_seed(0)
m = create_model({model!r}, 10).to(memory_format=torch.channels_last)
x = torch.randn({batch}, 3, 32, 32).contiguous(memory_format=torch.channels_last)
y = torch.randint(0, 10, ({batch},))
opt = torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9)
def step():
    opt.zero_grad(set_to_none=True)
    torch.nn.functional.cross_entropy(m(x), y).backward()
    opt.step()
for _ in range(2):
    step()
t = time.perf_counter()
for _ in range({steps}):
    step()
print({steps} * {batch} / (time.perf_counter() - t))
"""


#: the cells: libgomp's default (no variable), PASSIVE (what lakd sets), and a short spin before sleeping
POLICIES = {"default": {}, "PASSIVE": {"OMP_WAIT_POLICY": "PASSIVE"}, "spin10k": {"GOMP_SPINCOUNT": "10000"}}


def cell(policy: str, load: int, args) -> float:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env.update(POLICIES[policy])
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(load)]
    try:
        time.sleep(0.5 if load else 0)
        code = CHILD.format(repo=str(REPO), model=args.model, batch=args.batch_size, steps=args.steps)
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        return float(out.stdout.strip().splitlines()[-1])
    finally:
        for p in busy:
            p.kill()
            p.wait()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="resnet20")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--load", default="0,1", help="comma-separated numbers of busy processes beside the run")
    p.add_argument("--policies", default="default,PASSIVE,spin10k", help=f"any of {', '.join(POLICIES)}; default first")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    loads = [int(x) for x in args.load.split(",")]
    policies = args.policies.split(",")
    cells = [(pol, ld) for ld in loads for pol in policies]
    runs: dict[str, list[float]] = {f"{pol}/load{ld}": [] for pol, ld in cells}
    for r in range(args.rounds):
        for pol, ld in (cells if r % 2 == 0 else cells[::-1]):
            runs[f"{pol}/load{ld}"].append(cell(pol, ld, args))
    res = {}
    for ld in loads:
        d = runs[f"default/load{ld}"]
        row = {"default_images_per_s": max(d), "default_per_round": d}
        for pol in policies[1:]:
            q = runs[f"{pol}/load{ld}"]
            ratios = sorted(b / a for a, b in zip(d, q))
            row[pol] = {"images_per_s": max(q), "per_round": q, "vs_default_best": max(q) / max(d),
                        "vs_default_per_round": [b / a for a, b in zip(d, q)],
                        "vs_default_median": ratios[len(ratios) // 2]}
        res[f"load{ld}"] = row
    info = {"model": args.model, "batch_size": args.batch_size, "cores": os.cpu_count(),
            "load_average": list(os.getloadavg()), "results": res}
    if args.json:
        print(json.dumps(info))
        return 0
    print(f"{args.model}, batch {args.batch_size}, torch's default threads, {os.cpu_count()} cores; best of "
          f"{args.rounds} interleaved rounds, a fresh process per cell")
    for k, r in res.items():
        cells = "; ".join(f"{pol} {c['images_per_s']:.0f} img/s = {c['vs_default_best']:.2f}x (median of rounds "
                          f"{c['vs_default_median']:.2f}x)" for pol, c in r.items() if isinstance(c, dict))
        print(f"{k}: default {r['default_images_per_s']:.0f} img/s; {cells}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
