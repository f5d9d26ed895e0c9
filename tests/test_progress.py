"""Progress on the long commands (``lakd eval``, ``analyze cka``, ``visualize``, ``bench``, ``train``): a bar on
standard error when it is a terminal and the switch is on (``train.progress``, ``--no-progress``); nothing at all
otherwise (a log file, a pipe, a test)."""
from __future__ import annotations

import io
import sys

import pytest

from lakd.cli.main import main

pytestmark = pytest.mark.usefixtures("one_thread")


class FakeTerminal(io.StringIO):
    """Standard error as a terminal: what a bar would draw lands here."""

    def isatty(self) -> bool:
        return True


@pytest.fixture
def terminal(monkeypatch):
    """``terminal()``: replace standard error with a fresh fake terminal and return it."""

    def make():
        t = FakeTerminal()
        monkeypatch.setattr(sys, "stderr", t)
        return t

    return make


def test_bar_only_on_a_terminal_with_the_switch_on(terminal):
    from lakd.runtime.progress import progress_bar, shown, tracked

    tty = terminal()
    assert list(tracked(range(5), "count", True)) == [0, 1, 2, 3, 4]
    assert "count:   0%" in tty.getvalue() and "0/5" in tty.getvalue()
    tty = terminal()
    assert list(tracked(range(5), "count", False)) == [0, 1, 2, 3, 4]  # the switch off: nothing drawn
    with progress_bar(3, "off", enabled=False) as bar:
        bar.update(3)
    assert tty.getvalue() == ""
    assert not shown(True, io.StringIO())  # a file, a pipe: no bar whatever the switch says
    assert shown(True, FakeTerminal()) and not shown(False, FakeTerminal())
    # a wrapped loader is still the loader: its length and attributes, and a new bar on every pass
    loader = [1, 2, 3]
    t = tracked(loader, "pass", True)
    assert len(t) == 3 and t.count(2) == 1
    tty = terminal()
    assert list(t) == [1, 2, 3] and list(t) == [1, 2, 3]
    assert tty.getvalue().count("pass:   0%") == 2


def _eval_argv(ckpts, *extra):
    return ["eval", "--checkpoint", ckpts["kd_run"], "--teacher", ckpts["teacher"], *extra]


def test_eval_progress_switch_and_no_output_without_a_terminal(digits_ckpts, terminal, capsys, monkeypatch):
    captured = sys.stderr  # capsys's: not a terminal
    assert not captured.isatty()
    tty = terminal()
    assert main(_eval_argv(digits_ckpts, "data.test_subset=64", "train.eval_batch_size=16")) == 0
    err = tty.getvalue()
    assert "eval teacher:   0%" in err and "eval student:   0%" in err and "0/4" in err  # 64 images, 4 batches
    out = capsys.readouterr().out
    assert "(64 images of digits: data.test_subset, of 360 test images)" in out  # a subset says so
    for off in (["--no-progress"], ["train.progress=false"]):
        tty = terminal()
        assert main(_eval_argv(digits_ckpts, "data.test_subset=64", *off)) == 0
        assert tty.getvalue() == "", off
    # not a terminal (captured standard error): the same command draws nothing
    monkeypatch.setattr(sys, "stderr", captured)
    capsys.readouterr()
    assert main(_eval_argv(digits_ckpts, "data.test_subset=64")) == 0
    out, err = capsys.readouterr()
    assert "top-1" in out and "eval" not in err and "%|" not in err


def test_cka_and_visualize_show_progress_on_a_terminal(digits_ckpts, terminal, tmp_path):
    tty = terminal()
    assert main(["analyze", "cka", "--teacher", digits_ckpts["teacher"], "--students", digits_ckpts["kd_run"],
                 "--images", "16", "--out", str(tmp_path / "cka")]) == 0
    assert "CKA: 2 models over the test images:   0%" in tty.getvalue()
    tty = terminal()
    assert main(["analyze", "cka", "--teacher", digits_ckpts["teacher"], "--students", digits_ckpts["kd_run"],
                 "--images", "16", "--out", str(tmp_path / "cka"), "--no-progress"]) == 0
    assert "CKA" not in tty.getvalue()
    tty = terminal()
    assert main(["visualize", "--checkpoints", digits_ckpts["teacher"], digits_ckpts["kd_run"], "--images", "2",
                 "--out", str(tmp_path / "v")]) == 0
    assert "visualize: choosing test images:   0%" in tty.getvalue() and "visualize: maps:   0%" in tty.getvalue()
    tty = terminal()
    assert main(["visualize", "--checkpoints", digits_ckpts["teacher"], "--images", "2", "--out",
                 str(tmp_path / "v"), "train.progress=false"]) == 0
    assert "visualize" not in tty.getvalue()


def test_bench_and_train_progress_switch(terminal, digits_overrides):
    argv = ["bench", "speed", "--teacher", "resnet8", "--student", "resnet8", "--methods", "scratch,kd",
            "--num-classes", "10", "--batch-size", "4", "--steps", "1", "--warmup", "0", "--device", "cpu"]
    tty = terminal()
    assert main(argv) == 0
    assert "bench speed" in tty.getvalue() and "0/4" in tty.getvalue()  # 2 methods set up + 2 timed
    tty = terminal()
    assert main(argv + ["--no-progress"]) == 0
    assert "bench speed" not in tty.getvalue()
    tty = terminal()
    assert main(["train", *digits_overrides("scratch", ["experiment=bar"]), "train.progress=true"]) == 0
    assert "epoch 1/1:   0%" in tty.getvalue()
    tty = terminal()
    assert main(["train", *digits_overrides("scratch", ["experiment=nobar"]), "train.progress=true",
                 "--no-progress"]) == 0
    assert "epoch 1/1" not in tty.getvalue()
