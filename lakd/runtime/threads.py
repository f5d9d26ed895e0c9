"""OpenMP's wait policy, chosen before torch loads.

torch's CPU kernels run on libgomp, whose idle threads by default *spin* at every barrier for a while before
they sleep. When other processes also want the cores (the other runs of a sweep, a test suite, DataLoader
workers, another user's job), a spinning thread burns the time slice that the thread it waits for needs.
Measured on this project's 2-core machine (``benchmarks/bench_threads.py``, resnet20 training, batch 64, torch's
2 threads; ``docs/performance.md``):

- beside one busy process, ``OMP_WAIT_POLICY=PASSIVE`` (threads sleep at once) trained 1.64x faster (median of
  rounds; 1.25-1.73x), and with three other runs on the cores 32x faster (58 against 1.8 images/s);
- on an idle machine it was 0.77x (median; 0.72-1.06x): spinning is worth its cost when the cores are free.

So the ``lakd`` command picks PASSIVE when the machine is already busy as it starts (a 1-minute load average of
at least ``BUSY_LOAD``) and leaves libgomp's default otherwise; the test suite always picks PASSIVE (CI machines
are shared). libgomp reads the variable once, when it loads with torch, so this must run before the first
``import torch`` of the process. A policy set by the user (``OMP_WAIT_POLICY=ACTIVE`` or ``PASSIVE``) is never
changed; when torch is already loaded nothing changes.
"""
from __future__ import annotations

import os
import sys

#: a 1-minute load average from which other work is taken to share the cores (one busy process is 1.0)
BUSY_LOAD = 1.0
#: the policy this process set (None: it set none), for the run header
chosen: str | None = None


def choose_wait_policy(environ, torch_loaded: bool, load: float | None) -> str | None:
    """The ``OMP_WAIT_POLICY`` to set (None: leave the environment as it is)."""
    if "OMP_WAIT_POLICY" in environ or torch_loaded or load is None:
        return None
    return "PASSIVE" if load >= BUSY_LOAD else None


def set_openmp_wait_policy(always: bool = False) -> str | None:
    """Set ``OMP_WAIT_POLICY=PASSIVE`` for this process and its children when the machine is busy (or ``always``),
    unless the user chose a policy or torch is loaded; returns the policy set, or None."""
    try:
        load = 1e9 if always else os.getloadavg()[0]
    except (OSError, AttributeError):  # no load average on this platform
        load = None
    global chosen
    policy = choose_wait_policy(os.environ, "torch" in sys.modules, load)
    if policy:
        os.environ["OMP_WAIT_POLICY"] = policy
        chosen = policy
    return policy


def shared_cores(processes: int, threads: int, cores: int | None) -> bool:
    """Whether ``processes`` runs of ``threads`` threads each fill the machine's cores (``lakd sweep``): then each
    run's threads wait on cores the others hold, and its children get ``OMP_WAIT_POLICY=PASSIVE``."""
    return threads > 1 and bool(cores) and processes * threads >= cores


def describe() -> str:
    """The wait policy in effect, for a run's header ('' for libgomp's default)."""
    value = os.environ.get("OMP_WAIT_POLICY")
    if not value:
        return ""
    why = " (the machine was busy)" if chosen and value == chosen else ""
    return f", OpenMP wait {value.lower()}{why}"
