"""Step time at world size 2 (gloo, this machine): the trainer's reduction (PyTorch's DistributedDataParallel, one
instance per backward pass: ``lakd.engine.step.prepare_distributed``) against one synchronous all-reduce of all
gradients after the passes (flatten, all-reduce, divide, copy back: the plain reduction, written here as the
baseline), timed in the same two processes in interleaved rounds.

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
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    from lakd.analysis.cost import _batch, _setup
    from lakd.engine.step import prepare_distributed, training_step

    def sync_reduce(params):  # the baseline: every gradient at once, after all backward passes
        grads = [p.grad for p in params if p.grad is not None]
        flat = _flatten_dense_tensors(grads)
        tdist.all_reduce(flat)
        flat /= tdist.get_world_size()
        for g, r in zip(grads, _unflatten_dense_tensors(flat, grads)):
            g.copy_(r)

    class SyncOptimizer:  # reduce, then step: what training_step's optimizer.step() runs in the baseline
        def __init__(self, opt, params):
            self.opt, self.params = opt, params

        def zero_grad(self, set_to_none=True):
            self.opt.zero_grad(set_to_none=set_to_none)

        def step(self):
            sync_reduce(self.params)
            self.opt.step()

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
        wrappers = prepare_distributed(d, torch.device("cpu"))
        sync_opt = SyncOptimizer(opt, params)

        def step(mode, d=d, opt=opt, sync_opt=sync_opt, scaler=scaler, batch=batch, params=params,
                 wrappers=wrappers):
            if mode == "ddp":
                d.use_group_wrappers(wrappers)
                training_step(d, opt, scaler, batch)
            else:  # no DDP forward: its hooks stay idle, the baseline reduces in its optimizer step
                d.use_group_wrappers(None)
                training_step(d, sync_opt, scaler, batch)

        times = {"ddp": [], "sync": []}
        for mode in ("ddp", "sync", "ddp"):  # warm-up (DDP rebuilds its buckets after its first step)
            step(mode)
        for _ in range(args.rounds):
            for mode in ("sync", "ddp"):
                tdist.barrier()
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    step(mode)
                tdist.barrier()
                times[mode].append((time.perf_counter() - t0) / args.steps)
        res[m] = {"sync_step_s": min(times["sync"]), "ddp_step_s": min(times["ddp"]),
                  "ddp_groups": len(wrappers), "speedup": min(times["sync"]) / min(times["ddp"]),
                  "per_round": [a / b for a, b in zip(times["sync"], times["ddp"])]}
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
        print(f"{m:<8} sync {r['sync_step_s'] * 1000:.0f} ms/step  DDP x{r['ddp_groups']} {r['ddp_step_s'] * 1000:.0f} ms/step"
              f"  speed-up {r['speedup']:.2f}x  (per round {' '.join(f'{x:.2f}' for x in r['per_round'])})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
