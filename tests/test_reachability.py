"""The reachability check at construction: every trainable parameter gets a gradient from some loss, or the
distiller is refused with a one-line error naming the stranded parameters and the fix; the dry step leaves no
trace (weights, gradients, BatchNorm statistics, the method's state, the RNG)."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import lakd
from lakd.config import load_config
from lakd.distillers.base import Distiller
from lakd.distillers.kd import KD
from lakd.errors import LakdError
from lakd.models import create_model

pytestmark = pytest.mark.usefixtures("one_thread")

BAD = ["block1", "block2", "down", "block3"]
GOOD = ["block1", "block2", "block3"]


def _unit(cin, cout, stride=1):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class LongSkip(nn.Module):
    """``x3 = block3(block2(block1(x0)) + down(x0))``: the stem's output skips over two blocks into the third."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.stem, self.block1, self.block2 = _unit(3, 8), _unit(8, 16, 2), _unit(16, 16)
        self.down, self.block3 = nn.Conv2d(8, 16, 1, 2), _unit(16, 32, 2)
        self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(32, num_classes)

    def forward(self, x):
        x0 = self.stem(x)
        x3 = self.block3(self.block2(self.block1(x0)) + self.down(x0))
        return self.fc(torch.flatten(self.pool(x3), 1))


def _lakd(cuts, student=None, **kw):
    torch.manual_seed(0)
    return lakd.distiller(student or LongSkip(), LongSkip(), method="lakd", image_size=16,
                          student_options={"blocks": cuts}, teacher_options={"blocks": cuts}, **kw)


def test_long_skip_with_bad_cuts_is_refused_naming_block2():
    with pytest.raises(LakdError) as e:
        _lakd(BAD)
    msg = str(e.value)
    assert "\n" not in msg and "block2.0.weight" in msg and "model.blocks" in msg
    assert "trainable parameters get no gradient" in msg and "train.check_reachability=false" in msg


def test_long_skip_with_dominating_cuts_trains_every_parameter():
    d = _lakd(GOOD)
    batch = {"image": torch.randn(4, 3, 16, 16), "target": torch.tensor([0, 1, 2, 3])}
    d.train_step(batch, lambda loss: loss.backward())
    assert all(p.grad is not None for p in d.trainable_parameters())


def test_frozen_parameters_are_not_reported_and_the_check_can_be_switched_off():
    net = LongSkip()
    for p in [*net.block1.parameters(), *net.block2.parameters()]:
        p.requires_grad_(False)
    _lakd(BAD, student=net)  # the stranded blocks are frozen on purpose: accepted
    _lakd(BAD, options={"train": {"check_reachability": False}})


def test_a_method_declares_parameters_a_step_may_leave_unused():
    class Spare(KD):
        unreached_ok = ("spare*",)

        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self.spare = nn.Parameter(torch.zeros(3))

    cfg = load_config(None, ["method=kd", "model.name=resnet8", "teacher.name=resnet8"])
    d = Spare(create_model("resnet8", 10), create_model("resnet8", 10), cfg)
    assert d.unreached_parameters(16) == []
    Spare.unreached_ok = ()
    assert d.unreached_parameters(16) == ["spare"]


def test_the_dry_step_leaves_no_trace(make_distiller):
    d = make_distiller("crd", extra=["crd.nce_k=63"])  # memory banks and a draw counter, rebound by its update
    for p in d.trainable_parameters()[:3]:
        p.grad = torch.full_like(p, 0.5)
    d.eval()
    before = {k: v.clone() for k, v in d.state_dict().items()}
    grads = [None if p.grad is None else p.grad.clone() for p in d.trainable_parameters()]
    rng = torch.random.get_rng_state()
    assert d.unreached_parameters(16) == []
    after = d.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert all((g is None and p.grad is None) or torch.equal(g, p.grad)
               for g, p in zip(grads, d.trainable_parameters()))
    assert torch.equal(rng, torch.random.get_rng_state())
    assert not any(m.training for m in d.modules())


def test_both_build_paths_run_the_check(monkeypatch):
    monkeypatch.setattr(Distiller, "unreached_parameters", lambda self, *a, **kw: ["student.fc.weight"])
    cfg = load_config(None, ["method=kd", "model.name=resnet8", "teacher.name=resnet8", "model.num_classes=10"])
    with pytest.raises(LakdError, match="1 trainable parameters get no gradient.*fc.weight"):
        lakd.build(cfg, device="cpu", num_data=8, warn=False)
    cfg["train"]["check_reachability"] = False
    lakd.build(cfg, device="cpu", num_data=8, warn=False)
    with pytest.raises(LakdError, match="fc.weight"):
        lakd.distiller("resnet8", "resnet8", method="kd", num_classes=10)
