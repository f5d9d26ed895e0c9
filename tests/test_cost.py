"""What a training step costs: ``lakd bench`` for every method and variant, the saved-tensor memory meter,
and LAKD's local backward lowering the peak (``lakd/analysis/cost.py``)."""
from __future__ import annotations

import contextlib
import io
import json

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
    if what == "speed":
        args += ["--steps", "1", "--warmup", "1"]
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = cli_main(args)
    assert rc == 0
    out = json.loads(buf.getvalue())
    assert out["batch_size"] == 8 and out["device"].startswith("cpu")
    assert list(out["results"]) == ALL_METHODS
    for m, r in out["results"].items():
        assert set(r) == {key, "ratio_to_scratch"}, m
        assert r[key] > 0
        assert r["ratio_to_scratch"] == pytest.approx(r[key] / out["results"]["scratch"][key])
    assert out["results"]["scratch"]["ratio_to_scratch"] == 1.0
    if what == "memory":
        res = out["results"]
        assert res["lakd"]["peak_bytes"] < res["scratch"]["peak_bytes"] < res["lakd_joint"]["peak_bytes"]


def test_local_backward_lowers_the_saved_tensor_peak():
    out = measure_memory("resnet56", "resnet20", ["scratch", "lakd", "lakd_joint"], batch_size=16,
                         num_classes=100, device="cpu")
    r = {m: v["peak_bytes"] for m, v in out["results"].items()}
    assert r["lakd"] < 0.8 * r["scratch"], r
    assert r["lakd_joint"] >= 0.95 * r["scratch"], r


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
        training_step(d, opt, scaler, image_batch(), params)
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
