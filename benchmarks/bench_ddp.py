"""Step time at world size 2 (gloo, this machine): gradient reduction overlapped with the backward passes
(``GradReducer``, the default) against one synchronous all-reduce after them (the former behaviour), timed in
the same two processes in interleaved rounds.

Usage: ``python benchmarks/bench_ddp.py [--methods kd,lakd] [--batch-size 64] [--steps 5] [--rounds 3] [--json]``
(``--batch-size`` is per process; each process uses ``--threads`` threads).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def worker(args) -> None:
    import torch
    import torch.distributed as tdist

    from lakd.analysis.cost import _batch, _setup
    from lakd.engine.step import training_step

    torch.set_num_threads(args.threads)
    tdist.init_process_group("gloo")
    rank = tdist.get_rank()
    res = {}
    for m in [x for x in args.methods.split(",") if x]:
        d, opt, params, cl = _setup(args.teacher, None, args.student, m, 10, [], torch.device("cpu"))
        batch = _batch(args.student, args.batch_size, 10, torch.device("cpu"))
        if cl:
            batch["image"] = batch["image"].contiguous(memory_format=torch.channels_last)
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        times = {True: [], False: []}
        for overlap in (True, False, True):  # warm-up (the reducer's first step records the bucket order)
            training_step(d, opt, scaler, batch, params, overlap=overlap)
        for _ in range(args.rounds):
            for overlap in (False, True):
                tdist.barrier()
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    training_step(d, opt, scaler, batch, params, overlap=overlap)
                tdist.barrier()
                times[overlap].append((time.perf_counter() - t0) / args.steps)
        res[m] = {"sync_step_s": min(times[False]), "overlap_step_s": min(times[True]),
                  "speedup": min(times[False]) / min(times[True]),
                  "per_round": [a / b for a, b in zip(times[False], times[True])]}
    if rank == 0:
        print(json.dumps(res))
    tdist.destroy_process_group()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--methods", default="kd,lakd")
    p.add_argument("--teacher", default="resnet56")
    p.add_argument("--student", default="resnet20")
    p.add_argument("--batch-size", type=int, default=64, help="per process")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", action="store_true")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen([sys.executable, __file__, "--worker", *(sys.argv[1:] if argv is None else argv)],
                                      env=env, stdout=subprocess.PIPE, text=True))
    outs = [pr.communicate()[0] for pr in procs]
    if any(pr.returncode for pr in procs):
        print("a worker failed", file=sys.stderr)
        return 1
    res = json.loads(outs[0].strip().splitlines()[-1])
    info = {"world_size": 2, "backend": "gloo", "batch_per_process": args.batch_size, "threads": args.threads,
            "load_average": list(os.getloadavg()), "results": res}
    if args.json:
        print(json.dumps(info))
        return 0
    print(f"world size 2 (gloo), batch {args.batch_size} per process, {args.threads} thread(s) each, best of "
          f"{args.rounds} interleaved rounds of {args.steps} steps; load average {info['load_average'][0]:.1f}")
    for m, r in res.items():
        print(f"{m:<8} sync {r['sync_step_s'] * 1000:.0f} ms/step  overlapped {r['overlap_step_s'] * 1000:.0f} ms/step"
              f"  speed-up {r['speedup']:.2f}x  (per round {' '.join(f'{x:.2f}' for x in r['per_round'])})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
