"""The trainer's speed switches: ``train.channels_last`` and ``train.compile`` give the eager, contiguous
results."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.nn as nn

from lakd.config import load_config
from lakd.engine.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")


def _one_step_run(digits_overrides, name, extra):
    cfg = load_config(None, digits_overrides(extra=["solver.max_steps_per_epoch=1", "sdm.splits=[1,2,3]",
                                                              f"experiment={name}", *extra]))
    tr = Trainer(cfg, quiet=True)
    return tr, tr.fit()


def test_channels_last_matches_contiguous(tmp_path, digits_overrides):
    tr_cl, _ = _one_step_run(digits_overrides, "cl", ["train.channels_last=true"])
    tr_c, _ = _one_step_run(digits_overrides, "contig", [])
    convs = [p for n, p in tr_cl.distiller.named_parameters() if p.ndim == 4 and p.shape[-1] == 3]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
                         for p in convs)  # still after the optimizer step
    teacher_conv = next(p for p in tr_cl.distiller.teacher.parameters() if p.ndim == 4 and p.shape[-1] == 3)
    assert teacher_conv.is_contiguous(memory_format=torch.channels_last)
    img = next(iter(tr_cl.data.train))["image"]
    assert img.is_contiguous(memory_format=torch.channels_last) and not img.is_contiguous()
    assert next(iter(tr_c.data.train))["image"].is_contiguous()
    a, b = tr_cl.history[0], tr_c.history[0]
    assert a["losses"].keys() == b["losses"].keys()
    for k in a["losses"]:
        assert a["losses"][k] == pytest.approx(b["losses"][k], rel=1e-5, abs=1e-6), k
    assert a["test_loss"] == pytest.approx(b["test_loss"], rel=1e-4)
    for (n, p), q in zip(tr_cl.distiller.student.named_parameters(), tr_c.distiller.student.parameters()):
        assert torch.allclose(p, q, atol=1e-5), n


def _compiled_aot_eager(monkeypatch, run):
    """``run()`` with every ``nn.Module.compile`` going through dynamo + AOTAutograd (the ``aot_eager``
    backend: seconds, not inductor's minutes of C++); returns (its result, the modules compiled, dynamo graphs)."""
    import torch._dynamo

    calls = []
    original = nn.Module.compile

    def compile_aot(self, *args, **kwargs):
        calls.append(type(self).__name__)
        kwargs.setdefault("backend", "aot_eager")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(nn.Module, "compile", compile_aot)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    try:
        out = run()
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    finally:
        torch._dynamo.reset()
        monkeypatch.undo()
    return out, calls, graphs


@pytest.mark.slow
def test_compile_switch_runs_lakd_like_eager(tmp_path, monkeypatch, digits_overrides):
    """``train.compile`` compiles every block in place; run it through dynamo + AOTAutograd and check the
    local-backward step gives the eager losses. The inductor (C++ codegen) variant is ``test_compile_inductor``
    below."""
    (tr, _), calls, graphs = _compiled_aot_eager(monkeypatch, lambda: _one_step_run(
        digits_overrides, "compiled", ["train.compile=true", "solver.max_steps_per_epoch=2"]))
    assert graphs >= 3  # the blocks really went through dynamo (not silently eager)
    # resnet8 student and teacher: 3 blocks each
    assert len(calls) == 6
    assert all(getattr(m, "_compiled_call_impl", None) is not None
               for i in range(3) for m in tr.distiller.student.block_modules(i))
    eager, _ = _one_step_run(digits_overrides, "eager", ["solver.max_steps_per_epoch=2"])
    for k, v in eager.history[0]["losses"].items():
        assert tr.history[0]["losses"][k] == pytest.approx(v, rel=1e-4, abs=1e-5), k


@pytest.mark.parametrize("net, blocks, kwargs", [
    ("SkipNet", "[a,b,c]", "{width: 12}"),  # a value carried across a cut
    ("TokenNet", "[s1,s2]", "{dim: 12}"),  # B x H x W x C maps
    ("ModeNet", "[a,b]", "{width: 12}"),  # train and eval graphs differ: both compiled
])
def test_compile_and_channels_last_on_adapted_networks(tmp_path, monkeypatch, digits_overrides, net, blocks, kwargs):
    """User networks adapted by torch.fx (tests/test_adapter.py's) under ``train.compile`` (through dynamo) and
    ``train.channels_last``: LAKD's local-backward step gives the eager, contiguous losses."""
    n = blocks.count(",") + 1
    points = f"[{','.join(str(i) for i in range(1, n + 1))}]"
    adapted = [f"model.name=module:test_adapter:{net}", f"model.blocks={blocks}",
               f"teacher.name=module:test_adapter:{net}", f"teacher.kwargs={kwargs}", f"teacher.blocks={blocks}",
               f"sdm.splits={points}", f"sdm.teacher_points={points}", "solver.max_steps_per_epoch=2"]
    (tr, _), calls, graphs = _compiled_aot_eager(monkeypatch, lambda: _one_step_run(
        digits_overrides, "compiled", [*adapted, "train.compile=true", "train.channels_last=true"]))
    modes = 2 if net == "ModeNet" else 1  # one piece per mode and block, student and teacher
    assert len(calls) == 2 * n * modes and graphs >= n  # every piece of student and teacher went through dynamo
    assert all(getattr(m, "_compiled_call_impl", None) is not None
               for i in range(n) for m in tr.distiller.student.block_modules(i))
    eager, _ = _one_step_run(digits_overrides, "eager", [*adapted, "train.channels_last=false"])
    assert tr.history[0]["losses"].keys() == eager.history[0]["losses"].keys()
    for k, v in eager.history[0]["losses"].items():
        assert tr.history[0]["losses"][k] == pytest.approx(v, rel=1e-4, abs=1e-5), k
    assert tr.history[0]["test_loss"] == pytest.approx(eager.history[0]["test_loss"], rel=1e-4)


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("LAKD_TEST_INDUCTOR"),
                    reason="inductor compiles C++ for every block: ~70 s on 2 cores with a cold cache; "
                           "set LAKD_TEST_INDUCTOR=1 to run")
def test_compile_inductor(tmp_path, digits_overrides):
    import torch._dynamo

    torch._dynamo.reset()
    try:
        tr, summary = _one_step_run(digits_overrides, "inductor", ["train.compile=true", "solver.max_steps_per_epoch=2"])
    finally:
        torch._dynamo.reset()
    assert all(np.isfinite(v) for v in tr.history[0]["losses"].values()) and summary["final_top1"] is not None
