"""``lakd bench gradients`` (``lakd.analysis.gradients``): each loss term's gradient norm on a fresh student, the
scale check before a long run. Checked against a plain ``backward()`` on the same batch, for linearity in a
term's weight, and through the command line (table, JSON, ``--against``, bad input)."""
from __future__ import annotations

import json

import pytest
import torch

from lakd.analysis.gradients import start_gradients
from lakd.cli.main import main
from lakd.config import load_config
from lakd.engine.build import build
from lakd.runtime.seeding import seed_everything


def _kd(digits_overrides, *extra):
    return load_config(None, digits_overrides("kd", ["model.name=resnet8", "teacher.name=resnet14", *extra]))


def test_the_total_equals_a_plain_backward_on_the_first_batch(digits_overrides):
    """An independent computation: the same seed, the same first batch, ``loss.backward()`` and the norm of the
    parameters' ``.grad``."""
    cfg = _kd(digits_overrides)
    g = start_gradients(cfg, batches=1)
    assert set(g) == {"ce", "kd", "total"}
    seed_everything(int(cfg["seed"]))
    built = build(cfg, device="cpu", warn=False)
    d = built.distiller
    d.set_epoch(0, int(cfg["solver"]["epochs"]))
    d.train()
    built.data.train.set_epoch(0)
    batch = next(iter(built.data.train))
    _, losses = d.forward_train(**batch)
    sum(losses.values()).backward()
    norm = torch.sqrt(sum((p.grad ** 2).sum() for p in d.student.parameters() if p.grad is not None)).item()
    assert g["total"] == pytest.approx(norm, rel=1e-5)
    assert g["ce"] > 0 and g["kd"] > 0 and g["total"] <= g["ce"] + g["kd"] + 1e-6  # triangle inequality


def test_a_terms_figure_is_linear_in_its_weight_and_leaves_the_others(digits_overrides):
    g1 = start_gradients(_kd(digits_overrides), batches=2)
    g3 = start_gradients(_kd(digits_overrides, "kd.kd_weight=2.7"), batches=2)  # 3x the default 0.9
    assert g3["kd"] == pytest.approx(3 * g1["kd"], rel=1e-5)
    assert g3["ce"] == pytest.approx(g1["ce"], rel=1e-6)


def test_the_command_prints_each_term_and_the_ratio_to_the_method_against(digits_overrides, capsys):
    over = digits_overrides("kd", ["teacher.name=resnet14"])
    assert main(["bench", "gradients", *over, "--batches", "2", "--against", "scratch"]) == 0
    out = capsys.readouterr().out
    lines = [line.split() for line in out.splitlines()[2:]]
    assert [row[:2] for row in lines] == [["kd", "ce"], ["kd", "kd"], ["kd", "total"], ["scratch", "ce"],
                                          ["scratch", "total"]]
    assert lines[-1][3] == "1.00x"
    assert main(["bench", "gradients", *over, "--batches", "2", "--against", "scratch", "--json"]) == 0
    js = json.loads(capsys.readouterr().out)
    assert js["method"] == "kd" and js["against"]["method"] == "scratch" and js["batches"] == 2
    # the same figures as the library's, and scratch's total is its cross-entropy alone
    assert js["gradients"] == pytest.approx(start_gradients(load_config(None, over), batches=2), rel=1e-6)
    assert js["against"]["gradients"]["total"] == pytest.approx(js["against"]["gradients"]["ce"], rel=1e-6)
    # the method's main loss at the first step: the ratio of kd's CE at weight 0.1 to scratch's CE at 1 is 0.1
    assert js["gradients"]["ce"] == pytest.approx(0.1 * js["against"]["gradients"]["ce"], rel=1e-5)


def test_against_a_variant_applies_its_settings(digits_overrides, capsys):
    """``--against kd_ls``: KD with logit standardization and its KD weight, as ``lakd methods`` lists it."""
    over = digits_overrides("kd", ["teacher.name=resnet14"])
    assert main(["bench", "gradients", *over, "--batches", "1", "--against", "kd_ls", "--json"]) == 0
    js = json.loads(capsys.readouterr().out)
    ls = start_gradients(load_config(None, over + ["kd.logit_stand=true", "kd.kd_weight=9.0", "kd.T=2.0"]), 1)
    assert js["against"]["method"] == "kd_ls" and js["against"]["gradients"] == pytest.approx(ls, rel=1e-6)


@pytest.mark.parametrize("extra, words", [(["--batches", "0"], ["--batches 0", "at least one"]),
                                          (["--against", "nosuchmethod"], ["nosuchmethod"])])
def test_bad_input_is_one_line_and_exit_2(digits_overrides, capsys, extra, words):
    assert main(["bench", "gradients", *digits_overrides("kd"), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1
    assert all(w in err for w in words)
