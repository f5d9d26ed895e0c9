"""Atomic checkpoint writing (the RNG state a resumed run needs is ``lakd.runtime.seeding``)."""
from __future__ import annotations

import os
import tempfile

import torch

TMP_PREFIX = ".tmp-"


def _umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it; put it straight back
    os.umask(mask)
    return mask


def atomic_save(obj, path: str) -> None:
    """``torch.save`` to a temporary file in the same folder, fsync, then rename over ``path``.

    A kill at any moment leaves either the old file or the new one, never a truncated one (a kill during the
    write leaves a ``.tmp-*.pt`` file, which ``remove_stale_temporaries`` clears when the run folder is next
    opened). The file gets the permissions an ordinary ``open`` would give it (0666 minus the umask), not
    ``mkstemp``'s 0600.
    """
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, suffix=".pt", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def remove_stale_temporaries(folder: str) -> list[str]:
    """Delete the ``.tmp-*.pt`` files a kill during ``atomic_save`` left in ``folder``; call it only while no
    other process writes there (the run folder's lock is held). Returns the removed names."""
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        if name.startswith(TMP_PREFIX) and name.endswith(".pt"):
            try:
                os.unlink(os.path.join(folder, name))
                removed.append(name)
            except OSError:
                pass
    return removed

