"""What a training step costs: ``lakd bench`` for every method and variant, the allocator-level and
saved-tensor memory meters, teacher-first ordering (KD's peak = scratch's) and LAKD's local backward lowering
the peak (``lakd/analysis/cost.py``)."""
from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys

import pytest
import torch

from lakd.analysis.cost import SavedTensorMeter, measure_memory
from lakd.cli.main import main as cli_main
from lakd.engine.step import training_step

pytestmark = pytest.mark.usefixtures("one_thread")


ALL_METHODS = ["scratch", "kd", "fitnet", "at", "rkd", "crd", "ofd", "catkd", "dkd", "lakd", "lakd_joint"]


@pytest.mark.parametrize("what,key", [("speed", "images_per_s"), ("memory", "peak_bytes")])
def test_bench_json_for_every_method(what, key):
    args = ["bench", what, "--student", "resnet8", "--teacher", "resnet14", "--batch-size", "8",
            "--num-classes", "10", "--device", "cpu", "--methods", ",".join(ALL_METHODS), "--json"]
    if what == "speed":  # train.malloc=true logs a line: it must not reach the JSON on stdout
        args += ["--steps", "1", "--warmup", "1", "--rounds", "2", "train.malloc=true"]
    else:
        args += ["--same-process"]
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = cli_main(args)
    assert rc == 0
    out = json.loads(buf.getvalue())
    assert out["batch_size"] == 8 and out["device"].startswith("cpu")
    assert list(out["results"]) == ALL_METHODS
    for m, r in out["results"].items():
        assert {key, "ratio_to_scratch"} <= set(r), m
        assert r[key] > 0
        assert r["ratio_to_scratch"] == pytest.approx(r[key] / out["results"]["scratch"][key])
    assert out["results"]["scratch"]["ratio_to_scratch"] == 1.0
    if what == "speed":
        assert out["malloc_tuned"] is (sys.platform == "linux")
        assert all(len(r["per_round"]) == 2 and r["images_per_s"] == max(r["per_round"])
                   for r in out["results"].values())
    if what == "memory":
        assert "allocator" in out["measure"]
        res = out["results"]
        assert res["lakd"]["peak_bytes"] < res["lakd_joint"]["peak_bytes"]
        for m, r in res.items():  # the saved-for-backward count stays, as its own labelled column
            assert r["saved_bytes"] > 0 and r["resident_bytes"] > 0, m


@pytest.mark.slow
def test_teacher_first_kd_peak_equals_scratch_at_the_allocator_and_lakd_is_lower():
    """Every method runs the teacher before the student, so KD's allocator-level peak is scratch's (within 2%);
    LAKD's interleaved local backward is far below; one joint backward is above. Each method in a fresh
    process; the operating system's peak resident set agrees with the allocator count."""
    out = measure_memory("resnet56", "resnet20", ["scratch", "kd", "lakd", "lakd_joint"], batch_size=16,
                         num_classes=10, device="cpu", overrides=["sdm.splits=[1,4,9]"])
    r = {m: v["peak_bytes"] for m, v in out["results"].items()}
    assert "allocator" in out["measure"] and "fresh process" in out["measure"]
    assert r["kd"] == pytest.approx(r["scratch"], rel=0.02), r
    assert r["lakd"] < 0.7 * r["scratch"], r
    assert r["lakd_joint"] >= 1.0 * r["scratch"], r
    for m, v in out["results"].items():
        if "rss_peak_bytes" in v:  # Linux: the independent check within 10% of the allocator figure
            assert v["rss_peak_bytes"] == pytest.approx(v["peak_bytes"], rel=0.1), (m, v)


_METER_BY_HAND = """
import json, torch
from lakd.analysis.cost import AllocatorMeter
a = torch.empty(1000, dtype=torch.float32)  # allocated before the block: the profiler does not see its free
with AllocatorMeter("cpu") as meter:
    b = torch.empty(2000, dtype=torch.float32)  # +8,000
    c = torch.empty(500, dtype=torch.float64)  # +4,000 -> peak 12,000
    del b  # -8,000
    d = torch.empty(1000, dtype=torch.float32)  # +4,000
    del a  # -4,000
print(json.dumps({"peak": meter.peak, "end": meter.end}))
"""


def test_allocator_meter_by_hand():
    # in a fresh process: the meter counts every allocator event of the process, and threads that earlier tests
    # left running in this one (data loaders, writers) can allocate or free during the block
    out = subprocess.run([sys.executable, "-c", _METER_BY_HAND], capture_output=True, text=True, timeout=120,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0, out.stderr[-2000:]
    meter = json.loads(out.stdout.strip().splitlines()[-1])
    assert meter["peak"] == 12_000
    assert meter["end"] == 4_000 + 4_000


def test_saved_tensor_meter_by_hand_and_release(make_distiller, image_batch):
    meter = SavedTensorMeter()
    a = torch.randn(10, requires_grad=True)
    b = torch.randn(10, requires_grad=True)
    with meter.hooks():
        c = a * b  # saves a and b: 2 x 40 bytes
        assert meter.current == 80
        d = c.exp()  # saves its result: 40 bytes
        e = (d * a).sum()  # saves d (already counted) and a (already counted: same storage)
    assert meter.current == 120 and meter.peak == 120
    e.backward()
    assert meter.current == 0 and meter.live == {} and meter.peak == 120
    # a whole LAKD step (local backward) releases everything too
    d = make_distiller("lakd", extra=["sdm.splits=[1,2,3]"])
    params = d.trainable_parameters()
    opt = torch.optim.SGD(params, lr=0.01)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    meter = SavedTensorMeter()
    with meter.hooks():
        training_step(d, opt, scaler, image_batch())
    assert meter.peak > 0 and meter.current == 0 and meter.live == {}


@pytest.mark.parametrize("argv,words", [
    (["bench", "memory", "--num-classes", "0"], ["--num-classes 0", "at least 2"]),
    (["bench", "speed", "--steps", "0"], ["--steps 0", "at least one step"]),
    (["bench", "speed", "--rounds", "0"], ["--rounds"]),
])
def test_bench_refuses_meaningless_sizes(argv, words, capsys):
    assert cli_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1
    assert all(w in err for w in words)


def test_cuda_peak_breakdown_from_a_synthetic_allocator_history(monkeypatch):
    """benchmarks/gpu_memory_peak.py: the peak of a recorded window and what is alive at it, read from the
    shape of torch.cuda.memory._snapshot() (checked here without a GPU on a history made by hand)."""
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from gpu_memory_peak import analyze

    fwd = [{"filename": "/x/torch/nn/modules/conv.py", "line": 1, "name": "_conv_forward"},
           {"filename": "/repo/lakd/models/resnet_cifar.py", "line": 30, "name": "forward"},
           {"filename": "/repo/lakd/engine/step.py", "line": 50, "name": "training_step"}]
    loss = [{"filename": "/repo/lakd/distillers/lakd.py", "line": 60, "name": "feature_loss"}]
    ev = [
        {"action": "free_completed", "addr": 99, "size": 1000},  # a block from before the window: ignored
        {"action": "alloc", "addr": 1, "size": 400, "frames": fwd},
        {"action": "alloc", "addr": 2, "size": 300, "frames": fwd},
        {"action": "alloc", "addr": 3, "size": 100, "frames": loss},
        {"action": "free_requested", "addr": 3, "size": 100},
        {"action": "free_completed", "addr": 3, "size": 100},
        {"action": "alloc", "addr": 4, "size": 250, "frames": []},  # backward: no Python frame -> peak 950
        {"action": "free_requested", "addr": 1, "size": 400},  # no free_completed for 1: the request counts
        {"action": "alloc", "addr": 5, "size": 200, "frames": []},  # 750: below the peak
    ]
    r = analyze({"device_traces": [ev]}, top=1)
    assert r["peak_bytes"] == 950 and r["live_blocks_at_peak"] == 3
    assert r["peak_reached_by"]["size"] == 250 and r["peak_reached_by"]["site"].startswith("(no Python frame")
    assert r["sites"] == [{"site": "lakd/models/resnet_cifar.py:30 forward", "bytes": 700, "blocks": 2}]
    assert r["other_bytes"] == 250
