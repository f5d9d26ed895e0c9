"""User-facing errors: one clear line naming the problem and the fix, exit code 2."""
from __future__ import annotations

import difflib


class LakdError(Exception):
    """An error caused by the user's input (config, paths, checkpoints, names).

    The CLI prints ``error: <message>`` on one line and exits with code 2, without a traceback.
    """

    exit_code = 2
    #: end the process right after the line (``os._exit``): set for a lost rank, where tearing down a process group
    #: whose peer is gone can block the interpreter's exit for seconds
    exit_now = False


def close_matches(name: str, choices, n: int = 3) -> str:
    """A short 'did you mean' suffix for ``name`` among ``choices`` ('' when nothing is close)."""
    matches = difflib.get_close_matches(str(name), [str(c) for c in choices], n=n, cutoff=0.5)
    return f" (did you mean: {', '.join(matches)}?)" if matches else ""


def worker_message(e: Exception) -> str:
    """The one-line message of a ``LakdError`` raised in a DataLoader worker (PyTorch re-raises it with the
    worker's traceback in the text); the text itself for any other error."""
    text = str(e)
    marker = "LakdError: "
    lines = [ln for ln in text.splitlines() if marker in ln]
    return lines[-1].split(marker, 1)[1] if lines and "\n" in text else text
