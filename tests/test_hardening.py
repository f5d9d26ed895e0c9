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


# ----- checkpoints a resume cannot read ------------------------------------------------------------------------
def _one_epoch_of_two(tmp_path, over):
    """A run stopped after its first epoch: last.pt and best.pt of epoch 1 (as fit() saves them), no summary."""
    from lakd.config import load_config
    from lakd.engine.checkpoint import atomic_save
    from lakd.engine.trainer import Trainer

    tr = Trainer(load_config(None, over), quiet=True)
    tr.train_epoch(0)
    for name in ("last.pt", "best.pt"):
        atomic_save(tr._checkpoint(1), os.path.join(tr.run_dir, name))
    tr.close()
    return tr.run_dir


def test_a_truncated_last_pt_names_best_pt_and_the_flag(tmp_path, capsys, digits_overrides):
    over = digits_overrides("kd", ["solver.epochs=2", "experiment=cut"])
    run = _one_epoch_of_two(tmp_path, over)
    last = os.path.join(run, "last.pt")
    data = open(last, "rb").read()
    with open(last, "wb") as f:
        f.write(data[: len(data) // 2])  # a disk that lost the end of the file
    line = _error_line(*_run_cli(["train", *over, f"resume={run}"], capsys)[::2])
    assert f"cannot resume from {last!r}: it is corrupt or truncated; the run's best.pt (epoch 1) is intact" in line
    assert line.endswith(f"lakd train {run}/config.yaml resume={run} --from-best"), line
    assert os.path.getsize(last) == len(data) // 2  # refused: nothing touched
    code, out, err = _run_cli(["train", *over, f"resume={run}", "--from-best"], capsys)
    assert code == 0, err
    assert "resuming from" in out + err and "best.pt (epoch 1)" in out + err
    assert [json.loads(x)["epoch"] for x in open(os.path.join(run, "metrics.jsonl"))] == [2]
    assert torch.load(last, weights_only=True)["epoch"] == 2  # the next save replaced the truncated file


def test_a_plain_pickle_is_called_what_it_is(tmp_path, capsys, digits_overrides):
    import argparse
    import pickle

    path = tmp_path / "weights.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": {"w": [1.0]}, "args": argparse.Namespace(lr=0.1)}, f)
    line = _error_line(*_run_cli(["eval", "--checkpoint", path], capsys)[::2])
    assert "is a plain Python pickle (not a torch.save file) that holds Python objects (argparse.Namespace), " \
           "refused" in line and "corrupt" not in line, line
    over = digits_overrides("kd", ["experiment=pk", f"teacher.checkpoint={path}"])
    line = _error_line(*_run_cli(["train", *over], capsys)[::2])
    assert "holds Python objects" in line and "refused" in line, line
    assert not (tmp_path / "pk").exists()


# ----- resuming over files the user edited ---------------------------------------------------------------------
def _edit_yaml(path, section, key, value) -> str:
    import yaml

    data = yaml.safe_load(path.read_text())
    data[section][key] = value
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path.read_text()


def test_resuming_a_finished_run_leaves_its_edited_files_and_says_so(tmp_path, capsys, digits_overrides):
    over = digits_overrides("kd", ["experiment=done"])
    assert _run_cli(["train", *over], capsys)[0] == 0
    run = tmp_path / "done"
    cfg_path, summary_path = run / "config.yaml", run / "summary.json"
    _edit_yaml(cfg_path, "kd", "T", "hot")  # edited to an invalid value
    summary_path.write_text(summary_path.read_text().replace('"experiment"', '"note": "mine",\n  "experiment"'))
    before = {p: p.read_bytes() for p in run.iterdir() if p.is_file()}
    code, out, err = _run_cli(["train", *over, f"resume={run}"], capsys)  # the valid config, as first run
    assert code == 0, err
    said = [ln for ln in (out + err).splitlines() if "already finished" in ln]
    assert len(said) == 1 and "nothing to continue, and its files are left as they are" in said[0], out + err
    assert "config.yaml differs from the config the run wrote (kd.T: 4.0 -> 'hot')" in said[0], said[0]
    assert {p: p.read_bytes() for p in run.iterdir() if p.is_file()} == before  # nothing rewritten
    assert json.loads(out.strip().splitlines()[-1])["run_dir"] == str(run)


def test_resuming_keeps_an_edited_config_and_a_replaced_summary(tmp_path, capsys, digits_overrides):
    over = digits_overrides("kd", ["experiment=grow"])
    assert _run_cli(["train", *over], capsys)[0] == 0
    run = tmp_path / "grow"
    edited = _edit_yaml(run / "config.yaml", "kd", "T", 8.0)
    first_summary = (run / "summary.json").read_text()
    code, out, err = _run_cli(["train", *over, "solver.epochs=2", f"resume={run}", "--allow-config-change"], capsys)
    assert code == 0, err
    assert (run / "config.edited.yaml").read_text() == edited  # the user's file, kept under a new name
    assert (run / "summary.previous.json").read_text() == first_summary
    assert json.loads((run / "summary.json").read_text())["epochs"] == 2
    text = out + err
    assert "was edited after the run wrote it (kd.T: 4.0 -> 8.0); it is kept as" in text, text
    assert "summary.json is replaced by this run's; the earlier one is kept as" in text, text
