"""Sweeps: a grid of configs x overrides x seeds, run several at a time, resumable, with a results folder.

A sweep spec is a YAML file (example: ``configs/sweeps/cifar10_seeds.yaml``)::

    name: my_sweep
    runs_dir: runs/my_sweep          # one run folder per run (checkpoints; not committed)
    results_dir: results/my_sweep    # each finished run's summary.json, metrics.jsonl, config.yaml (committed)
    seeds: [0, 1, 2]
    processes: 2                     # CPU: runs at a time ...
    threads: 1                       # ... with this many threads each
    runs_per_gpu: 1                  # CUDA: runs at a time per visible GPU
    overrides: [solver.epochs=3]     # for every run
    groups:                          # run in this order
      - name: main
        order: seed-major            # all rows at seed 0, then seed 1, ... (or run-major)
        reference: kd                # the row `lakd report` compares the others with (paired over seeds)
        overrides: []                # for every run of the group
        grid: {solver.lr: [0.05, 0.1]}   # optional: every row x every combination of these values
        runs:
          - {name: kd, config: configs/cifar10/kd/resnet56_resnet20.yaml, overrides: [kd.T=4]}

A run is named ``<row>[_<key><value>...]-s<seed>``, the same on every machine and every day. Two rows of any
group that resolve to the same config (apart from their names) are one run: the later row points at the earlier
one (``same_as`` in the plan) and is not run twice. A row with ``skip: REASON`` is planned and listed, but not
run and not expected: for a row kept so that a table keeps its shape although its runs are known to add nothing
(the reason is shown wherever the row is). Runs of it that finished earlier still count in the report.

Running a sweep skips finished runs (their ``summary.json`` is in the results folder, or in the run folder and
then is copied), resumes interrupted ones from their run folder's ``last.pt`` (the trainer's ``resume=``), and
starts the rest. The results folder also holds ``sweep.json`` (the plan, the spec and, per invocation, the code's
git commit) and ``events.jsonl`` (start, end, exit code and wall time of every run process).

This module sits above the engine: it starts ``python -m lakd train`` processes and reads their folders; it
never imports the trainer. The process pool is ``subprocess`` + polling rather than ``concurrent.futures``
because each run is a separate program whose own process must be killable and resumable.
"""
from __future__ import annotations

import copy
import itertools
import json
import logging
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from ..config import load_config, load_yaml, yaml_load
from ..errors import LakdError
from ..runtime.threads import shared_cores

log = logging.getLogger(__name__)

SMALL_OUTPUTS = ("config.yaml", "metrics.jsonl", "summary.json")  # copied to the results folder
SPEC_KEYS = {"name", "runs_dir", "results_dir", "seeds", "processes", "threads", "runs_per_gpu", "overrides",
             "groups", "description"}
GROUP_KEYS = {"name", "title", "order", "reference", "compare", "overrides", "grid", "runs", "seeds", "paper_note"}
#: ``paper``: a published number shown beside the row in ``lakd report`` (the group's ``paper_note`` says whose)
#: ``skip``: a reason not to run the row (listed and reported, not run, not expected)
ROW_KEYS = {"name", "config", "overrides", "label", "paper", "skip"}
#: config keys that do not make two runs different (where the run lives, how many threads it uses)
NOT_IDENTITY = ("experiment", "output_dir", "resume")
NOT_IDENTITY_NESTED = (("train", "threads"), ("train", "progress"), ("train", "log_every"))


@dataclass
class PlannedRun:
    name: str  # the run folder's name: <variant>-s<seed>
    variant: str  # the row (and grid values) without the seed
    group: str
    seed: int
    config: str | None
    overrides: list[str]  # everything but seed/experiment/threads, which the runner adds
    same_as: str | None = None  # an earlier run with the same resolved config: this one is not run
    skip: str | None = None  # the row's reason not to run it (``skip:`` in the spec)


@dataclass
class Plan:
    name: str
    spec_path: str
    runs_dir: str
    results_dir: str
    processes: int
    threads: int
    runs_per_gpu: int
    runs: list[PlannedRun]  # in run order, duplicates included (with same_as set)
    groups: list[dict] = field(default_factory=list)  # name, title, reference, compare, rows [{label, variant}]
    #: every run of the spec when ``runs`` is a selection (``lakd sweep --only``); sweep.json keeps the whole plan
    all_runs: list[PlannedRun] | None = None

    def unique(self) -> list[PlannedRun]:
        """The runs to run: neither a duplicate of an earlier run nor of a row marked ``skip``."""
        return [r for r in self.runs if r.same_as is None and r.skip is None]

    def select(self, names: list[str]) -> None:
        """Keep the runs named (or of the groups named) for this invocation, in the order named (a group's runs
        in plan order at its place): the priority in which free slots take them. The whole plan is remembered."""
        self.all_runs = self.all_runs or list(self.runs)
        chosen: dict[str, PlannedRun] = {}
        for name in names:
            for r in self.runs:
                if name in (r.name, r.group):
                    chosen.setdefault(r.name, r)
        self.runs = list(chosen.values())


# ----------------------------------------------------------------------------------------------------------------
def _as_list(value, what: str) -> list:
    if value is None:
        return []
    if not isinstance(value, list):
        raise LakdError(f"{what} must be a list, got {value!r}")
    return value


def _check_keys(d: dict, allowed: set, where: str) -> None:
    if not isinstance(d, dict):
        raise LakdError(f"{where} must be a mapping of keys, got {d!r}")
    extra = sorted(set(d) - allowed)
    if extra:
        raise LakdError(f"unknown key(s) {', '.join(extra)} in {where}; known: {', '.join(sorted(allowed))}")


def _slug(key: str, value) -> str:
    """``sdm.splits``, [1, 4, 9] -> ``splits1-4-9``: a file-name-safe, deterministic name part."""
    text = json.dumps(value) if not isinstance(value, str) else value
    text = re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-")
    return f"{key.split('.')[-1]}{text}"


def _override_text(key: str, value) -> str:
    if isinstance(value, (list, dict, bool)) or value is None:
        return f"{key}={json.dumps(value)}"
    return f"{key}={value}"


def _identity(cfg: dict) -> str:
    cfg = copy.deepcopy(cfg)
    for k in NOT_IDENTITY:
        cfg.pop(k, None)
    for sec, k in NOT_IDENTITY_NESTED:
        cfg.get(sec, {}).pop(k, None)
    return json.dumps(cfg, sort_keys=True, default=str)


def load_plan(spec_path: str, runs_dir: str | None = None, results_dir: str | None = None,
              processes: int | None = None, threads: int | None = None, runs_per_gpu: int | None = None) -> Plan:
    """Read and expand a sweep spec; every run's config is resolved (so a bad key fails now, not in an hour)."""
    spec = load_yaml(spec_path)
    _check_keys(spec, SPEC_KEYS, f"sweep spec {spec_path!r}")
    name = str(spec.get("name") or os.path.splitext(os.path.basename(spec_path))[0])
    seeds_all = _as_list(spec.get("seeds", [0]), "seeds")
    common = [str(x) for x in _as_list(spec.get("overrides"), "overrides")]
    groups = _as_list(spec.get("groups"), "groups")
    if not groups:
        raise LakdError(f"sweep spec {spec_path!r} has no groups; add `groups:` with at least one `runs:` list")
    runs: list[PlannedRun] = []
    by_identity: dict[str, str] = {}  # resolved config (with seed) -> run name
    variant_of: dict[str, str] = {}  # run name -> its variant (for rows that point at another row)
    seen_names: set[str] = set()
    group_info = []
    for gi, g in enumerate(groups):
        _check_keys(g, GROUP_KEYS, f"group {gi + 1} of {spec_path!r}")
        gname = str(g.get("name") or f"group{gi + 1}")
        seeds = _as_list(g.get("seeds", seeds_all), f"group {gname}: seeds")
        if not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds) or not seeds:
            raise LakdError(f"group {gname}: seeds must be a non-empty list of integers, got {seeds!r}")
        order = g.get("order", "seed-major")
        if order not in ("seed-major", "run-major"):
            raise LakdError(f"group {gname}: order must be seed-major or run-major, got {order!r}")
        grid = g.get("grid") or {}
        if not isinstance(grid, dict) or not all(isinstance(v, list) and v for v in grid.values()):
            raise LakdError(f"group {gname}: grid must map config keys to non-empty lists of values")
        combos = list(itertools.product(*grid.values())) if grid else [()]
        rows = []
        for ri, r in enumerate(_as_list(g.get("runs"), f"group {gname}: runs")):
            _check_keys(r, ROW_KEYS, f"row {ri + 1} of group {gname}")
            if not r.get("name"):
                raise LakdError(f"row {ri + 1} of group {gname} has no name; every row needs `name:`")
            paper = r.get("paper")
            if paper is not None and (isinstance(paper, bool) or not isinstance(paper, (int, float))):
                raise LakdError(f"group {gname}, row {r['name']}: paper must be a number (a published top-1), got "
                                f"{paper!r}")
            skip = r.get("skip")
            if skip is not None and (not isinstance(skip, str) or not skip.strip()):
                raise LakdError(f"group {gname}, row {r['name']}: skip must be the reason not to run the row (text), "
                                f"got {skip!r}")
            config = r.get("config")
            if config is not None and not os.path.exists(config):
                raise LakdError(f"group {gname}, row {r['name']}: config {config!r} does not exist (paths are "
                                f"relative to the folder you run `lakd sweep` in)")
            for combo in combos:
                grid_over = [_override_text(k, v) for k, v in zip(grid, combo)]
                variant = "_".join([str(r["name"])] + [_slug(k, v) for k, v in zip(grid, combo)])
                label = str(r.get("label") or variant)
                overrides = common + [str(x) for x in _as_list(g.get("overrides"), f"group {gname}: overrides")] \
                    + [str(x) for x in _as_list(r.get("overrides"), f"row {r['name']}: overrides")] + grid_over
                rows.append({"label": label, "variant": variant, "config": config, "overrides": overrides,
                             "paper": paper, "skip": skip})
        items = [(row, s) for s in seeds for row in rows] if order == "seed-major" else \
            [(row, s) for row in rows for s in seeds]
        for row, seed in items:
            run_name = f"{row['variant']}-s{seed}"
            cfg = load_config(row["config"], row["overrides"] + [f"seed={seed}"])
            ident = _identity(cfg)
            same = by_identity.get(ident)
            if same is None and run_name in seen_names:
                raise LakdError(f"two different runs are both named {run_name!r}; give the rows distinct names")
            runs.append(PlannedRun(name=run_name, variant=row["variant"], group=gname, seed=seed,
                                   config=row["config"], overrides=row["overrides"], same_as=same, skip=row["skip"]))
            if row["skip"] is not None:  # not run: a later row with this config must run it, not point here
                continue
            if same is None:
                by_identity[ident] = run_name
                seen_names.add(run_name)
                variant_of[run_name] = row["variant"]
            else:
                row["variant_run"] = variant_of[same]
        group_info.append({
            "name": gname, "title": str(g.get("title") or gname), "seeds": seeds,
            "reference": g.get("reference"), "compare": _as_list(g.get("compare"), f"group {gname}: compare"),
            # a row that duplicates an earlier group's row reads that row's runs
            "rows": [{"name": row["variant"], "label": row["label"], "variant": row.get("variant_run", row["variant"]),
                      **({"paper": row["paper"]} if row["paper"] is not None else {}),
                      **({"skip": row["skip"]} if row["skip"] is not None else {})} for row in rows],
            **({"paper_note": str(g["paper_note"])} if g.get("paper_note") else {}),
        })
    procs = int(processes if processes is not None else spec.get("processes", 1))
    thr = int(threads if threads is not None else spec.get("threads", 0))
    per_gpu = int(runs_per_gpu if runs_per_gpu is not None else spec.get("runs_per_gpu", 1))
    if procs < 1 or per_gpu < 1 or thr < 0:
        raise LakdError("processes and runs_per_gpu must be at least 1, threads at least 0 (0: PyTorch's default)")
    return Plan(name=name, spec_path=spec_path,
                runs_dir=runs_dir or str(spec.get("runs_dir") or os.path.join("runs", name)),
                results_dir=results_dir or str(spec.get("results_dir") or os.path.join("results", name)),
                processes=procs, threads=thr, runs_per_gpu=per_gpu, runs=runs, groups=group_info)


# ----------------------------------------------------------------------------------------------------------------
def run_command(plan: Plan, run: PlannedRun, python: str = sys.executable, resume: bool = False) -> list[str]:
    """The ``lakd train`` command of one run (``resume=`` its own folder when it has a ``last.pt``)."""
    run_dir = os.path.join(plan.runs_dir, run.name)
    cmd = [python, "-m", "lakd", "train"] + ([run.config] if run.config else [])
    cmd += list(run.overrides) + [f"seed={run.seed}", f"experiment={run.name}", "train.progress=false"]
    if plan.threads:
        cmd.append(f"train.threads={plan.threads}")
    if resume:
        cmd.append(f"resume={run_dir}")
    return cmd + ["--run-dir", run_dir]


def is_finished(plan: Plan, run: PlannedRun) -> bool:
    return os.path.exists(os.path.join(plan.results_dir, run.name, "summary.json"))


def has_checkpoint(plan: Plan, run: PlannedRun) -> bool:
    return os.path.exists(os.path.join(plan.runs_dir, run.name, "last.pt"))


def collect(plan: Plan, run: PlannedRun) -> bool:
    """Copy a finished run's small outputs into the results folder (atomically: a folder rename)."""
    src = os.path.join(plan.runs_dir, run.name)
    if not os.path.exists(os.path.join(src, "summary.json")):
        return False
    dst = os.path.join(plan.results_dir, run.name)
    tmp = os.path.join(plan.results_dir, f".{run.name}.tmp")  # hidden: never read as a run folder
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    for f in SMALL_OUTPUTS:
        if os.path.exists(os.path.join(src, f)):
            shutil.copy2(os.path.join(src, f), os.path.join(tmp, f))
    shutil.rmtree(dst, ignore_errors=True)
    os.replace(tmp, dst)
    return True


def _pid_alive(pid: int, run_dir: str) -> bool:
    """A run process started by another sweep invocation that is still training this run folder."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read().decode(errors="replace")
    except OSError:
        try:
            os.kill(pid, 0)
        except OSError:
            return False
        return True  # no /proc: trust the pid
    return os.path.abspath(run_dir) in cmdline.replace("\0", " ") or run_dir in cmdline.replace("\0", " ")


def _git_commit(path: str = ".") -> dict:
    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=path, capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""
    commit = git("rev-parse", "HEAD")
    return {"commit": commit or None, "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))
            if commit else None}


def _fmt_time(s: float | None) -> str:
    if s is None:
        return "?"
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _epochs_done(run_dir: str) -> int:
    p = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(p):
        return 0
    with open(p) as f:
        return sum(1 for line in f if line.strip().endswith("}"))


def _planned_epochs(run: PlannedRun) -> int:
    return int(load_config(run.config, run.overrides + [f"seed={run.seed}"])["solver"]["epochs"])


def write_plan(plan: Plan, extra: dict | None = None) -> None:
    """``sweep.json`` in the results folder: the spec, the expanded plan, and one entry per invocation."""
    os.makedirs(plan.results_dir, exist_ok=True)
    path = os.path.join(plan.results_dir, "sweep.json")
    invocations = []
    if os.path.exists(path):
        try:
            with open(path) as f:
                invocations = json.load(f).get("invocations", [])
        except (OSError, json.JSONDecodeError):
            invocations = []
    if extra:
        invocations.append(extra)
    with open(plan.spec_path) as f:
        spec_text = f.read()
    data = {"name": plan.name, "spec_path": plan.spec_path, "spec": yaml_load(spec_text),
            "runs_dir": plan.runs_dir, "processes": plan.processes, "threads": plan.threads,
            "groups": plan.groups,
            "runs": [{**asdict(r), "command": shlex.join(run_command(plan, r, python="python"))}
                     for r in (plan.all_runs or plan.runs)],
            "invocations": invocations}
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)


@dataclass
class _Active:
    proc: subprocess.Popen
    started: float
    gpu: int | None
    run: PlannedRun
    epochs: int
    log: object


class SweepRunner:
    """Runs a plan's unfinished runs, ``slots`` at a time; ``say`` receives one progress line at a time."""

    def __init__(self, plan: Plan, device: str = "auto", say: Callable[[str], None] | None = None,
                 heartbeat_s: float = 600.0, poll_s: float = 2.0):
        self.plan = plan
        self.say = say or log.info
        self.heartbeat_s = heartbeat_s
        self.poll_s = poll_s
        self.gpus = self._gpus(device)
        self.slots = len(self.gpus) * plan.runs_per_gpu if self.gpus else plan.processes
        self.active: dict[str, _Active] = {}
        self.failed: list[str] = []
        self.durations: list[float] = []
        self._stop = False

    @staticmethod
    def _gpus(device: str) -> list[int]:
        if device == "cpu":
            return []
        import torch  # only to count devices

        n = torch.cuda.device_count()
        if device.startswith("cuda") and n == 0:
            raise LakdError("--device cuda but no CUDA device is visible; use --device cpu")
        return list(range(n))

    def _event(self, **kw) -> None:
        with open(os.path.join(self.plan.results_dir, "events.jsonl"), "a") as f:
            f.write(json.dumps({"time": time.time(), **kw}) + "\n")

    def _finished_mean(self) -> float | None:
        """Mean training wall time of the plan's finished runs (from their summaries; every run of the spec, not
        only an ``--only`` selection's), for the ETA; this invocation's own runs once one has finished."""
        times = []
        for r in self.plan.all_runs or self.plan.runs:
            if r.same_as is not None:
                continue
            p = os.path.join(self.plan.results_dir, r.name, "summary.json")
            if os.path.exists(p):
                try:
                    with open(p) as f:
                        t = json.load(f).get("wall_time_s")
                except (OSError, json.JSONDecodeError):
                    t = None
                if t:
                    times.append(float(t))
        pool = self.durations or times
        return sum(pool) / len(pool) if pool else None

    def progress(self, pending: list[PlannedRun]) -> str:
        unique = self.plan.unique()
        done = sum(is_finished(self.plan, r) for r in unique)
        running = []
        left_work = float(len(pending))
        for name, a in self.active.items():
            e, total = _epochs_done(os.path.join(self.plan.runs_dir, name)), a.epochs
            running.append(f"{name} {e}/{total} ep")
            left_work += 1.0 - e / max(total, 1)
        mean = self._finished_mean()
        eta = mean * left_work / self.slots if mean else None
        return (f"[{time.strftime('%H:%M:%S')}] done {done}/{len(unique)}, running {len(self.active)}"
                f"{' (' + ', '.join(running) + ')' if running else ''}, left {len(pending)}, "
                f"failed {len(self.failed)}, ETA {_fmt_time(eta)}")

    def _start(self, run: PlannedRun, slot_gpu: int | None) -> None:
        plan = self.plan
        run_dir = os.path.join(plan.runs_dir, run.name)
        resume = has_checkpoint(plan, run)
        if not resume and os.path.exists(run_dir):
            shutil.rmtree(run_dir)  # killed before its first checkpoint: nothing to keep, start clean
        cmd = run_command(plan, run, resume=resume)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if slot_gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = str(slot_gpu)
        elif plan.threads:
            env.update(OMP_NUM_THREADS=str(plan.threads), MKL_NUM_THREADS=str(plan.threads))
            if "OMP_WAIT_POLICY" not in os.environ and shared_cores(self.slots, plan.threads, os.cpu_count()):
                env["OMP_WAIT_POLICY"] = "PASSIVE"  # the runs share the cores (lakd/runtime/threads.py)
        os.makedirs(os.path.join(plan.runs_dir, "_logs"), exist_ok=True)
        logf = open(os.path.join(plan.runs_dir, "_logs", f"{run.name}.log"), "a")
        logf.write(f"$ {shlex.join(cmd)}\n")
        logf.flush()
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env)
        os.makedirs(run_dir, exist_ok=True)
        with open(os.path.join(run_dir, ".sweep_pid"), "w") as f:
            f.write(str(proc.pid))
        self.active[run.name] = _Active(proc, time.time(), slot_gpu, run, _planned_epochs(run), logf)
        self._event(run=run.name, event="resume" if resume else "start", pid=proc.pid, command=shlex.join(cmd))
        self.say(f"{'resume' if resume else 'start '} {run.name}" + (f" on GPU {slot_gpu}" if slot_gpu is not None
                                                                      else ""))

    def _reap(self) -> bool:
        changed = False
        for name, a in list(self.active.items()):
            rc = a.proc.poll()
            if rc is None:
                continue
            changed = True
            dt = time.time() - a.started
            del self.active[name]
            a.log.close()
            ok = rc == 0 and collect(self.plan, a.run)
            self._event(run=name, event="end", rc=rc, wall_s=dt, collected=ok)
            if ok:
                self.durations.append(dt)
                self.say(f"done   {name} in {_fmt_time(dt)}")
            else:
                self.failed.append(name)
                self.say(f"FAILED {name} (exit code {rc}); see {self.plan.runs_dir}/_logs/{name}.log")
        return changed

    def _free_gpu(self) -> int | None:
        if not self.gpus:
            return None
        use = {g: 0 for g in self.gpus}
        for a in self.active.values():
            use[a.gpu] += 1
        return min(use, key=lambda g: (use[g], g))

    def stop(self, *_args) -> None:
        self._stop = True

    def run(self) -> int:
        plan = self.plan
        os.makedirs(plan.results_dir, exist_ok=True)
        os.makedirs(plan.runs_dir, exist_ok=True)
        write_plan(plan, {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "host": socket.gethostname(),
                          "cwd": os.getcwd(), "argv": sys.argv, **_git_commit(),
                          "slots": self.slots, "gpus": self.gpus,
                          **({"only": [r.name for r in plan.runs]} if plan.all_runs is not None else {})})
        pending: list[PlannedRun] = []
        waiting: list[PlannedRun] = []  # run by another live process: checked again later
        for r in plan.unique():
            if is_finished(plan, r):
                continue
            if collect(plan, r):  # finished after the last sweep stopped watching it
                self.say(f"collected {r.name}")
                continue
            pid_file = os.path.join(plan.runs_dir, r.name, ".sweep_pid")
            if os.path.exists(pid_file):
                try:
                    pid = int(open(pid_file).read().strip() or 0)
                except ValueError:
                    pid = 0
                if pid and _pid_alive(pid, os.path.join(plan.runs_dir, r.name)):
                    waiting.append(r)
                    continue
            pending.append(r)
        n_done = sum(is_finished(plan, r) for r in plan.unique())
        n_skip = sum(r.skip is not None and r.same_as is None for r in plan.runs)
        n_dup = sum(r.same_as is not None for r in plan.runs)
        self.say(f"sweep {plan.name}: {len(plan.unique())} runs ({n_dup} duplicate rows merged"
                 + (f", {n_skip} of rows marked skip" if n_skip else "")
                 + f"), {n_done} finished, {sum(has_checkpoint(plan, r) for r in pending)} to resume, "
                 f"{len(waiting)} running elsewhere; {self.slots} at a time"
                 + (f" on GPUs {self.gpus}" if self.gpus else f", {plan.threads or 'default'} thread(s) each"))
        self.say(f"runs in {plan.runs_dir}, results in {plan.results_dir}")
        old = {s: signal.signal(s, self.stop) for s in (signal.SIGTERM, signal.SIGINT)}
        last_beat = time.time()
        try:
            while (pending or self.active or waiting) and not self._stop:
                for r in list(waiting):
                    pid_file = os.path.join(plan.runs_dir, r.name, ".sweep_pid")
                    pid = int(open(pid_file).read().strip() or 0) if os.path.exists(pid_file) else 0
                    if not (pid and _pid_alive(pid, os.path.join(plan.runs_dir, r.name))):
                        waiting.remove(r)
                        if collect(plan, r):
                            self.say(f"collected {r.name}")
                        else:
                            pending.insert(0, r)
                while pending and len(self.active) < self.slots and not self._stop:
                    self._start(pending.pop(0), self._free_gpu())
                    self.say(self.progress(pending))
                time.sleep(self.poll_s)
                if self._reap():
                    self.say(self.progress(pending))
                    last_beat = time.time()
                elif time.time() - last_beat > self.heartbeat_s:
                    self.say(self.progress(pending))
                    last_beat = time.time()
        finally:
            for s, h in old.items():
                signal.signal(s, h)
            if self.active:  # stopped: end the run processes; their last.pt lets the next sweep resume them
                for a in self.active.values():
                    a.proc.terminate()
                for name, a in list(self.active.items()):
                    try:
                        a.proc.wait(timeout=60)
                    except subprocess.TimeoutExpired:
                        a.proc.kill()
                    a.log.close()
                    self._event(run=name, event="stopped")
                self.say(f"stopped; {len(self.active)} run(s) ended, to be resumed by the same command")
                self.active.clear()
                self.say(self.progress(pending))
        if self._stop:
            return 130
        if self.failed:
            self.say(f"{len(self.failed)} run(s) failed: {', '.join(self.failed)}")
            return 1
        return 0
