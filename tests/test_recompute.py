"""LAKD's ``sdm.recompute``: activation checkpointing per student block gives the step of ``sdm.recompute=false``
(gradients, losses, BatchNorm running statistics), on the zoo and on adapted networks (a ``Carry`` between blocks),
lowers the allocator peak of a step, and bad values are one-line errors. CPU, small batches."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torchvision
from test_adapter import SkipNet  # tests/ is on sys.path under pytest (rootdir-relative imports)

import lakd
from lakd.analysis.cost import measure_memory
from lakd.errors import LakdError
from lakd.models import adapt

pytestmark = pytest.mark.usefixtures("one_thread")


def SkipDropNet(width=8):
    """tests/test_adapter.py's user network with a BatchNorm in block ``a`` and dropout 0.3 in ``b``: the stem
    output is carried across the cut after ``a`` (a ``Carry``), and recomputation must draw the same mask."""
    return SkipNet(width=width, bn_a=True, dropout=0.3)


def bn_calls(model):
    """A counter of BatchNorm forward calls in ``model`` (recomputation runs them again)."""
    calls = [0]

    def hook(*_):
        calls[0] += 1

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    return calls, handles


def one_step(d, batch):
    d.zero_grad(set_to_none=True)
    calls, handles = bn_calls(d.student)
    torch.manual_seed(5)  # the same dropout masks in both runs (the recompute replays the forward's RNG state)
    logits, losses = d.train_step(batch, lambda loss: loss.backward())
    for h in handles:
        h.remove()
    return logits, losses, calls[0]


def assert_same_step(plain, rec, batch):
    """One local-backward step of each from the same state: the same logits, losses, gradients and buffers, and
    the recomputing one really ran blocks twice."""
    la, lo_a, calls_a = one_step(plain, batch)
    lb, lo_b, calls_b = one_step(rec, batch)
    assert calls_b > calls_a  # the backward recomputed blocks
    assert torch.allclose(la, lb, atol=1e-6, rtol=0)
    assert lo_a.keys() == lo_b.keys()
    for k in lo_a:
        assert torch.allclose(lo_a[k], lo_b[k], atol=1e-6, rtol=0), k
    pa, pb = dict(plain.named_trainable_parameters()), dict(rec.named_trainable_parameters())
    assert pa.keys() == pb.keys()
    for n in pa:
        ga, gb = pa[n].grad, pb[n].grad
        assert (ga is None) == (gb is None), n
        if ga is not None:
            assert (ga - gb).abs().max().item() <= 1e-6, n
    ba, bb = dict(plain.named_buffers()), dict(rec.named_buffers())
    assert ba.keys() == bb.keys()
    for n in ba:  # running_mean / running_var / num_batches_tracked: updated once, not again by the recompute
        assert torch.equal(ba[n], bb[n]), n


@pytest.mark.parametrize("splits", ["[3,6,9]", "[1,4,9]"])
def test_recompute_step_equals_plain_step_with_bn_stats(splits, make_distiller, image_batch):
    plain = make_distiller("lakd", student="resnet20", teacher="resnet8", extra=[f"sdm.splits={splits}"])
    rec = make_distiller("lakd", student="resnet20", teacher="resnet8",
                         extra=[f"sdm.splits={splits}", "sdm.recompute=true"])
    assert rec.recompute and not plain.recompute and rec.local_backward
    b = image_batch(n=6)
    assert_same_step(plain, rec, b)
    # BatchNorm saw one training batch, once
    counts = {int(m.num_batches_tracked) for m in rec.student.modules() if isinstance(m, nn.BatchNorm2d)}
    assert counts == {1}
    # and a second step from there still agrees (running statistics carried from the first)
    assert_same_step(plain, rec, image_batch(n=6, seed=2))


def test_recompute_runs_the_stem_again(make_distiller, image_batch):
    """The stem is checkpointed too (the largest maps of an ImageNet network): its forward runs twice."""
    for recompute, runs in ((False, 1), (True, 2)):
        d = make_distiller("lakd", student="resnet20", teacher="resnet8", extra=[f"sdm.recompute={recompute}"])
        calls = [0]
        d.student.conv1.register_forward_hook(lambda *_, calls=calls: calls.__setitem__(0, calls[0] + 1))
        d.train_step(image_batch(n=4), lambda loss: loss.backward())
        assert calls[0] == runs and d.student.conv1.weight.grad is not None


def test_recompute_with_joint_backward_equals_plain(make_distiller, image_batch):
    extra = ["sdm.splits=[3,6,9]", "sdm.backward=joint"]
    plain = make_distiller("lakd", student="resnet20", teacher="resnet8", extra=extra)
    rec = make_distiller("lakd", student="resnet20", teacher="resnet8", extra=extra + ["sdm.recompute=true"])
    assert_same_step(plain, rec, image_batch(n=4))


def test_recompute_on_adapted_networks_with_a_carry(image_batch):
    """Adapted networks pass a ``Carry`` between blocks: a skip across a cut (module 1 = blocks a, b with the stem
    output carried into b; dropout in b) and torchvision's MobileNetV3-Small (BatchNorm, squeeze-excitation)."""

    def skipnet(recompute):
        torch.manual_seed(0)
        return lakd.distiller(SkipDropNet(), SkipDropNet(width=12), "lakd", image_size=32,
                              student_options={"blocks": ["a", "b", "c"]}, teacher_options={"blocks": ["a", "b", "c"]},
                              options={"sdm": {"splits": [2, 3], "teacher_points": [2, 3], "recompute": recompute}})

    b = image_batch(n=4)
    plain, rec = skipnet(False), skipnet(True)
    assert len(rec.student._split.pieces_spec[2][0]) == 2  # block b receives two values (the skip)
    assert_same_step(plain, rec, b)

    torch.manual_seed(0)
    s = adapt(torchvision.models.mobilenet_v3_small(num_classes=10), input_size=32)
    t = adapt(torchvision.models.mobilenet_v3_small(num_classes=10), input_size=32)
    plain = lakd.distiller(copy.deepcopy(s), copy.deepcopy(t), "lakd", image_size=32)
    rec = lakd.distiller(copy.deepcopy(s), copy.deepcopy(t), "lakd", image_size=32,
                         options={"sdm": {"recompute": True}})
    assert_same_step(plain.train(), rec.train(), b)


def test_recompute_lowers_the_allocator_peak():
    """The CPU allocator's peak over one whole training step (``lakd bench memory``'s figure), in this process:
    module 1 of [3,6,9] (stem + three full-resolution blocks) no longer holds every block's internals."""
    out = measure_memory("resnet8", "resnet20", ["lakd", "lakd_recompute"], batch_size=8, num_classes=10,
                         device="cpu", overrides=["sdm.splits=[3,6,9]", "train.channels_last=false"],
                         isolated=False)
    r = {m: v["peak_bytes"] for m, v in out["results"].items()}
    assert r["lakd_recompute"] < 0.8 * r["lakd"], r
    saved = {m: v["saved_bytes"] for m, v in out["results"].items()}
    assert saved["lakd_recompute"] < 0.6 * saved["lakd"], saved


@pytest.mark.parametrize("value", ["maybe", "1", "[true]"])
def test_bad_recompute_value_is_a_one_line_error(value, make_distiller):
    with pytest.raises(LakdError, match="sdm.recompute must be true or false") as e:
        make_distiller("lakd", student="resnet20", teacher="resnet8", extra=[f"sdm.recompute={value}"])
    assert "\n" not in str(e.value)


def test_recompute_in_a_tiny_run_and_resume_free(digits_overrides):
    """Through the trainer (two steps on the bundled digits); switching it on or off does not change what a
    resumed run computes, so resume accepts it."""
    from lakd.config import config_changes, load_config
    from lakd.engine.trainer import Trainer

    over = digits_overrides("lakd", ["sdm.recompute=true", "sdm.splits=[1,3]", "sdm.teacher_points=[1,3]"])
    summary = Trainer(load_config(None, over), quiet=True).fit()
    assert summary is not None
    a = load_config(None, digits_overrides("lakd"))
    b = load_config(None, digits_overrides("lakd", ["sdm.recompute=true"]))
    assert config_changes(a, b) == {}
