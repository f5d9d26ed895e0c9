"""Running a sweep's plan: ``lakd train`` processes several at a time, resumable, with a results folder.

Running a sweep skips finished runs (their ``summary.json`` is in the results folder, or in the run folder and
then is copied), resumes interrupted ones from their run folder's ``last.pt`` (the trainer's ``resume=``), and
starts the rest, ``slots`` at a time: on a CPU ``processes`` runs with ``threads`` threads each, on CUDA
``runs_per_gpu`` runs per visible GPU sharing it. ``per_device=N`` packs N runs onto each device (CPU: the
cores divided among them). The results folder also holds ``sweep.json`` (the plan, the spec and, per
invocation, the code's git commit: provenance) and ``events.jsonl`` (start, end, exit code and wall time of
every run process).

One sweep at a time writes a results folder: it holds the folder's lock (``.sweep.lock``, released by the kernel
when the sweep ends, even killed) and a second sweep on the folder stops at once, naming the running one. A run
process that stops because another process trains its run folder (another sweep sharing ``runs_dir``) is not a
failure: the run waits for that process and is collected when it finishes.

This package sits above the engine: it starts ``python -m lakd train`` processes and reads their folders; it
never imports the trainer. The process pool is ``subprocess`` + polling rather than ``concurrent.futures``
because each run is a separate program whose own process must be killable and resumable.
"""
from __future__ import annotations

import json
import logging
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from ..config import load_config
from ..engine import rundir
from ..engine.metrics import read_metrics
from ..errors import LakdError
from ..runtime.threads import shared_cores
from .spec import Plan, PlannedRun, merge_plan, read_plan, run_command

log = logging.getLogger(__name__)


def is_finished(plan: Plan, run: PlannedRun) -> bool:
    return os.path.exists(os.path.join(plan.result_dir(run), rundir.SUMMARY))


def has_checkpoint(plan: Plan, run: PlannedRun) -> bool:
    return os.path.exists(os.path.join(plan.run_dir(run), rundir.LAST))


def collect(plan: Plan, run: PlannedRun) -> bool:
    """Copy a finished run's small outputs into the results folder (atomically: a folder rename)."""
    src = plan.run_dir(run)
    if not os.path.exists(os.path.join(src, rundir.SUMMARY)):
        return False
    dst = plan.result_dir(run)
    tmp = os.path.join(plan.results_dir, f".{run.name}.tmp")  # hidden: never read as a run folder
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    for f in rundir.SMALL_OUTPUTS:
        if os.path.exists(os.path.join(src, f)):
            shutil.copy2(os.path.join(src, f), os.path.join(tmp, f))
    shutil.rmtree(dst, ignore_errors=True)
    os.replace(tmp, dst)
    return True


def running_elsewhere(run_dir: str) -> bool:
    """Whether another live process trains ``run_dir``: the run process whose pid a sweep wrote there (started by
    another sweep invocation) is alive and still training that folder, or some process holds the folder's lock.
    The one reader of the pid file (``rundir.read_pid``)."""
    pid = rundir.read_pid(run_dir)
    return (bool(pid) and _pid_alive(pid, run_dir)) or rundir.lock_holder(run_dir) is not None


def _pid_alive(pid: int, run_dir: str) -> bool:
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
    return len(read_metrics(os.path.join(run_dir, rundir.METRICS))[0])


def _planned_epochs(run: PlannedRun) -> int:
    return int(load_config(run.config, run.overrides + [f"seed={run.seed}"])["solver"]["epochs"])


def write_plan(plan: Plan, extra: dict | None = None) -> list[str]:
    """``sweep.json`` in the results folder (``Plan.to_json``), keeping the earlier invocations, adding ``extra``.
    The finished runs of the folder's earlier plan that ``plan`` no longer plans are kept in it (``merge_plan``:
    marked outside the current spec); returns their names."""
    os.makedirs(plan.results_dir, exist_ok=True)
    path = os.path.join(plan.results_dir, rundir.SWEEP_PLAN)
    try:
        old = read_plan(plan.results_dir)
    except LakdError:
        old = None  # a damaged sweep.json: rewritten from this plan
    kept = merge_plan(plan, old, lambda r: is_finished(plan, r))
    invocations = []
    if os.path.exists(path):
        try:
            with open(path) as f:
                invocations = json.load(f).get("invocations", [])
        except (OSError, json.JSONDecodeError, AttributeError):
            invocations = []
    plan.invocations = invocations + ([extra] if extra else [])
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(plan.to_json(), f, indent=1)
    os.replace(tmp, path)
    return kept


def cpu_cores() -> int:
    """The cores this process may run on (its affinity mask where the OS has one, else all of them)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def pack(plan: Plan, per_device: int, gpu: bool, cores: int | None = None) -> None:
    """``--per-device N``: N runs at a time per device. On CUDA the N runs share each visible GPU
    (``runs_per_gpu``); on a CPU the cores are divided among them (``threads`` = cores // N, at least 1)."""
    if isinstance(per_device, bool) or not isinstance(per_device, int) or per_device < 1:
        raise LakdError(f"--per-device must be a positive number of runs, got {per_device!r}")
    if gpu:
        plan.runs_per_gpu = per_device
    else:
        plan.processes = per_device
        plan.threads = max(1, (cores or cpu_cores()) // per_device)


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
                 heartbeat_s: float = 600.0, poll_s: float = 2.0, per_device: int | None = None):
        self.plan = plan
        self.say = say or log.info
        self.heartbeat_s = heartbeat_s
        self.poll_s = poll_s
        self.gpus = self.gpus_for(device)
        if per_device is not None:
            pack(plan, per_device, bool(self.gpus))
        self.slots = len(self.gpus) * plan.runs_per_gpu if self.gpus else plan.processes
        self.active: dict[str, _Active] = {}
        self.waiting: list[PlannedRun] = []  # trained by another live process: checked again later
        self.failed: list[str] = []
        self.durations: list[float] = []
        self._stop = False

    @staticmethod
    def gpus_for(device: str) -> list[int]:
        """The GPUs the runs go to (``--device``): none on ``cpu``, every visible one otherwise."""
        if device == "cpu":
            return []
        import torch  # only to count devices

        n = torch.cuda.device_count()
        if device.startswith("cuda") and n == 0:
            raise LakdError("--device cuda but no CUDA device is visible; use --device cpu")
        return list(range(n))

    def _event(self, **kw) -> None:
        with open(os.path.join(self.plan.results_dir, rundir.SWEEP_EVENTS), "a") as f:
            f.write(json.dumps({"time": time.time(), **kw}) + "\n")

    def _finished_mean(self) -> float | None:
        """Mean training wall time of the plan's finished runs (from their summaries; every run of the spec, not
        only an ``--only`` selection's), for the ETA; this invocation's own runs once one has finished."""
        times = []
        for r in self.plan.all_runs or self.plan.runs:
            if r.same_as is not None:
                continue
            p = os.path.join(self.plan.result_dir(r), rundir.SUMMARY)
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
        run_dir = plan.run_dir(run)
        owner = rundir.lock_holder(run_dir)
        if owner is not None:  # another process trains this run folder (another sweep): wait for it, touch nothing
            self.waiting.append(run)
            self.say(f"wait   {run.name}: its run folder is in use by process {owner}")
            return
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
        rundir.write_pid(run_dir, proc.pid)
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
            owner = None if ok else rundir.lock_holder(self.plan.run_dir(a.run))
            if not ok and rc != 0 and owner is None and collect(self.plan, a.run):
                ok = True  # finished by another process meanwhile (its folder was in use): collected, not failed
            self._event(run=name, event="end", rc=rc, wall_s=dt, collected=ok,
                        **({"in_use_by": owner} if owner else {}))
            if owner is not None and rc != 0:  # another process trains the folder: not a failure, wait for it
                self.waiting.append(a.run)
                self.say(f"wait   {name}: its run folder is in use by process {owner}; collected when it finishes")
            elif ok:
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

    def _lock_results(self) -> int:
        """Hold the results folder's lock for this sweep, or stop with the running sweep's description."""
        plan = self.plan
        os.makedirs(plan.results_dir, exist_ok=True)
        owner = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "argv": ["lakd", *sys.argv[1:]],
                            "started": time.strftime("%Y-%m-%d %H:%M:%S")})
        fd = rundir.hold_lock(plan.results_dir, rundir.SWEEP_LOCK, owner)
        if isinstance(fd, str):
            try:
                info = json.loads(fd)
                who = (f"process {info.get('pid')} on {info.get('host')}, started {info.get('started')}: "
                       f"{shlex.join(str(a) for a in info.get('argv') or [])}")
            except (ValueError, AttributeError, TypeError):
                who = f"process {fd}"
            raise LakdError(f"the results folder {plan.results_dir!r} is in use by another sweep ({who}); wait for "
                            f"it to finish (the same command then finds its runs finished), or give this sweep "
                            f"another --results folder")
        return fd

    def run(self) -> int:
        bad = self.plan.refused_left(lambda r: is_finished(self.plan, r))
        if bad is not None:
            raise bad
        fd = self._lock_results()
        try:
            return self._run()
        finally:
            if fd >= 0:
                os.close(fd)  # closing the descriptor drops the lock

    def _run(self) -> int:
        plan = self.plan
        os.makedirs(plan.runs_dir, exist_ok=True)
        kept = write_plan(plan, {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "host": socket.gethostname(),
                                 "cwd": os.getcwd(), "argv": sys.argv, **_git_commit(),
                                 "slots": self.slots, "gpus": self.gpus,
                                 **({"only": [r.name for r in plan.runs]} if plan.all_runs is not None else {})})
        if kept:
            self.say(f"kept {len(kept)} finished run(s) of the results folder's earlier plan that this spec no "
                     f"longer plans ({', '.join(kept[:6])}{', ...' if len(kept) > 6 else ''}): they stay in "
                     f"{rundir.SWEEP_PLAN} and the report, marked outside the current spec")
        refused = [r for r in plan.runs if r.refused and r.same_as is None]
        for r in refused:
            self.say(f"kept   {r.name}: finished before its config was refused ({r.refused}); not run again")
        pending: list[PlannedRun] = []
        waiting = self.waiting  # run by another live process: checked again later
        for r in plan.unique():
            if is_finished(plan, r) or r.refused:
                continue
            if collect(plan, r):  # finished after the last sweep stopped watching it
                self.say(f"collected {r.name}")
                continue
            if running_elsewhere(plan.run_dir(r)):
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
        began = time.time()
        last_beat = time.time()
        try:
            while (pending or self.active or waiting) and not self._stop:
                for r in list(waiting):
                    if not running_elsewhere(plan.run_dir(r)):
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
        if self.durations:  # the throughput of this invocation, to compare packings (--per-device) by
            wall = time.time() - began
            self.say(f"throughput: {len(self.durations)} run(s) in {_fmt_time(wall)} of wall time, "
                     f"{len(self.durations) * 3600 / max(wall, 1e-9):.1f} runs/h, {self.slots} at a time "
                     f"(mean run {_fmt_time(sum(self.durations) / len(self.durations))})")
        if self._stop:
            return 130
        if self.failed:
            self.say(f"{len(self.failed)} run(s) failed: {', '.join(self.failed)}")
            return 1
        return 0
