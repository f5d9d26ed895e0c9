"""Failures at the edges of a run, each one line and exit 2 with nothing a user made lost or hidden (issue 34): a
full disk at start, unreadable checkpoints on resume (a truncated last.pt with an intact best.pt, a plain pickle),
and resuming over run files the user edited."""
from __future__ import annotations

import errno
import json
import os

import pytest
import torch

from lakd.cli.main import main

pytestmark = pytest.mark.usefixtures("one_thread")


def _run_cli(argv, capsys):
    capsys.readouterr()
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def _error_line(code: int, err: str) -> str:
    """The one error line of a failed command (warnings may come before it): exit code 2, no traceback."""
    errors = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert code == 2 and len(errors) == 1 and err.strip().splitlines()[-1] == errors[0], err
    assert "Traceback" not in err, err
    return errors[0]


def _full_disk_for(monkeypatch, name: str):
    """Make every ``os.write`` to a file called ``name`` fail as on a full disk (ENOSPC)."""
    real = os.write

    def write(fd, data):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            target = ""
        if os.path.basename(target) == name:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, data)

    monkeypatch.setattr(os, "write", write)


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc to tell the lock file's descriptor")
@pytest.mark.parametrize("where", ["output_dir", "run_dir"])
def test_a_full_disk_at_start_is_one_line_and_leaves_no_folder(where, tmp_path, capsys, monkeypatch,
                                                                digits_overrides):
    _full_disk_for(monkeypatch, ".lock")  # the first write of a run: its pid into the folder's lock file
    over = digits_overrides("kd", ["experiment=full"])
    argv = ["train", *over] + (["--run-dir", tmp_path / "run"] if where == "run_dir" else [])
    line = _error_line(*_run_cli(argv, capsys)[::2])
    assert line.startswith("error: no space left to write in the run folder") and "--run-dir DIR" in line, line
    assert not (tmp_path / "full").exists() and not (tmp_path / "run").exists()  # no empty run folder left


def test_a_full_disk_writing_the_config_leaves_no_folder(tmp_path, capsys, monkeypatch, digits_overrides):
    import lakd.engine.trainer as trainer_mod

    real_open = open

    def full_open(path, mode="r", *a, **k):
        if str(path).endswith("config.yaml") and "w" in mode:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_open(path, mode, *a, **k)

    monkeypatch.setattr(trainer_mod, "open", full_open, raising=False)
    line = _error_line(*_run_cli(["train", *digits_overrides("kd", ["experiment=cfg"])], capsys)[::2])
    assert line.startswith("error: no space left to write config.yaml in the run folder"), line
    assert not (tmp_path / "cfg").exists()
