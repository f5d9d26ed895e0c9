"""The Python API for one's own loop: the example script runs; LAKD's local backward saves memory there; AMP
scaling goes through the user's backward; errors for bad API input."""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch

import lakd
from lakd.errors import LakdError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_example():
    path = os.path.join(ROOT, "examples", "distil_own_loop.py")
    spec = importlib.util.spec_from_file_location("distil_own_loop", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_example_script_runs_on_tiny_data(capsys):
    ex = load_example()
    out = ex.main(["--steps", "3", "--teacher-steps", "3", "--train-size", "48", "--test-size", "16",
                   "--batch-size", "16"])
    assert set(out["losses"]) == {"feat1", "feat2", "feat3", "ce", "att"}
    assert 0.0 <= out["student_acc"] <= 1.0
    assert "student (lakd)" in capsys.readouterr().out


def _pair(ex, backward="local"):
    torch.manual_seed(0)
    opts = {"blocks": ["stage1", "stage2", "stage3"]}
    return lakd.distiller(ex.MyNet(width=16), ex.MyNet(width=32), "lakd", image_size=32, student_options=opts,
                          teacher_options=opts, options={"sdm": {"backward": backward}})


def test_local_backward_saves_memory_in_a_plain_loop():
    from lakd.analysis.cost import SavedTensorMeter

    ex = load_example()
    b = {"image": torch.randn(16, 3, 32, 32), "target": torch.randint(0, 4, (16,))}
    peaks, grads = {}, {}
    for mode in ("local", "joint"):
        d = _pair(ex, mode)
        meter = SavedTensorMeter()
        with meter.hooks():
            d.train_step(b, lambda loss: loss.backward())
        peaks[mode] = meter.peak
        grads[mode] = {n: p.grad.clone() for n, p in d.named_trainable_parameters()}
    # the largest local module holds about a third of the network's saved activations
    assert peaks["local"] < 0.75 * peaks["joint"], peaks
    for n in grads["local"]:
        assert torch.allclose(grads["local"][n], grads["joint"][n], atol=1e-6), n


def test_amp_scaling_goes_through_the_users_backward():
    ex = load_example()
    d = _pair(ex)
    b = {"image": torch.randn(4, 3, 32, 32), "target": torch.randint(0, 4, (4,))}
    seen = []

    def backward(loss):
        seen.append(loss.detach())
        (loss * 1024.0).backward()  # what GradScaler.scale does

    _, losses = d.train_step(b, backward)
    assert len(seen) == 3  # one backward per local module
    assert torch.allclose(sum(seen), sum(losses.values()))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, losses = d.train_step(b, lambda loss: loss.backward())
    assert all(torch.isfinite(v) for v in losses.values())


def test_api_errors():
    ex = load_example()
    with pytest.raises(LakdError, match="needs a teacher"):
        lakd.distiller(ex.MyNet(), None, "kd")
    with pytest.raises(LakdError, match="pass num_classes"):
        lakd.distiller("resnet8", "resnet14", "kd")
    with pytest.raises(LakdError, match=r"unknown config key 'sdm.split'.*did you mean"):
        lakd.distiller(ex.MyNet(), ex.MyNet(), "lakd", image_size=32, options={"sdm": {"split": [1]}})
    with pytest.raises(LakdError, match="unknown method"):
        lakd.distiller(ex.MyNet(), ex.MyNet(), "lakdd")
    d = lakd.distiller("resnet8", "resnet14", "kd", num_classes=10)  # names work too
    assert d.student.feature_info()["num_classes"] == 10


def _lakd(*args):
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-m", "lakd", *args], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    return res.stdout


@pytest.mark.slow
def test_names_in_configs_train_eval_bench_and_models_blocks(tmp_path):
    """`module:` names with options through `lakd train`, `lakd eval` (rebuilt from the recorded options),
    `lakd bench memory --image-size` and `lakd models --blocks`."""
    net = "module:examples.distil_own_loop:MyNet"
    _lakd("train", "method=lakd", "data.dataset=digits", f"model.name={net}", "model.kwargs={width: 8}",
          "model.blocks=[stage1,stage2,stage3]", f"teacher.name={net}", "teacher.blocks=[stage1,stage2,stage3]",
          "solver.epochs=1", "solver.max_steps_per_epoch=1", "data.train_subset=32", "data.test_subset=16",
          "train.threads=1", "train.progress=false", f"output_dir={tmp_path}", "experiment=ext")
    out = _lakd("eval", "--checkpoint", str(tmp_path / "ext" / "best.pt"), "data.test_subset=16")
    assert "top-1" in out and "16 images" in out
    out = _lakd("bench", "memory", "--teacher", net, "--student", net, "--methods", "scratch,lakd", "--image-size",
                "24", "--batch-size", "4", "--num-classes", "4", "--device", "cpu", "model.blocks=[stage1,stage3]",
                "teacher.blocks=[stage1,stage3]")
    assert "24px" in out and "lakd" in out
    out = _lakd("models", "--blocks", net, "--image-size", "16")
    assert "S stem" in out and "B stage3" in out and "64x4x4" in out
