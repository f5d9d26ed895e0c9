"""Argument helpers shared by the ``lakd`` sub-commands that take checkpoints (eval, analyze, visualize), and the
translation of a failed write to a user-named output into a one-line error (every command)."""
from __future__ import annotations

import os
import re

from ..errors import LakdError

_OVERRIDE = re.compile(r"^[A-Za-z_][\w.]*=")


def split_overrides(items: list[str], overrides: list[str]) -> tuple[list[str], list[str]]:
    """``key=value`` items swallowed by a ``nargs='+'`` option go back to the overrides."""
    paths, extra = [], []
    for it in items:
        if _OVERRIDE.match(it) and not os.path.exists(it):
            extra.append(it)
        else:
            paths.append(it)
    return paths, extra + list(overrides or [])


def config_and_overrides(config: str | None, overrides: list[str]) -> tuple[str | None, list[str]]:
    """A command's CONFIG argument that is a ``key=value`` (``lakd train method=kd ...``, no file) goes back to
    the overrides, first."""
    if config and "=" in config and not config.endswith((".yaml", ".yml")):
        return None, [config, *overrides]
    return config, list(overrides)


def check_out_dir(path: str, flag: str = "--out") -> None:
    """Create the output folder before any computation, so a bad ``--out`` costs nothing."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise LakdError(f"{flag} {path!r} is an existing file, not a folder; give a new or existing folder")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise LakdError(f"cannot create the output folder {flag} {path!r} ({e.strerror or e}); choose another "
                        f"folder") from None
    if not os.access(path, os.W_OK):
        raise LakdError(f"the output folder {flag} {path!r} is not writable; choose another folder")


def archs_for(arg, n: int, flag: str) -> list[str | None]:
    if not arg:
        return [None] * n
    if len(arg) == 1:
        return list(arg) * n
    if len(arg) != n:
        raise LakdError(f"{flag} takes one model name for all checkpoints or one per checkpoint ({n}), "
                        f"got {len(arg)}")
    return list(arg)


#: argparse destinations that name files or folders a command writes (``--out``, ``--csv``, ``--plot``)
OUTPUT_OPTIONS = ("out", "csv", "plot")


def output_error(args, err: OSError) -> LakdError | None:
    """The one-line error for ``err`` when it is a failed write to a path the user named with an output option
    (the path itself, a folder above it or inside it, else a temporary file next to it); None for any other
    OSError, which stays a bug to report."""
    name = getattr(err, "filename", None)
    if not isinstance(name, (str, bytes, os.PathLike)):
        return None
    target = os.path.abspath(os.fsdecode(name))
    named = []
    for dest in OUTPUT_OPTIONS:
        value = getattr(args, dest, None)
        named += [(dest, p) for p in (value if isinstance(value, (list, tuple)) else [value])
                  if isinstance(p, str) and p]
    tests = (lambda full: target == full or target.startswith(full + os.sep) or full.startswith(target + os.sep),
             lambda full: os.path.dirname(target) == os.path.dirname(full))  # e.g. an atomic write's temporary
    for hit in tests:
        for dest, path in named:
            if hit(os.path.abspath(path)):
                return LakdError(f"cannot write --{dest.replace('_', '-')} {path!r} ({err.strerror or err}); "
                                 f"choose a writable path")
    return None


#: the override that ``--no-progress`` stands for (the same switch as training's progress bar)
NO_PROGRESS = "train.progress=false"


def add_progress_flag(p) -> None:
    """``--no-progress`` on a long command: no progress bar (as ``train.progress=false``). Bars are drawn on
    standard error and only when it is a terminal, so logs and pipes never get them."""
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar (same as train.progress=false; there is none when stderr is not a terminal)")


def progress_overrides(args, overrides: list[str]) -> list[str]:
    """``overrides`` with ``train.progress=false`` appended when ``--no-progress`` was given."""
    return list(overrides) + ([NO_PROGRESS] if getattr(args, "no_progress", False) else [])


def progress_on(cfg: dict) -> bool:
    """The progress switch of a loaded config (``train.progress``)."""
    return bool((cfg.get("train") or {}).get("progress", True))


def default_out_dir(checkpoint: str, name: str) -> str:
    """Where a command that reads checkpoints writes when ``--out`` is not given: ``<run folder>/<name>`` when
    ``checkpoint`` lies in a writable run folder (one written by ``lakd train``: config.yaml, metrics.jsonl or
    summary.json beside it), else ``./lakd-<name>``. Never loose files in the current folder."""
    from ..engine import rundir

    folder = os.path.dirname(os.path.abspath(checkpoint))
    if any(os.path.exists(os.path.join(folder, f)) for f in rundir.SMALL_OUTPUTS) and os.access(folder, os.W_OK):
        return os.path.join(os.path.dirname(checkpoint) or ".", name)
    return f"lakd-{name}"
