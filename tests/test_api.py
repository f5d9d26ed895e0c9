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


# ----- one's own loop: the hints say exactly what to pass, with values that work ------------------------------------
def test_crd_in_ones_own_loop_names_num_data_and_the_index():
    import re

    ex = load_example()
    opts = {"student_options": {"blocks": ["stage1", "stage2", "stage3"]},
            "teacher_options": {"blocks": ["stage1", "stage2", "stage3"]}, "options": {"crd": {"nce_k": 8}}}
    with pytest.raises(LakdError) as info:
        lakd.distiller(ex.MyNet(width=8), ex.MyNet(width=8), "crd", image_size=32, **opts)
    msg = str(info.value)
    assert "num_data=len(train_dataset)" in msg and '"index"' in msg and "__getitem__(i) returns (image, target, i)" in msg
    torch.manual_seed(0)
    data = ex.Stripes(48)
    d = lakd.distiller(ex.MyNet(width=8), ex.MyNet(width=8), "crd", image_size=32, num_data=len(data), **opts)
    x, y = data.images[:16], data.labels[:16]
    with pytest.raises(LakdError) as info:
        d.train_step({"image": x, "target": y}, backward=lambda loss: loss.backward())
    msg = str(info.value)
    assert "position in the training set (0..47)" in msg and 'batch["index"]' in msg and '"index": i' in msg
    with pytest.raises(LakdError, match=r"holds 40\.\.55, outside 0\.\.47.*num_data=len\(train_dataset\) \(now 48\)"):
        d.train_step({"image": x, "target": y, "index": torch.arange(40, 56)}, backward=lambda loss: loss.backward())
    # the fix the messages give: a Dataset returning (image, target, i) and "index" in the batch
    loader = torch.utils.data.DataLoader(data, batch_size=16)
    for x, y, i in loader:
        _, losses = d.train_step({"image": x, "target": y, "index": i}, backward=lambda loss: loss.backward())
        assert set(losses) == {"ce", "crd"} and all(torch.isfinite(v) for v in losses.values())
    # README's own loop says the same
    with open(os.path.join(ROOT, "README.md")) as f:
        own_loop = f.read().split("## Your own teacher and student", 1)[1].split("\n## ", 1)[0]
    assert re.search(r'"crd", num_data=len\(train_set\)', own_loop) and '"index": i}' in own_loop


class FourBlockCNN(torch.nn.Module):
    """A user's teacher: four conv blocks (each halving the map), pooling, a linear classifier."""

    def __init__(self, num_classes=10):
        super().__init__()
        nn = torch.nn

        def block(cin, cout):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2))

        self.b1, self.b2, self.b3, self.b4 = block(3, 8), block(8, 16), block(16, 32), block(32, 32)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.b4(self.b3(self.b2(self.b1(x))))), 1))


def _suggested(msg: str) -> tuple[dict, dict | None]:
    """The values a hint suggests: its options={...} and, when given, teacher_options={...}."""
    import ast
    import re

    opts = ast.literal_eval(re.search(r"options=(\{\"sdm\": \{[^}]*\}\})", msg).group(1))
    t = re.search(r"teacher_options=(\{\"blocks\": \[[^]]*\]\})", msg)
    return opts, (ast.literal_eval(t.group(1)) if t else None)


def test_lakd_hint_for_a_teacher_with_fewer_stages_gives_working_values():
    """A torchvision resnet18 student (4 stages at 32px: 8x8 .. 1x1) and a user's 4-block CNN teacher, whose first
    block the adapter takes as the stem (3 stages: 8x8, 4x4, 2x2)."""
    import torchvision

    from lakd.distillers.lakd import STAGE_RULE

    def student():
        torch.manual_seed(0)
        return torchvision.models.resnet18(num_classes=10)

    b = {"image": torch.randn(4, 3, 32, 32), "target": torch.randint(0, 10, (4,))}
    with pytest.raises(LakdError) as info:
        lakd.distiller(student(), FourBlockCNN(), "lakd", image_size=32)
    msg = str(info.value)
    assert "\n" not in msg
    assert "sdm.splits is not set (default: one local module per student stage)" in msg  # the default, said so
    assert "4 stages make 4 modules (sdm.splits=[2, 4, 6, 8]; maps 8x8, 4x4, 2x2, 1x1)" in msg
    assert "the teacher FourBlockCNN has 3 stages (ending at blocks [1, 2, 3] of its 3; maps 8x8, 4x4, 2x2)" in msg
    assert STAGE_RULE in msg  # the rule
    assert "took the teacher's first top-level module 'b1' as its stem" in msg and "'b2', 'b3', 'b4'" in msg
    assert "(1..3)" not in msg  # no impossible request (4 indices out of 3)
    opts, t_opts = _suggested(msg)
    assert opts == {"sdm": {"splits": [2, 4, 8], "teacher_points": [1, 2, 3]}}
    d = lakd.distiller(student(), FourBlockCNN(), "lakd", image_size=32, options=opts)  # the first fix works
    _, losses = d.train_step(b, backward=lambda loss: loss.backward())
    assert {"feat1", "feat2", "feat3"} <= set(losses) and all(torch.isfinite(v) for v in losses.values())
    assert t_opts == {"blocks": ["b1", "b2", "b3", "b4"]}
    d = lakd.distiller(student(), FourBlockCNN(), "lakd", image_size=32, teacher_options=t_opts)  # and the other
    assert d.splits == [2, 4, 6, 8] and d.teacher_points == [1, 2, 3, 4]
    # splits the user chose: said as theirs; the example keeps them when the teacher has blocks enough
    with pytest.raises(LakdError) as info:
        lakd.distiller(student(), FourBlockCNN(), "lakd", image_size=32, options={"sdm": {"splits": [4, 8]}})
    msg = str(info.value)
    assert "sdm.splits=[4, 8] makes 2 local modules, but the teacher FourBlockCNN has 3 stages" in msg
    opts, _ = _suggested(msg)
    assert opts["sdm"]["splits"] == [4, 8]
    lakd.distiller(student(), FourBlockCNN(), "lakd", image_size=32, options=opts)
    # teacher_points that cannot work: the example that does
    with pytest.raises(LakdError) as info:
        lakd.distiller(student(), FourBlockCNN(), "lakd", image_size=32,
                       options={"sdm": {"splits": [2, 4, 8], "teacher_points": [1, 2, 4]}})
    msg = str(info.value)
    assert "must hold 3 teacher block indices in 1..3" in msg and "has 3 blocks" in msg
    lakd.distiller(student(), FourBlockCNN(), "lakd", image_size=32, options=_suggested(msg)[0])
