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
@pytest.mark.slow
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


@pytest.mark.slow
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
    # on disk the summary names its run folder (no machine path in a results folder that is copied or committed)
    assert json.loads((run / "summary.json").read_text()) == {**summary, "run_dir": "x"}


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
    assert "\ncifar10/lakd/resnet56_resnet20_149 " in capsys.readouterr().out  # then its recipe column


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
    # negatives within the 128 images; a warm-up that moves at each of the 2 epochs (and ends within the run)
    common += {"crd": ["crd.nce_k=100"], "dkd": ["dkd.warmup=2"]}.get(method, [])
    full = Trainer(load_config(None, common + ["experiment=full"]), quiet=True)
    full.fit()
    part = load_config(None, common + ["experiment=part"])
    part["solver"]["epochs"] = 2
    tr = Trainer(part, quiet=True)
    tr.train_epoch(0)  # one epoch, then a checkpoint as fit() writes it
    from lakd.engine.checkpoint import atomic_save

    atomic_save(tr._checkpoint(1), str(tmp_path / "part" / "last.pt"))
    tr.close()  # release the run folder's lock, as fit() does when it returns
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
    Trainer(more, quiet=True, allow_config_change=True).fit()  # one more epoch: a config change, accepted
    lines = [json.loads(x) for x in (tmp_path / "c" / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines] == [1, 2]
    assert load_config(str(tmp_path / "c" / "config.yaml"))["resume"] is None


# ----- issue 11: a run owns its folder, nothing computed is lost ------------------------------------------------
def _files(folder):
    return {p.name: p.read_bytes() for p in Path(folder).iterdir() if p.is_file() and not p.name.startswith(".")}


def _one_error_line(res):
    err = res.stderr.strip()
    assert res.returncode == 2 and "Traceback" not in err, err
    assert err.splitlines()[-1].startswith("error: "), err
    return err.splitlines()[-1]


def cli(argv, capsys):
    """``lakd ARGV`` in this process (no interpreter start-up): a result like subprocess.run's."""
    capsys.readouterr()
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return subprocess.CompletedProcess(argv, code, out.out, out.err)


@pytest.mark.slow
def test_a_run_owns_its_folder(tmp_path, capsys):
    """--run-dir onto a finished run is refused (nothing of it changes) until --overwrite; a second live run on
    one folder stops at once with exit 2 while the first finishes; default names never collide."""
    args = ["train", *TINY, "method=scratch", "solver.epochs=1"]
    x = tmp_path / "x"
    assert cli([*args, "--run-dir", x], capsys).returncode == 0
    before = _files(x)
    line = _one_error_line(cli([*args, "seed=1", "--run-dir", x], capsys))
    assert "already holds a run" in line and f"resume={x}" in line and "--overwrite" in line
    assert _files(x) == before
    res = cli([*args, "seed=1", "--run-dir", x, "--overwrite"], capsys)
    assert res.returncode == 0, res.stderr
    assert json.loads((x / "summary.json").read_text())["seed"] == 1
    assert len((x / "metrics.jsonl").read_text().splitlines()) == 1  # replaced, not appended to

    # two live runs with one --run-dir: the second one (even with --overwrite) leaves the first alone
    live = tmp_path / "live"
    first = subprocess.Popen([sys.executable, "-m", "lakd", *args, "solver.epochs=40", "--run-dir", str(live)],
                             cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        while not (live / "config.yaml").exists() and first.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        for extra in (["--overwrite"], [f"resume={live}"]):
            line = _one_error_line(cli([*args, "solver.epochs=40", "--run-dir", live, *extra], capsys))
            assert "in use by a live run" in line and f"process {first.pid}" in line, line
        assert first.poll() is None and (live / "config.yaml").exists()
    finally:
        first.kill()
        first.wait()

    # default names: exclusive creation, so concurrent claims of one experiment name get distinct folders
    from concurrent.futures import ThreadPoolExecutor

    from lakd.engine import rundir

    with ThreadPoolExecutor(8) as pool:
        runs = list(pool.map(lambda _: rundir.claim(None, str(tmp_path / "same")), range(8)))
    assert sorted(os.path.basename(r.path) for r in runs) == ["same"] + [f"same-{k}" for k in range(1, 8)]
    for r in runs:
        r.release()


@pytest.mark.parametrize("case", ["parent_is_file", "run_dir_is_file"])
def test_unusable_output_folder_is_one_line(case, tmp_path, capsys):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file")
    extra = ([f"output_dir={blocker}"] if case == "parent_is_file" else ["--run-dir", str(blocker)])
    line = _one_error_line(cli(["train", *TINY, "solver.epochs=1", *extra], capsys))
    assert str(blocker) in line and "file" in line
    assert blocker.read_text() == "a file"


def test_resume_refuses_a_changed_config_unless_asked_and_records_the_change(tmp_path, capsys):
    args = ["train", *TINY, "method=scratch", "solver.epochs=1"]
    run = tmp_path / "r"
    assert cli([*args, "--run-dir", run], capsys).returncode == 0
    cfg_before = (run / "config.yaml").read_text()
    line = _one_error_line(cli([*args, "solver.epochs=2", "solver.lr=0.1", "data.train_subset=200",
                                f"resume={run}"], capsys))
    for change in ("solver.epochs: 1 -> 2", "solver.lr: 0.05 -> 0.1", "data.train_subset: 320 -> 200"):
        assert change in line, line
    assert f"lakd train {run}/config.yaml resume={run}" in line and "--allow-config-change" in line
    assert (run / "config.yaml").read_text() == cfg_before and not (run / "config_changes.jsonl").exists()
    # keys that only say where or how fast (threads, data folder, progress) are no change
    res = cli(["train", run / "config.yaml", f"resume={run}", "train.threads=1", "data.root=elsewhere"], capsys)
    assert res.returncode == 0 and "already finished at epoch 1 of 1" in res.stderr, res.stderr  # nothing to do
    res = cli([*args, "solver.epochs=2", f"resume={run}", "--allow-config-change"], capsys)
    assert res.returncode == 0, res.stderr
    rec = [json.loads(x) for x in (run / "config_changes.jsonl").read_text().splitlines()]
    assert rec[-1]["epoch"] == 1 and rec[-1]["changes"] == {"solver.epochs": {"from": 1, "to": 2}}
    assert load_config(str(run / "config.yaml"))["solver"]["epochs"] == 2
    assert [json.loads(x)["epoch"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_resume_accepts_a_checkpoint_of_an_earlier_version(tmp_path, capsys):
    """A run started by an earlier lakd: its checkpoint's config lacks keys added since (they are at their
    defaults now) and keeps 'true' for auto|true|false keys; that is no change. A real change still is."""
    args = ["train", *TINY, "method=scratch", "solver.epochs=1", "data.fast=true"]
    run = tmp_path / "r"
    assert cli([*args, "--run-dir", run], capsys).returncode == 0
    ck = torch.load(run / "last.pt", map_location="cpu", weights_only=False)
    for sec, key in (("model", "kwargs"), ("model", "leaf_modules"), ("train", "malloc"), ("train", "sync_bn")):
        del ck["config"][sec][key]
    ck["config"]["data"]["fast"] = "true"
    atomic_save(ck, str(run / "last.pt"))
    line = _one_error_line(cli([*args, "solver.epochs=2", "train.sync_bn=true", f"resume={run}"], capsys))
    assert "(solver.epochs: 1 -> 2; train.sync_bn: None -> True)" in line, line  # a missing key set off default
    res = cli([*args, "solver.epochs=2", f"resume={run}", "--allow-config-change"], capsys)
    assert res.returncode == 0, res.stderr
    rec = [json.loads(x) for x in (run / "config_changes.jsonl").read_text().splitlines()]
    assert rec[-1]["changes"] == {"solver.epochs": {"from": 1, "to": 2}}  # nothing else counted as a change


def test_non_finite_evaluation_or_weights_are_never_saved(tmp_path, monkeypatch, capsys):
    """The probe's case (resume at lr=1e6, one step per epoch) and the two checks one by one."""
    from lakd.engine import trainer as trainer_mod

    args = ["train", *TINY, "method=scratch", "solver.epochs=1", "solver.max_steps_per_epoch=1"]
    run = tmp_path / "r"
    assert cli([*args, "--run-dir", run], capsys).returncode == 0
    before = _files(run)
    line = _one_error_line(cli([*args, "solver.epochs=4", "solver.lr=1e6", f"resume={run}",
                                "--allow-config-change"], capsys))
    assert "diverged" in line and "solver.lr" in line
    assert _files(run)["last.pt"] == before["last.pt"] and _files(run)["best.pt"] == before["best.pt"]
    assert [json.loads(x)["epoch"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [1]

    def cfg(name):  # 3 epochs, evaluated at the end only (the weight check runs after every epoch)
        return load_config(None, [*TINY, "method=scratch", "solver.epochs=3", "train.eval_every=3",
                                  "solver.max_steps_per_epoch=2", f"output_dir={tmp_path}", f"experiment={name}"])

    real_evaluate = trainer_mod.evaluate
    monkeypatch.setattr(trainer_mod, "evaluate", lambda *a, **k: {**real_evaluate(*a, **k), "loss": float("nan")})
    with pytest.raises(LakdError, match="epoch 3: the test loss is nan.*last good checkpoint"):
        trainer_mod.Trainer(cfg("nan_eval"), quiet=True).fit()
    assert torch.load(tmp_path / "nan_eval" / "last.pt", weights_only=True)["epoch"] == 2
    assert not (tmp_path / "nan_eval" / "best.pt").exists()
    one = cfg("stub")
    one["solver"]["epochs"] = 1
    with pytest.raises(LakdError, match="epoch 1: the test loss is nan.*no checkpoint was written"):
        trainer_mod.Trainer(one, quiet=True).fit()
    assert not (tmp_path / "stub").exists()  # a failed start leaves no stub folder for `lakd report` to count
    monkeypatch.setattr(trainer_mod, "evaluate", real_evaluate)

    real_epoch = trainer_mod.Trainer.train_epoch

    def poisoned(self, epoch):
        out = real_epoch(self, epoch)
        if epoch == 1:
            with torch.no_grad():
                self.distiller.student.classifier.weight[0, 0] = float("inf")
        return out

    monkeypatch.setattr(trainer_mod.Trainer, "train_epoch", poisoned)
    with pytest.raises(LakdError, match=r"epoch 2: student.fc.weight holds non-finite.*last good checkpoint"):
        trainer_mod.Trainer(cfg("inf_weight"), quiet=True).fit()
    assert torch.load(tmp_path / "inf_weight" / "last.pt", weights_only=True)["epoch"] == 1


def test_unwritable_run_folder_mid_run_saves_the_state_elsewhere(tmp_path, monkeypatch):
    from lakd.engine import trainer as trainer_mod

    real_save = trainer_mod.atomic_save

    def failing(obj, path):
        if obj["epoch"] == 2 and str(tmp_path) in path:
            raise PermissionError(13, "Permission denied")
        real_save(obj, path)

    monkeypatch.setattr(trainer_mod, "atomic_save", failing)
    cfg = load_config(None, [*TINY, "method=scratch", "solver.epochs=3", f"output_dir={tmp_path}", "experiment=w"])
    with pytest.raises(LakdError) as e:
        trainer_mod.Trainer(cfg, quiet=True).fit()
    msg = str(e.value)
    assert "cannot write to the run folder" in msg and "Permission denied" in msg and "\n" not in msg
    rescue = msg.split("saved to ")[1].split(": ")[0]
    assert torch.load(rescue, weights_only=True)["epoch"] == 2
    assert f"resume={tmp_path / 'w'}" in msg


@pytest.mark.slow
def test_kill_leftovers_best_pt_fallback_interrupt_command_and_umask(tmp_path, capsys):
    args = ["train", *TINY, "method=scratch", "solver.epochs=1"]
    run = tmp_path / "r"
    assert cli([*args, "--run-dir", run], capsys).returncode == 0
    (run / ".tmp-abc123.pt").write_bytes(b"cut")  # a kill during a save
    (run / "last.pt").unlink()  # and a lost last.pt: best.pt holds a full training state
    res = cli([*args, "solver.epochs=2", f"resume={run}", "--allow-config-change"], capsys)
    assert res.returncode == 0, res.stderr
    assert "last.pt is missing; resuming from" in res.stdout and "resumed" in res.stdout
    assert not glob.glob(str(run / ".tmp-*"))
    # checkpoints follow the umask like any other file
    old = os.umask(0o027)
    try:
        atomic_save({"x": 1}, str(tmp_path / "m.pt"))
    finally:
        os.umask(old)
    assert (tmp_path / "m.pt").stat().st_mode & 0o777 == 0o640

    # Ctrl-C prints the exact command that continues the run, and that command works
    live = tmp_path / "live"
    # a background job of a non-interactive shell (CI, nohup) inherits SIGINT ignored, and Python then keeps it
    # ignored: give the child the default disposition, as a terminal's Ctrl-C would find it
    proc = subprocess.Popen([sys.executable, "-m", "lakd", *args, "solver.epochs=30", "--run-dir", str(live)],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 240
    while not (live / "last.pt").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    cmd = err.strip().splitlines()[-1].split("continue it with: ")[1]
    assert cmd == f"lakd train {live}/config.yaml resume={live}"
    res = cli([*cmd.split()[1:], "solver.epochs=1", "solver.max_steps_per_epoch=1", "--allow-config-change"],
              capsys)
    assert res.returncode == 0 and "resumed" in res.stdout, res.stderr


def test_a_closed_output_pipe_ends_the_command_quietly():
    """`lakd models | head -1`: the reader leaves early; no traceback, exit 141 (128 + SIGPIPE)."""
    code = ("import sys\n"
            "class Closed:\n"
            "    def write(self, s): raise BrokenPipeError(32, 'Broken pipe')\n"
            "    def flush(self): raise BrokenPipeError(32, 'Broken pipe')\n"
            "    def fileno(self): return sys.__stdout__.fileno()\n"
            "from lakd.cli.main import main\n"
            "sys.stdout = Closed()\n"
            "rc = main(['models'])\n"
            "sys.stdout = sys.__stdout__\n"
            "sys.stderr.write(f'rc={rc}')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.stderr.strip() == "rc=141" and out.stdout == ""
