"""OpenMP's wait policy, chosen before torch loads.

torch's CPU kernels run on libgomp, whose idle threads by default *spin* at every barrier for a while before
they sleep. On a machine where other processes also want the cores (the other runs of a sweep, a test suite,
DataLoader workers, another user's job) a spinning thread burns the time slice that the thread it waits for
needs: measured on this project's 2-core machine, resnet20 training at 2 threads ran 1.8 images/s with the
default and 58 with ``OMP_WAIT_POLICY=PASSIVE`` while three 1-thread runs shared the cores (70x below its idle
speed), and the test suite crawled likewise. ``benchmarks/bench_threads.py`` measures both policies on an
idle machine and beside a busy process (``docs/performance.md``).

libgomp reads the variable once, when it loads (with torch), so this must run before the first
``import torch`` of the process: the ``lakd`` command calls it first thing. A policy set by the user
(``OMP_WAIT_POLICY=ACTIVE`` to keep spinning) is left alone; when torch is already loaded nothing changes.
"""
from __future__ import annotations

import os
import sys

#: what the lakd command sets when the user has not chosen
DEFAULT_POLICY = "PASSIVE"


def set_openmp_wait_policy(policy: str = DEFAULT_POLICY) -> str | None:
    """Set ``OMP_WAIT_POLICY`` for this process and its children unless the user set it or torch is loaded;
    returns the policy set, or None when nothing was changed."""
    if "OMP_WAIT_POLICY" in os.environ or "torch" in sys.modules:
        return None
    os.environ["OMP_WAIT_POLICY"] = policy
    return policy
