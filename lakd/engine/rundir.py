"""A run owns its folder: created exclusively, locked while the run lives, reused only on request.

- A new run creates its folder with ``os.mkdir`` (atomic: of two processes asking for one name, one gets it).
  Without ``--run-dir`` the name is ``output_dir/experiment``, then ``-1``, ``-2``... for the first free one.
- While the run lives it holds an exclusive ``flock`` on ``<run>/.lock`` (released by the kernel when the
  process dies, even on SIGKILL), so a second live run on the same folder stops at once with exit code 2.
- An existing run folder is reused only to continue it (``resume=``) or, when asked explicitly
  (``--overwrite``), to replace it; anything else is an error that says which of the two to use.

``fcntl`` is POSIX; where it is missing (Windows) the lock is skipped and exclusive creation still holds.
"""
from __future__ import annotations

import errno
import logging
import os
import shutil

from ..errors import LakdError
from .checkpoint import remove_stale_temporaries

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None

LOCK_NAME = ".lock"
#: the files of a run folder (the one place their names are written; every reader and writer uses these)
CONFIG = "config.yaml"  # the resolved config, written when the run starts
METRICS = "metrics.jsonl"  # one JSON record per epoch (``lakd.engine.metrics.read_metrics``)
SUMMARY = "summary.json"  # written when the run has finished: its presence means finished
LAST = "last.pt"  # the checkpoint a run resumes from
BEST = "best.pt"  # the checkpoint of the best test top-1
SWEEP_PID = ".sweep_pid"  # the pid of the run process a sweep started (hidden: not a run output)
#: the small outputs a sweep copies to its results folder (what ``lakd report`` reads)
SMALL_OUTPUTS = (CONFIG, METRICS, SUMMARY)
#: a sweep's results folder: its plan (``lakd.sweep.spec.Plan``) and the run processes' events
SWEEP_PLAN = "sweep.json"
SWEEP_EVENTS = "events.jsonl"
SWEEP_LOCK = ".sweep.lock"  # held by the sweep running into a results folder (hidden: not a run)

log = logging.getLogger(__name__)


def write_error(path: str, err: OSError, what: str = "in the run folder") -> LakdError:
    """The one-line error for a write that failed in ``path``: a full disk named as such (with the way out), any
    other failure with its reason."""
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return LakdError(f"no space left to write {what} {path!r} ({err.strerror or err}); free some space on that "
                         f"disk, or write the run elsewhere with output_dir=... or --run-dir DIR")
    return LakdError(f"cannot write {what} {path!r} ({err.strerror or err}); choose a writable output_dir=... or "
                     f"--run-dir DIR")


class RunDir:
    """A claimed run folder: ``path``, whether this process created it, and the lock it holds."""

    def __init__(self, path: str, created: bool):
        self.path = path
        self.created = created
        self._fd: int | None = None

    # ------------------------------------------------------------------------------------------------
    def lock(self) -> None:
        if fcntl is None or self._fd is not None:
            return
        lock_path = os.path.join(self.path, LOCK_NAME)
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            raise write_error(self.path, e) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            try:
                owner = os.read(fd, 32).decode(errors="replace").strip() or "?"
            finally:
                os.close(fd)
            raise LakdError(f"run folder {self.path!r} is in use by a live run (process {owner}); wait for it to "
                            f"finish, or write this run elsewhere with --run-dir DIR") from None
        try:
            os.ftruncate(fd, 0)
            os.write(fd, str(os.getpid()).encode())  # the owner, for the message of a second run
        except OSError as e:  # a full disk: the lock file exists but the pid cannot be written
            os.close(fd)
            raise write_error(self.path, e) from None
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def contents(self) -> list[str]:
        """The run outputs in the folder: hidden files (the lock, a killed save's temporaries, a sweep's pid
        file) are not a run."""
        try:
            return sorted(n for n in os.listdir(self.path) if not n.startswith("."))
        except OSError:
            return []

    def has_checkpoint(self) -> bool:
        return any(os.path.exists(os.path.join(self.path, n)) for n in (LAST, BEST))

    def never_saved(self) -> bool:
        """A run that started (its ``config.yaml`` written) and stopped before its first checkpoint: nothing in
        the folder is worth keeping (no weights, no summary), so a rerun or ``resume=`` simply starts it again."""
        names = self.contents()
        return "config.yaml" in names and "summary.json" not in names and not self.has_checkpoint()

    def restart(self) -> None:
        """Empty a ``never_saved`` folder (under the lock) for the run to start from epoch 1."""
        _clear(self)

    def discard(self) -> None:
        """Remove a folder this process created and that holds no checkpoint (a run that failed to start), so
        that it does not show up as an incomplete run; release the lock either way."""
        try:
            if self.created and not self.has_checkpoint():
                shutil.rmtree(self.path, ignore_errors=True)
        finally:
            self.release()


def _mkdir_parent(path: str) -> None:
    parent = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(parent, exist_ok=True)
    except FileExistsError:
        raise LakdError(f"cannot create the run folder {path!r}: {parent!r} is a file, not a folder; choose "
                        f"another output_dir=... or --run-dir") from None
    except OSError as e:
        raise write_error(path, e) from None


def _mkdir(path: str) -> bool:
    """``os.mkdir``; False when the name is taken (by a folder or a file)."""
    try:
        os.mkdir(path)
        return True
    except FileExistsError:
        return False
    except OSError as e:
        raise write_error(path, e) from None


def _clear(run: RunDir) -> None:
    for name in run.contents():
        p = os.path.join(run.path, name)
        if os.path.isdir(p) and not os.path.islink(p):
            shutil.rmtree(p)
        else:
            os.unlink(p)


def _restartable(path: str) -> RunDir | None:
    """The folder of a run that was stopped before its first checkpoint (``RunDir.never_saved``), claimed and
    emptied so that a plain rerun starts it again; None for any other folder (or one in use by a live run)."""
    run = RunDir(path, created=False)
    if not run.never_saved():  # looked at before locking: a folder another claim has just created (no
        return None  # config.yaml until its lock is held) is never touched
    try:
        run.lock()
    except LakdError:
        return None
    if not run.never_saved():
        run.release()
        return None
    log.info("%s holds a run stopped before its first checkpoint; starting it again", path)
    _clear(run)
    return run


def _locked(run: RunDir) -> RunDir:
    """``run`` with its lock held; a folder this process has just created is removed again when the lock cannot be
    taken (a full disk), so that a failed start leaves no empty run folder."""
    try:
        run.lock()
    except LakdError:
        if run.created:
            shutil.rmtree(run.path, ignore_errors=True)
        raise
    return run


def claim(path: str | None, base: str, *, resume: bool = False, overwrite: bool = False) -> RunDir:
    """Claim the run folder: ``path`` when given (``--run-dir``), else ``base`` or the first free ``base-k``.

    ``resume``: the folder holds the run being continued (it must exist). ``overwrite``: an existing run in the
    folder is deleted (under the lock, so never one that is still running).
    """
    if resume:
        target = path or base
        if not os.path.isdir(target):
            raise LakdError(f"cannot resume: the run folder {target!r} does not exist")
        run = RunDir(target, created=False)
        run.lock()
        remove_stale_temporaries(target)
        return run
    if path is None and not overwrite:
        _mkdir_parent(base)
        k = 0
        while True:
            candidate = base if k == 0 else f"{base}-{k}"
            if _mkdir(candidate):
                return _locked(RunDir(candidate, created=True))
            run = _restartable(candidate) if os.path.isdir(candidate) else None
            if run is not None:  # a run stopped before its first checkpoint: started again in its own folder
                return run
            k += 1
    target = path or base
    _mkdir_parent(target)
    created = _mkdir(target)
    if not created and not os.path.isdir(target):
        raise LakdError(f"cannot use {target!r} as the run folder: it is a file; choose another --run-dir")
    run = _locked(RunDir(target, created=created))  # from here on no other live run writes in the folder
    remove_stale_temporaries(target)
    if run.contents():
        if not overwrite and run.never_saved():
            log.info("%s holds a run stopped before its first checkpoint; starting it again", target)
            _clear(run)
            return run
        if not overwrite:
            run.release()
            raise LakdError(f"run folder {target!r} already holds a run ({', '.join(run.contents()[:4])}); "
                            f"continue it with resume={target}, write this run elsewhere with --run-dir DIR, or "
                            f"replace it with --overwrite")
        _clear(run)
    return run


def lock_holder(folder: str, name: str = LOCK_NAME) -> str | None:
    """Who holds the lock file ``folder/name`` (what its owner wrote in it, "?" when nothing), or None when no live
    process holds it (or there is none). Asks the kernel with a non-blocking ``flock`` taken and dropped at once."""
    path = os.path.join(folder, name)
    if fcntl is None:
        return None
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return os.read(fd, 4096).decode(errors="replace").strip() or "?"
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def hold_lock(folder: str, name: str, owner: str) -> int | str:
    """Take the exclusive lock ``folder/name`` for this process (kept until the descriptor returned is closed, or
    the process ends, even by SIGKILL) and write ``owner`` in it; when another process holds it, what that one
    wrote (a str) instead. -1 where locks are not available (no ``fcntl``)."""
    if fcntl is None:
        return -1
    try:
        fd = os.open(os.path.join(folder, name), os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:
        raise write_error(folder, e, "a lock file in the folder") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        try:
            return os.read(fd, 4096).decode(errors="replace").strip() or "?"
        finally:
            os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, owner.encode())
    except OSError as e:
        os.close(fd)
        raise write_error(folder, e, "a lock file in the folder") from None
    return fd


def read_pid(run_dir: str) -> int | None:
    """The pid a sweep wrote into ``run_dir`` (``SWEEP_PID``), or None (no file, unreadable, not a number)."""
    try:
        with open(os.path.join(run_dir, SWEEP_PID)) as f:
            return int(f.read().strip() or 0) or None
    except (OSError, ValueError):
        return None


def write_pid(run_dir: str, pid: int) -> None:
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, SWEEP_PID), "w") as f:
        f.write(str(pid))
