"""Mixed precision (bf16/fp16): autocast steps, fp16 loss scaling through LAKD's local backwards, overflow
handling, NDAM in half precision and the trainer's ``train.amp`` switch."""
from __future__ import annotations

import copy
import json
import os

import numpy as np
import pytest
import torch

from lakd.config import load_config
from lakd.distillers.lakd import ndam_map
from lakd.engine.step import training_step
from lakd.engine.trainer import Trainer
from lakd.runtime.device import AMP_DTYPES

pytestmark = pytest.mark.usefixtures("one_thread")


class RecordingSGD(torch.optim.SGD):
    """SGD that remembers the gradients it was asked to step with (after GradScaler's unscale)."""

    def __init__(self, params, **kw):
        super().__init__(params, **kw)
        self.seen: list[list[torch.Tensor]] = []

    def step(self, closure=None):
        self.seen.append([p.grad.detach().clone() for g in self.param_groups for p in g["params"]])
        return super().step(closure)


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
@pytest.mark.parametrize("method", ["scratch", "kd", "catkd", "lakd"])
def test_amp_steps_run_in_low_precision_and_update(method, amp, make_distiller, image_batch):
    d = make_distiller(method)
    dtype = AMP_DTYPES[amp]
    params = d.trainable_parameters()
    before = [p.detach().clone() for p in params]
    opt = torch.optim.SGD(params, lr=0.05, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0, enabled=amp == "fp16")
    for step in range(2):
        logits, losses = training_step(d, opt, scaler, image_batch(seed=step), dtype)
        assert logits.dtype == dtype  # autocast was on: the classifier ran in the low precision
        assert not logits.requires_grad and all(not v.requires_grad for v in losses.values())
        assert all(torch.isfinite(v).all() for v in losses.values()), losses
    if amp == "fp16":
        assert scaler.get_scale() == 256.0  # no overflow, so no skipped step and no back-off
    assert all(p.dtype == torch.float32 for p in params)  # master weights stay fp32
    moved = [float((p.detach() - b).abs().max()) for p, b in zip(params, before)]
    assert min(moved) > 0.0  # every trainable tensor of every method got a gradient step


def test_fp16_loss_scale_is_applied_once_to_every_local_module(make_distiller, image_batch, flat):
    """LAKD backpropagates once per local module; each pass must be scaled by S and all of them unscaled
    once, so the gradients the optimizer steps with equal the fp32 gradients (fp16 tolerance)."""
    d = make_distiller("lakd", extra=["sdm.splits=[1,2,3]"])
    assert d.local_backward and len(d.splits) == 3
    batch = image_batch()

    ref = copy.deepcopy(d)
    ref.zero_grad(set_to_none=True)
    ref.train_step(batch, lambda loss: loss.backward())  # fp32, no scaler
    g32 = [p.grad.clone() for p in ref.trainable_parameters()]

    d16 = copy.deepcopy(d)
    params = d16.trainable_parameters()
    opt = RecordingSGD(params, lr=0.0)
    scale = 1024.0
    scaler = torch.amp.GradScaler("cpu", init_scale=scale, growth_interval=10**6)
    # capture the gradient of one parameter of each local module as left by backward (still scaled)
    raw = {}
    firsts = {0: d16.student.conv1.weight, 2: d16.student.classifier.weight}  # stem conv, classifier
    for k, p in firsts.items():
        p.register_post_accumulate_grad_hook(lambda q, k=k: raw.__setitem__(k, q.grad.clone()))
    _, losses = training_step(d16, opt, scaler, batch, torch.float16)
    assert set(losses) == {"feat1", "feat2", "feat3", "ce", "att"}
    assert len(opt.seen) == 1 and scaler.get_scale() == scale
    g16 = opt.seen[0]
    # whole-vector agreement, and per tensor: a module scaled twice or not at all would be off by 1024x
    err = (flat(g16) - flat(g32)).norm() / flat(g32).norm()
    assert err < 2e-2, float(err)
    for a, b in zip(g16, g32):
        assert (a - b).norm() < 0.1 * b.norm() + 1e-6, float((a - b).norm() / b.norm())
    # the raw (pre-unscale) gradients carried the factor S, in the first and in the last module
    for k, p in firsts.items():
        idx = next(i for i, q in enumerate(params) if q is p)
        assert torch.equal(raw[k] / scale, g16[idx])  # unscaling by a power of two is exact
        assert 0.95 < float(raw[k].norm() / (scale * g32[idx].norm())) < 1.05


def test_fp16_overflow_in_one_module_skips_the_whole_step(make_distiller, image_batch):
    d = make_distiller("lakd", extra=["sdm.splits=[1,2,3]"])
    params = d.trainable_parameters()
    before = [p.detach().clone() for p in params]
    opt = RecordingSGD(params, lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=10**6)
    stem = d.student.conv1.weight  # the stem conv: module 1 only; modules 2 and 3 get finite gradients
    handle = stem.register_hook(lambda g: g * float("inf"))
    _, losses = training_step(d, opt, scaler, image_batch(), torch.float16)
    assert all(torch.isfinite(v) for v in losses.values())
    last = d.student.classifier.weight
    assert torch.isfinite(last.grad).all() and last.grad.abs().sum() > 0
    assert opt.seen == []  # optimizer.step was not called
    assert all(torch.equal(p.detach(), b) for p, b in zip(params, before))
    assert scaler.get_scale() == 512.0 and opt.state_dict()["state"] == {}
    handle.remove()
    training_step(d, opt, scaler, image_batch(), torch.float16)  # the next clean step goes through
    assert len(opt.seen) == 1 and scaler.get_scale() == 512.0
    assert any(not torch.equal(p.detach(), b) for p, b in zip(params, before))


def test_ndam_map_in_half_precision_has_no_zero_division():
    f = torch.zeros(2, 4, 3, 3, dtype=torch.float16)
    f[0, 1, 1, 2] = -3.0
    w = ndam_map(f)
    assert w.dtype == torch.float32 and torch.isfinite(w).all()
    assert torch.equal(w[1], torch.zeros(1, 3, 3))  # all-zero sample: weights 0, not NaN
    # sample 0: a = mean_c(|F|) + 2 max_c(|F|) = 0.75 + 6 at (1, 2), 0 elsewhere; divided by its mean 6.75 / 9
    assert torch.isclose(w[0, 0, 1, 2], torch.tensor(9.0)) and torch.isclose(w[0].sum(), torch.tensor(9.0))


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_trainer_amp_switch(tmp_path, amp, digits_overrides):
    cfg = load_config(None, digits_overrides(extra=[f"train.amp={amp}", "sdm.splits=[1,2,3]"]))
    tr = Trainer(cfg, quiet=True)
    assert tr.amp_dtype == AMP_DTYPES[amp] and tr.scaler.is_enabled() == (amp == "fp16")
    before = [p.detach().clone() for p in tr.params]
    summary = tr.fit()
    rec = json.loads(open(os.path.join(tr.run_dir, "metrics.jsonl")).readline())
    assert set(rec["losses"]) == {"feat1", "feat2", "feat3", "ce", "att"}
    assert all(np.isfinite(v) for v in rec["losses"].values()) and np.isfinite(rec["test_loss"])
    assert summary["final_top1"] is not None
    assert any(not torch.equal(p.detach(), b) for p, b in zip(tr.params, before))
    ck = torch.load(os.path.join(tr.run_dir, "last.pt"), weights_only=True)
    if amp == "fp16":
        assert ck["scaler"]["scale"] == tr.scaler.get_scale()
    else:
        assert ck["scaler"] is None
