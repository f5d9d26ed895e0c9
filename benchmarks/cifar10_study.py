"""A reduced-budget CIFAR-10 study with the shared resnet56 teacher: every method, then the report, the
pictures and the cost benchmarks, all produced by the `lakd` commands.

    python benchmarks/cifar10_study.py                       # the committed study (about 90 min on 2 cores)
    python benchmarks/cifar10_study.py --epochs 1 --train-subset 2000 --out /tmp/smoke   # a smoke run

Every method runs the same shipped config family (configs/cifar10/...) with the same overrides: the paper's
recipe (SGD Nesterov, lr 0.05 with linear decay, batch 64, wd 5e-4) but only ``--epochs`` epochs. Runs go to
``--runs`` (checkpoints; not committed); tables, JSON and pictures to ``--out``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# this machine's CIFAR-10 copy and resnet56 teacher (mdistiller's layout): $LAKD_SHARED, else ../shared
SHARED = os.environ.get("LAKD_SHARED") or os.path.join(ROOT, "..", "shared")
TEACHER = os.path.join(SHARED, "teachers", "cifar10_resnet56.pth")
DATA = os.path.join(SHARED, "data")

RUNS = [  # name, config
    ("scratch", "configs/cifar10/scratch/resnet20_paper.yaml"),
    ("kd", "configs/cifar10/kd/resnet56_resnet20.yaml"),
    ("fitnet", "configs/cifar10/fitnet/resnet56_resnet20.yaml"),
    ("at", "configs/cifar10/at/resnet56_resnet20.yaml"),
    ("catkd", "configs/cifar10/catkd/resnet56_resnet20.yaml"),
    ("lakd_369", "configs/cifar10/lakd/resnet56_resnet20_369.yaml"),
    ("lakd_149", "configs/cifar10/lakd/resnet56_resnet20_149.yaml"),
]


def lakd_cmd(*args) -> list[str]:
    return [sys.executable, "-m", "lakd", *args]


def sh(cmd: list[str], log: str | None = None) -> None:
    print("$ " + " ".join(cmd), flush=True)
    with open(log, "w") if log else open(os.devnull, "w") as f:
        res = subprocess.run(cmd, cwd=ROOT, stdout=f if log else None, stderr=subprocess.STDOUT if log else None)
    if res.returncode != 0:
        raise SystemExit(f"command failed ({res.returncode}): {' '.join(cmd)}" + (f"; see {log}" if log else ""))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--train-subset", type=int, default=0, help="0: all 50,000 training images")
    ap.add_argument("--test-subset", type=int, default=0, help="0: all 10,000 test images")
    ap.add_argument("--parallel", type=int, default=2, help="runs at a time (each with --threads threads)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--runs", default="runs/cifar10_study")
    ap.add_argument("--out", default="results/cifar10_study")
    ap.add_argument("--only", default="", help="comma-separated subset of run names")
    ap.add_argument("--skip-train", action="store_true", help="only redo the report, pictures and benchmarks")
    args = ap.parse_args()
    os.makedirs(os.path.join(ROOT, args.out), exist_ok=True)
    os.makedirs(os.path.join(ROOT, args.runs), exist_ok=True)
    runs = [r for r in RUNS if not args.only or r[0] in args.only.split(",")]
    common = [f"solver.epochs={args.epochs}", f"data.train_subset={args.train_subset}",
              f"data.test_subset={args.test_subset}", f"seed={args.seed}",
              f"train.threads={args.threads}", "train.progress=false", "data.num_workers=0", f"data.root={DATA}",
              f"teacher.checkpoint={TEACHER}"]
    t0 = time.time()
    commands = []
    if not args.skip_train:
        pending = list(runs)
        active: list[tuple[str, subprocess.Popen, float]] = []
        durations = {}
        while pending or active:
            while pending and len(active) < args.parallel:
                name, config = pending.pop(0)
                run_dir = os.path.join(args.runs, name)
                cmd = lakd_cmd("train", config, *common, f"experiment={name}", "--run-dir", run_dir)
                commands.append(" ".join(cmd[1:]).replace(sys.executable, "python"))
                print("$ " + " ".join(cmd[2:]), flush=True)
                log = open(os.path.join(ROOT, args.runs, f"{name}.log"), "w")
                active.append((name, subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT),
                               time.time()))
            time.sleep(5)
            for item in list(active):
                name, proc, start = item
                if proc.poll() is not None:
                    active.remove(item)
                    durations[name] = time.time() - start
                    status = "ok" if proc.returncode == 0 else f"FAILED ({proc.returncode})"
                    print(f"{name}: {status} after {durations[name] / 60:.1f} min", flush=True)
                    if proc.returncode != 0:
                        raise SystemExit(f"run {name} failed; see {args.runs}/{name}.log")
    train_time = time.time() - t0
    study_json = os.path.join(ROOT, args.out, "study.json")
    if args.skip_train and os.path.exists(study_json):  # keep the record of the training that was done
        previous = json.load(open(study_json))
        train_time, commands = previous["train_wall_time_s"], previous["train_commands"]
    run_dirs = [os.path.join(args.runs, n) for n, _ in runs]
    out = args.out
    sh(lakd_cmd("report", *run_dirs, "--out", f"{out}/report.md", "--csv", f"{out}/report.csv",
                "--plot", f"{out}/curves.png"))
    students = [os.path.join(args.runs, n, "best.pt") for n in ("fitnet", "catkd", "lakd_149", "lakd_369")
                if n in dict(runs)]
    if students:
        sh(lakd_cmd("analyze", "cka", "--teacher", TEACHER, "--teacher-arch", "resnet56", "--students", *students,
                    "--images", str(min(1000, args.test_subset or 1000)), "--out", f"{out}/cka",
                    f"data.root={DATA}"))
        sh(lakd_cmd("visualize", "--checkpoints", *[os.path.join(args.runs, n, "best.pt")
                                                   for n in ("catkd", "lakd_149") if n in dict(runs)],
                    "--indices", "7,1507,3007,4507,6007,8507", "--out", f"{out}/maps.png",
                    f"data.root={DATA}"))
    for what in ("memory", "speed"):
        extra = ["--steps", "10", "--rounds", "2"] if what == "speed" else []
        cmd = lakd_cmd("bench", what, "--teacher", "resnet56", "--student", "resnet20", "--methods",
                       "scratch,kd,fitnet,at,catkd,lakd,lakd_joint", "--batch-size", "64", "--num-classes", "10",
                       "--device", "cpu", "--json", *extra)
        print("$ " + " ".join(cmd[2:]), flush=True)
        res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True)
        with open(os.path.join(ROOT, out, f"bench_{what}.json"), "w") as f:
            f.write(res.stdout)
    summaries = {}
    for n, _ in runs:
        p = os.path.join(ROOT, args.runs, n, "summary.json")
        if os.path.exists(p):
            summaries[n] = json.load(open(p))
    with open(study_json, "w") as f:
        json.dump({"epochs": args.epochs, "train_subset": args.train_subset, "test_subset": args.test_subset, "seed": args.seed,
                   "parallel": args.parallel, "threads": args.threads, "train_wall_time_s": train_time,
                   "analysis_wall_time_s": time.time() - t0 - (0 if args.skip_train else train_time), "train_commands": commands, "summaries": summaries},
                  f, indent=2)
    print(f"study done in {(time.time() - t0) / 60:.1f} min; outputs in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
