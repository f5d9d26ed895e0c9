"""The trainer, resume after SIGKILL, schedules, atomic checkpoints, configs and the CLI's errors."""
from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lakd.cli.main import main
from lakd.config import load_config
from lakd.engine.checkpoint import atomic_save
from lakd.engine.schedule import lr_at
from lakd.errors import LakdError
from lakd.models import create_model

ROOT = Path(__file__).resolve().parents[1]
TINY = ["data.dataset=digits", "data.train_subset=320", "data.test_subset=120", "solver.batch_size=32",
        "solver.lr=0.05", "solver.schedule=linear", "model.name=resnet8", "train.progress=false",
        "train.threads=1", "data.num_workers=0"]


def run_cli(args, timeout=300, env_extra=None):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "lakd", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=env)


# ---------------------------------------------------------------------------------------------------------
def test_resume_after_sigkill_matches_uninterrupted_run(tmp_path):
    args = ["train", *TINY, "method=scratch", "solver.epochs=4", "data.train_subset=640"]
    a, b = tmp_path / "a", tmp_path / "b"
    res = run_cli([*args, "--run-dir", str(a)])
    assert res.returncode == 0, res.stderr
    # the same run, killed with SIGKILL as soon as the first checkpoint exists ...
    proc = subprocess.Popen([sys.executable, "-m", "lakd", *args, "--run-dir", str(b)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not (b / "last.pt").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = torch.load(b / "last.pt", weights_only=True)["epoch"]
    assert killed_at < 4, "the run finished before it could be killed; make it longer"
    assert not (b / "summary.json").exists()
    # ... then resumed from its folder
    res = run_cli([*args, f"resume={b}", "--run-dir", str(b)])
    assert res.returncode == 0, res.stderr
    assert f"resumed {b} at epoch {killed_at}" in res.stdout
    sa, sb = json.loads((a / "summary.json").read_text()), json.loads((b / "summary.json").read_text())
    for k in ("final_top1", "final_top5", "best_top1", "best_epoch"):
        assert sa[k] == sb[k], k
    ma = [json.loads(x) for x in (a / "metrics.jsonl").read_text().splitlines()]
    mb = [json.loads(x) for x in (b / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in mb] == [1, 2, 3, 4]
    for x, y in zip(ma, mb):
        assert x["train_loss"] == y["train_loss"] and x["test_top1"] == y["test_top1"]
    wa = torch.load(a / "last.pt", weights_only=True)["model"]
    wb = torch.load(b / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_run_folder_contents(tmp_path):
    from lakd.engine.trainer import Trainer

    cfg = load_config(None, [*TINY, "method=scratch", "solver.epochs=2", f"output_dir={tmp_path}", "experiment=x"])
    summary = Trainer(cfg, quiet=True).fit()
    run = tmp_path / "x"
    assert {"config.yaml", "metrics.jsonl", "last.pt", "best.pt", "summary.json", "tb"} <= set(os.listdir(run))
    assert glob.glob(str(run / "tb" / "events.out.tfevents.*"))
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines] == [1, 2]
    assert summary["final_top1"] == lines[-1]["test_top1"]
    assert summary["best_top1"] == max(m["test_top1"] for m in lines)
    resolved = load_config(str(run / "config.yaml"))  # the resolved config is itself a valid config
    assert resolved["solver"]["epochs"] == 2 and resolved["model"]["num_classes"] == 10
    ck = torch.load(run / "last.pt", weights_only=True)
    assert ck["arch"] == "resnet8" and ck["epoch"] == 2 and ck["num_classes"] == 10
    # a finished run's checkpoint is a teacher for the next run, and `lakd eval` reports EK against it
    res = run_cli(["eval", "--checkpoint", str(run / "best.pt"), "--teacher", str(run / "last.pt"), "--json",
                   "data.test_subset=120"])
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["num_images"] == 120 and 0 <= out["top1"] <= 100 and "ek" in out
    # a second run with the same experiment name gets its own folder: nothing is overwritten
    Trainer(load_config(None, [*TINY, "method=scratch", "solver.epochs=1", f"output_dir={tmp_path}",
                               "experiment=x"]), quiet=True).fit()
    assert (tmp_path / "x-1" / "summary.json").exists()
    assert json.loads((run / "summary.json").read_text()) == summary


# ---------------------------------------------------------------------------------------------------------
def test_schedules():
    s = {"lr": 0.1, "epochs": 10, "schedule": "linear", "min_lr": 0.0, "warmup_epochs": 0}
    assert lr_at(s, 0, 0, 10) == pytest.approx(0.1)
    assert lr_at(s, 5, 0, 10) == pytest.approx(0.05)
    assert lr_at(s, 9, 9, 10) == pytest.approx(0.1 * 0.01)
    m = {"lr": 0.05, "epochs": 240, "schedule": "multistep", "milestones": [150, 180, 210], "gamma": 0.1}
    assert [lr_at(m, e) for e in (0, 149, 150, 180, 239)] == pytest.approx([0.05, 0.05, 0.005, 0.0005, 0.00005])
    c = {"lr": 0.1, "epochs": 10, "schedule": "cosine", "min_lr": 0.0}
    assert lr_at(c, 5, 0, 1) == pytest.approx(0.05)
    w = {"lr": 0.1, "epochs": 10, "schedule": "cosine", "warmup_epochs": 2}
    assert lr_at(w, 0, 0, 4) == pytest.approx(0.1 / 8)  # ramps per iteration
    assert lr_at(w, 1, 3, 4) == pytest.approx(0.1)
    assert lr_at(w, 2, 0, 4) == pytest.approx(0.1)


def test_atomic_save_never_leaves_a_broken_file(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    atomic_save({"epoch": 1}, str(path))

    def broken_save(obj, f):
        f.write(b"partial")
        raise KeyboardInterrupt  # killed mid-write

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(KeyboardInterrupt):
        atomic_save({"epoch": 2}, str(path))
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {"epoch": 1}
    assert os.listdir(tmp_path) == ["last.pt"]  # no temporary file left behind


def test_every_shipped_config_loads():
    paths = [p for p in glob.glob(str(ROOT / "configs" / "**" / "*.yaml"), recursive=True)
             if not os.path.basename(p).startswith("_")]
    assert len(paths) > 80
    for p in paths:
        cfg = load_config(p)
        assert cfg["experiment"], p


def test_overrides_and_yaml_numbers():
    cfg = load_config(None, ["solver.weight_decay=5e-4", "sdm.splits=[1,4,9]", "train.amp=bf16", "seed=3"])
    assert cfg["solver"]["weight_decay"] == pytest.approx(5e-4)
    assert cfg["sdm"]["splits"] == [1, 4, 9] and cfg["seed"] == 3


# ---------------------------------------------------------------------------------------------------------
def _save_ckpt(tmp_path, name, arch, num_classes):
    path = tmp_path / name
    torch.save({"model": create_model(arch, num_classes).state_dict(), "arch": arch, "num_classes": num_classes},
               path)
    return path


@pytest.mark.parametrize("case", ["unknown_key", "non_numeric", "unknown_model", "unknown_dataset",
                                  "missing_data", "teacher_classes", "corrupt_ckpt", "bad_split",
                                  "unknown_method", "missing_config", "config_is_folder", "config_not_utf8",
                                  "base_cycle", "negative_lr", "negative_momentum", "negative_wd",
                                  "negative_threads", "negative_subset"])
def test_bad_input_gets_one_clear_line_and_exit_2(case, tmp_path, capsys):
    base = ["train", *TINY, "solver.epochs=1", f"output_dir={tmp_path}/runs"]
    expect = {
        "unknown_key": (["solver.epoch=3"], ["solver.epoch", "did you mean", "solver.epochs"]),
        "non_numeric": (["solver.lr=fast"], ["solver.lr", "number"]),
        "unknown_model": (["model.name=resnet2O"], ["resnet2O", "resnet20"]),
        "unknown_dataset": (["data.dataset=cifar1000"], ["cifar1000"]),
        "missing_data": (["data.dataset=cifar10", f"data.root={tmp_path}/nowhere"],
                         [f"{tmp_path}/nowhere", "download"]),
        "teacher_classes": (["method=kd", "teacher.name=resnet8",
                             f"teacher.checkpoint={_save_ckpt(tmp_path, 't100.pt', 'resnet8', 100)}"],
                            ["100 classes"]),
        "corrupt_ckpt": (["method=kd", "teacher.name=resnet8", f"teacher.checkpoint={tmp_path}/cut.pt"],
                         ["corrupt or truncated"]),
        "bad_split": (["method=lakd", "teacher.name=resnet8", "sdm.splits=[2,1,3]"], ["sdm.splits"]),
        "unknown_method": (["method=lakdd"], ["lakdd", "did you mean"]),
        "missing_config": ([], ["does not exist"]),
        "config_is_folder": ([], ["is a folder", "YAML file"]),
        "config_not_utf8": ([], ["not UTF-8", "save it as UTF-8"]),
        "base_cycle": ([], ["_base_ chain loops", "a.yaml -> ", "b.yaml"]),
        "negative_lr": (["solver.lr=-0.1"], ["solver.lr", ">= 0"]),
        "negative_momentum": (["solver.momentum=-0.9"], ["solver.momentum", ">= 0"]),
        "negative_wd": (["solver.weight_decay=-5e-4"], ["solver.weight_decay", ">= 0"]),
        "negative_threads": (["train.threads=-1"], ["train.threads", ">= 0"]),
        "negative_subset": (["data.train_subset=-5"], ["data.train_subset", ">= 0"]),
    }
    extra, words = expect[case]
    if case == "corrupt_ckpt":
        good = _save_ckpt(tmp_path, "good.pt", "resnet8", 10).read_bytes()
        (tmp_path / "cut.pt").write_bytes(good[: len(good) // 2])
    argv = base + extra
    if case == "missing_config":
        argv = ["train", str(tmp_path / "nope.yaml")]
    if case == "config_is_folder":
        argv = ["train", str(tmp_path)]
    if case == "config_not_utf8":
        (tmp_path / "latin1.yaml").write_bytes("experiment: caf\xe9\n".encode("latin-1"))
        argv = ["train", str(tmp_path / "latin1.yaml")]
    if case == "base_cycle":
        (tmp_path / "a.yaml").write_text("_base_: b.yaml\nseed: 1\n")
        (tmp_path / "b.yaml").write_text("_base_: a.yaml\nseed: 2\n")
        argv = ["train", str(tmp_path / "a.yaml")]
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and err.splitlines()[-1] == errors[0] and "Traceback" not in err, err
    for w in words:
        assert w in errors[0], (w, err)
    assert not glob.glob(f"{tmp_path}/runs/*/metrics.jsonl")  # nothing half-written


def test_listing_commands(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "resnet56" in out and "wrn_40_2" in out and "vgg13" in out and "resnet18" in out
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for m in ("scratch", "kd", "fitnet", "at", "rkd", "crd", "ofd", "catkd", "dkd", "lakd"):
        assert f"\n{m} " in "\n" + out, m
    assert main(["configs", "--root", str(ROOT / "configs")]) == 0
    assert "configs/cifar10/lakd/resnet56_resnet20_149.yaml" in capsys.readouterr().out


def test_resume_refuses_a_different_run(tmp_path, capsys):
    from lakd.engine.trainer import Trainer

    cfg = load_config(None, [*TINY, "method=scratch", "solver.epochs=1", f"output_dir={tmp_path}", "experiment=r"])
    Trainer(cfg, quiet=True).fit()
    code = main(["train", *TINY, "method=scratch", "model.name=resnet14", "solver.epochs=2",
                 f"resume={tmp_path}/r"])
    assert code == 2 and "cannot resume" in capsys.readouterr().err
    with pytest.raises(LakdError, match="does not exist"):
        Trainer(load_config(None, [*TINY, f"resume={tmp_path}/none"]), quiet=True)


@pytest.mark.parametrize("method", ["lakd", "crd", "dkd"])
def test_resume_is_exact_for_stateful_methods(method, tmp_path):
    """Connectors (LAKD), memory banks and negatives (CRD) and warm-up (DKD) continue exactly."""
    from lakd.engine.trainer import Trainer

    teacher = _save_ckpt(tmp_path, "t.pt", "resnet8", 10)
    common = [*TINY, f"method={method}", "teacher.name=resnet8", f"teacher.checkpoint={teacher}",
              "solver.epochs=2", "data.train_subset=128", "solver.max_steps_per_epoch=3", f"output_dir={tmp_path}"]
    full = Trainer(load_config(None, common + ["experiment=full"]), quiet=True)
    full.fit()
    part = load_config(None, common + ["experiment=part"])
    part["solver"]["epochs"] = 2
    tr = Trainer(part, quiet=True)
    tr.train_epoch(0)  # one epoch, then a checkpoint as fit() writes it
    from lakd.engine.checkpoint import atomic_save

    atomic_save(tr._checkpoint(1), str(tmp_path / "part" / "last.pt"))
    resumed = Trainer(load_config(None, common + ["experiment=part", f"resume={tmp_path}/part"]), quiet=True)
    assert resumed.start_epoch == 1
    resumed.fit()
    a = full.distiller.state_dict()
    b = resumed.distiller.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_kd_loss_hand_computation():
    import math

    from lakd.distillers.kd import kd_loss

    s = torch.tensor([[1.0, 0.0]])
    t = torch.tensor([[0.0, 1.0]])
    T = 2.0
    ps = [math.exp(0.5) / (math.exp(0.5) + 1), 1 / (math.exp(0.5) + 1)]
    pt = [ps[1], ps[0]]
    kl = sum(p * math.log(p / q) for p, q in zip(pt, ps))
    assert kd_loss(s, t, T).item() == pytest.approx(kl * T * T, rel=1e-6)
    assert kd_loss(t, t, T).item() == pytest.approx(0.0, abs=1e-7)


def test_values_in_yaml_files_are_type_checked(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("solver:\n  lr: fast\n")
    with pytest.raises(LakdError, match="solver.lr must be a number"):
        load_config(str(bad))
    for over, words in ((["model.num_classes=abc"], "num_classes"), (["resume=5"], "resume"),
                        (["solver.milestones=[a]"], "milestones"), (["solver.epochs=2.5"], "whole number")):
        with pytest.raises(LakdError, match=words):
            load_config(None, over)


def test_too_few_classes_and_a_cut_metrics_line(tmp_path):
    from lakd.engine.trainer import Trainer

    with pytest.raises(LakdError, match="smaller than the 10 classes"):
        Trainer(load_config(None, [*TINY, "model.num_classes=5", f"output_dir={tmp_path}"]), quiet=True)
    cfg = load_config(None, [*TINY, "method=scratch", "solver.epochs=1", f"output_dir={tmp_path}", "experiment=c"])
    Trainer(cfg, quiet=True).fit()
    with open(tmp_path / "c" / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 2, "train_lo')  # what a kill during the write leaves
    more = load_config(None, [*TINY, "method=scratch", "solver.epochs=2", f"resume={tmp_path}/c"])
    Trainer(more, quiet=True).fit()
    lines = [json.loads(x) for x in (tmp_path / "c" / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines] == [1, 2]
    assert load_config(str(tmp_path / "c" / "config.yaml"))["resume"] is None
