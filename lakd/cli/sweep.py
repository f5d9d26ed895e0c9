"""``lakd sweep SPEC.yaml``: a grid of configs x overrides x seeds, resumable (see ``lakd/sweep/``)."""
from __future__ import annotations

import argparse
import shlex
import sys

HELP = "run a sweep (configs x overrides x seeds) several runs at a time; skips finished runs, resumes the rest"

EPILOG = """\
examples:
  lakd sweep sweeps/cifar10_seeds.yaml                              # run (or continue) the whole sweep
  lakd sweep SPEC --processes 2 --threads 1 --runs-dir /scratch/runs --results results/my_sweep
  lakd sweep SPEC --per-device 2                  # two runs at a time per device (CPU: half the cores each)
  lakd sweep SPEC --dry-run > commands.txt        # one `lakd train` command per unfinished run, e.g. for
                                                  # a Slurm job array: sed -n "${SLURM_ARRAY_TASK_ID}p" commands.txt | sh
  lakd sweep SPEC --status                        # what is finished, interrupted, not started
  lakd sweep SPEC --only catkd-s2,lakd_149,table5  # these first, in this order (a group's runs in plan order)

The same command continues a sweep after a kill, on another day or another machine: runs whose summary.json
is in the results folder are skipped; runs with a last.pt in their run folder resume from it.
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.epilog = EPILOG
    p.add_argument("spec", help="sweep spec (YAML; see configs/sweeps/)")
    p.add_argument("--runs-dir", help="run folders go here (default: the spec's runs_dir)")
    p.add_argument("--results", help="results folder (default: the spec's results_dir)")
    p.add_argument("--processes", type=int, help="CPU: runs at a time (default: the spec's processes)")
    p.add_argument("--threads", type=int, help="CPU: threads per run (default: the spec's threads)")
    p.add_argument("--runs-per-gpu", type=int, help="CUDA: runs at a time per visible GPU")
    p.add_argument("--per-device", type=int, metavar="N",
                   help="N runs at a time per device: on a CPU with the cores divided among them (train.threads = "
                        "cores // N; replaces --processes/--threads), on CUDA sharing each GPU (= --runs-per-gpu N)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="auto: one slot set per visible GPU when there is one, else CPU processes")
    p.add_argument("--only", default="",
                   help="comma-separated run names (or group names) to run, in this order: free slots take them "
                        "first to last (a group's runs in plan order)")
    p.add_argument("--dry-run", action="store_true",
                   help="print each unfinished run's command, one per line, and exit")
    p.add_argument("--status", action="store_true", help="print each run's state and exit")


def run(args) -> int:
    from ..errors import LakdError
    from ..sweep import SweepRunner, has_checkpoint, is_finished, load_plan, pack, run_command

    plan = load_plan(args.spec, runs_dir=args.runs_dir, results_dir=args.results, processes=args.processes,
                     threads=args.threads, runs_per_gpu=args.runs_per_gpu)
    if args.only:
        keep = [n for n in args.only.replace(" ", "").split(",") if n]
        names = {r.name for r in plan.runs} | {r.group for r in plan.runs}
        unknown = set(keep) - names
        if unknown:
            raise LakdError(f"--only names unknown run(s)/group(s) {', '.join(sorted(unknown))}; "
                            f"`lakd sweep {args.spec} --status` lists them")
        plan.select(keep)
    if args.per_device is not None:
        pack(plan, args.per_device, gpu=SweepRunner.gpus_for(args.device) != [])
    if args.dry_run:
        bad = plan.refused_left(lambda r: is_finished(plan, r))
        if bad is not None:
            raise bad
        n = 0
        for r in plan.unique():
            if not is_finished(plan, r):
                print(shlex.join(run_command(plan, r, python="python", resume=has_checkpoint(plan, r))))
                n += 1
        print(f"{n} of {len(plan.unique())} runs left", file=sys.stderr)
        return 0
    if args.status:
        from ..sweep import merge_plan, read_plan

        merge_plan(plan, read_plan(plan.results_dir), lambda r: is_finished(plan, r))  # shown, not written
        for r in plan.runs:
            state = ("outside the current spec (finished earlier)" if r.outside
                     else f"same as {r.same_as}" if r.same_as
                     else (f"finished; its config is refused now ({r.refused})" if is_finished(plan, r)
                           else f"refused: {r.refused}") if r.refused
                     else f"skipped ({r.skip})" + (", finished earlier" if is_finished(plan, r) else "") if r.skip
                     else "finished" if is_finished(plan, r)
                     else "interrupted (resumes from last.pt)" if has_checkpoint(plan, r) else "not started")
            print(f"{r.group:<10} {r.name:<32} {state}")
        return 0
    return SweepRunner(plan, device=args.device, say=lambda s: print(s, flush=True)).run()
