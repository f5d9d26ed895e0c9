"""Bad inputs and first-contact failures: each is one line and exit 2 (or a warning that names the numbers), and
nothing is lost: non-finite checkpoints, unwritable outputs, a run killed before its first checkpoint, a batch
larger than the training set, FitNet's default hint stage, a teacher at chance level, a failed download."""
from __future__ import annotations

import logging
import os

import pytest
import torch
import torch.nn as nn

import lakd
from lakd.cli.main import main
from lakd.config import load_config
from lakd.errors import LakdError

pytestmark = pytest.mark.usefixtures("one_thread")


def _run_cli(argv, capsys):
    capsys.readouterr()
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def nan_ckpt(digits_ckpts, tmp_path):
    obj = torch.load(digits_ckpts["kd_run"], weights_only=False)
    key = next(k for k, v in obj["model"].items() if v.is_floating_point() and k.endswith("weight"))
    obj["model"][key] = torch.full_like(obj["model"][key], float("nan"))
    path = tmp_path / "diverged.pt"
    torch.save(obj, path)
    return str(path)


@pytest.mark.parametrize("command", ["eval", "cka", "visualize"])
def test_non_finite_checkpoint_is_refused_naming_the_file(command, nan_ckpt, digits_ckpts, tmp_path, capsys):
    argv = {"eval": ["eval", "--checkpoint", nan_ckpt],
            "cka": ["analyze", "cka", "--teacher", digits_ckpts["teacher"], "--students", nan_ckpt, "--images", "16",
                    "--out", tmp_path / "cka"],
            "visualize": ["visualize", "--checkpoints", nan_ckpt, "--out", tmp_path / "att.png"]}[command]
    code, _, err = _run_cli(argv, capsys)
    assert code == 2
    assert err.count("\n") == 1 and "non-finite weights" in err and nan_ckpt in err, err
    assert not (tmp_path / "att.png").exists() and not (tmp_path / "cka" / "cka.json").exists()


def test_an_unwritable_output_is_one_line(tmp_path, capsys, digits_overrides):
    run = tmp_path / "run"
    assert _run_cli(["train", *digits_overrides("kd"), "--run-dir", run, "--quiet"], capsys)[0] == 0
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    code, _, err = _run_cli(["report", run, "--out", blocker / "report.md"], capsys)
    assert code == 2 and err.count("\n") == 1 and "cannot write --out" in err and "Traceback" not in err, err
    code, _, err = _run_cli(["report", run, "--out", tmp_path / "ok.md", "--csv", blocker / "t.csv"], capsys)
    assert code == 2 and "cannot write --csv" in err, err


def _killed_before_first_checkpoint(run, overrides):
    """What a run killed during its first epoch leaves: its config and an empty TensorBoard folder."""
    os.makedirs(run / "tb")
    cfg = load_config(None, overrides)
    (run / "config.yaml").write_text(lakd.config.dump_config(cfg))


def test_a_run_killed_before_its_first_checkpoint_restarts(tmp_path, capsys, digits_overrides):
    over = digits_overrides("kd")
    run = tmp_path / "run"
    _killed_before_first_checkpoint(run, over)
    code, out, err = _run_cli(["train", *over, "--run-dir", run], capsys)  # a plain rerun
    assert code == 0, err
    assert "stopped before its first checkpoint" in out and (run / "last.pt").exists()
    run2 = tmp_path / "run2"
    _killed_before_first_checkpoint(run2, over)
    code, out, err = _run_cli(["train", run2 / "config.yaml", f"resume={run2}"], capsys)
    assert code == 0, err
    assert "starting it from epoch 1" in out and (run2 / "summary.json").exists()
    # a finished run is still never replaced without --overwrite
    code, _, err = _run_cli(["train", *over, "--run-dir", run], capsys)
    assert code == 2 and "already holds a run" in err


def test_batch_larger_than_the_training_set_warns(caplog):
    cfg = load_config(None, ["data.dataset=digits", "data.train_subset=12", "solver.batch_size=64",
                             "method=scratch", "model.name=resnet8"])
    with caplog.at_level(logging.WARNING, logger="lakd"):
        lakd.build(cfg, device="cpu")
    msg = " ".join(r.getMessage() for r in caplog.records)
    assert "solver.batch_size=64" in msg and "12 images" in msg


class _TwoStage(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1), nn.BatchNorm2d(8), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(8, 16, 3, 2, 1), nn.BatchNorm2d(16), nn.ReLU())
        self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(16, num_classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.b(self.a(x))), 1))


def test_fitnet_default_hint_stage_is_the_middle_one(make_distiller):
    assert make_distiller("fitnet").hint_stage == 2  # 3-stage CIFAR nets: mdistiller's HINT_LAYER 2
    opts = {"blocks": ["a", "b"]}
    d = lakd.distiller(_TwoStage(), _TwoStage(), method="fitnet", image_size=16, student_options=opts,
                       teacher_options=opts)
    assert d.hint_stage == 1
    with pytest.raises(LakdError, match="hint_stage=3 is out of range.*auto"):
        lakd.distiller(_TwoStage(), _TwoStage(), method="fitnet", image_size=16, student_options=opts,
                       teacher_options=opts, options={"fitnet": {"hint_stage": 3}})


def test_a_teacher_near_chance_is_named_loudly(digits_ckpts, digits_overrides, caplog, tmp_path):
    from lakd.engine.trainer import Trainer

    over = digits_overrides("kd", [f"teacher.checkpoint={digits_ckpts['teacher']}", "teacher.name=resnet14"])
    with caplog.at_level(logging.WARNING, logger="lakd"):
        trainer = Trainer(load_config(None, over), run_dir=str(tmp_path / "run"), quiet=True)
    try:
        assert trainer.teacher_top1 < 15  # random weights on 10 classes
        msg = " ".join(r.getMessage() for r in caplog.records)
        assert digits_ckpts["teacher"] in msg and "near chance" in msg
        assert "top-1 on 32 of the 360 test images" in msg  # measured on data.test_subset: said so
        assert digits_ckpts["teacher"] in trainer._diverged_hint()
    finally:
        trainer.close()


def test_a_failed_download_leaves_no_data_folder(tmp_path, monkeypatch):
    from torchvision.datasets import utils as tv_utils

    from lakd.data.cifar import load_cifar

    def failing(url, root, filename=None, md5=None):
        with open(os.path.join(root, filename), "wb") as f:
            f.write(b"partial")
        raise OSError("network is unreachable")

    monkeypatch.setattr(tv_utils, "download_url", failing)
    root = tmp_path / "new" / "data"
    with pytest.raises(LakdError, match="network is unreachable"):
        load_cifar("cifar10", str(root), download=True)
    assert not (tmp_path / "new").exists()
    keep = tmp_path / "mine"
    (keep / "other").mkdir(parents=True)
    with pytest.raises(LakdError):
        load_cifar("cifar10", str(keep), download=True)
    assert sorted(os.listdir(keep)) == ["other"]  # what was there before stays
