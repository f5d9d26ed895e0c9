"""The logit methods of issue 24 (DIST, NKD, CTKD, MLKD, DOT, Tf-KD) and logit standardization (KD, DKD, CTKD,
MLKD): each loss against a direct formula on tiny tensors, where the gradients go, extra and optimizer state
saved and restored, bad settings, every shipped config built on its real architectures, a 2-step ``lakd train``
per method, and an adapted torchvision network."""
from __future__ import annotations

import copy
import glob
import math
import os

import numpy as np
import pytest
import torch
import torch.nn as nn
from test_baselines import method_cfg, run_stopped_and_resumed  # tests/ is on sys.path under pytest

from lakd.config import load_config
from lakd.distillers import DISTILLERS, build_distiller, method_variants
from lakd.distillers.ctkd import cosine_lambda
from lakd.distillers.dist import dist_terms
from lakd.distillers.dkd import dkd_terms
from lakd.distillers.dot import DOTSGD
from lakd.distillers.kd import kd_loss, standardize
from lakd.distillers.mlkd import mlkd_terms
from lakd.distillers.nkd import nkd_terms
from lakd.distillers.tfkd import tfkd_reg_loss
from lakd.engine.step import training_step
from lakd.errors import LakdError
from lakd.models import create_model

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = ["dist", "nkd", "ctkd", "mlkd", "dot", "tfkd"]
CONFIG_DIRS = METHODS + ["kd_ls", "dkd_ls", "ctkd_ls", "mlkd_ls"]
PAIRS = [("resnet56", "resnet20"), ("resnet110", "resnet32"), ("resnet32x4", "resnet8x4"),
         ("wrn_40_2", "wrn_16_2"), ("wrn_40_2", "wrn_40_1"), ("vgg13", "vgg8")]

ZS = np.array([[2.0, 0.5, -1.0, 0.0], [0.1, 0.3, 1.5, -0.4], [-0.7, 1.2, 0.4, 0.9]])
ZT = np.array([[3.0, -0.5, 0.2, 1.0], [-1.0, 0.0, 2.5, 0.5], [0.3, 2.0, -0.2, 0.1]])
Y = np.array([0, 2, 1])


def t(a):
    return torch.tensor(a, dtype=torch.float32)


def softmax(z, axis=-1):
    e = np.exp(z - z.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def kl_rows(p, q):
    """KL(p || q) per row."""
    return (p * np.log(p / q)).sum(-1)


def pair(seed=0, classes=10):
    torch.manual_seed(seed)
    return create_model("resnet8", classes), create_model("resnet8", classes)


# ----- losses against direct formulas ---------------------------------------------------------------------------
def test_logit_standardization_by_hand_and_invariant_to_shift_and_scale():
    z = ZS[0]
    expected = (z - z.mean()) / (z.std(ddof=1) + 1e-7)
    np.testing.assert_allclose(standardize(t(ZS))[0].numpy(), expected, rtol=1e-5)
    T = 2.0
    zs_n = (ZS - ZS.mean(1, keepdims=True)) / ZS.std(1, ddof=1, keepdims=True)
    zt_n = (ZT - ZT.mean(1, keepdims=True)) / ZT.std(1, ddof=1, keepdims=True)
    by_hand = kl_rows(softmax(zt_n / T), softmax(zs_n / T)).mean() * T**2
    assert kd_loss(t(ZS), t(ZT), T, logit_stand=True).item() == pytest.approx(by_hand, rel=1e-4)
    # a per-sample shift and a positive scale of either side's logits change nothing with it on ...
    shift, scale = t([[3.0], [-2.0], [0.5]]), t([[2.5], [0.3], [7.0]])
    for f in (lambda z: z + shift, lambda z: z * scale, lambda z: z * scale - shift):
        assert kd_loss(f(t(ZS)), f(t(ZT)) * 1.7, T, True).item() == pytest.approx(
            kd_loss(t(ZS), t(ZT), T, True).item(), rel=1e-4, abs=1e-6)
        # ... and with it off a scale does change the loss
        assert kd_loss(t(ZS) * scale, t(ZT), T).item() != pytest.approx(kd_loss(t(ZS), t(ZT), T).item(), rel=1e-3)
    # DKD and MLKD's instance level see standardised logits too, through their distillers
    s, te = pair()
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    d = build_distiller(method_cfg("dkd", logit_stand=True, T=2.0, warmup=0), s, te)
    _, losses = d.forward_train(x, y)
    with torch.no_grad():
        tckd, nckd = dkd_terms(standardize(s(x)), standardize(te(x)), y, 2.0)
    assert losses["nckd"].item() == pytest.approx(8.0 * nckd.item(), rel=1e-4)
    a = mlkd_terms(t(ZS), t(ZT), [2.0], logit_stand=True)[0]
    b = mlkd_terms(t(ZS) * 3 + 1, t(ZT) * 0.5 - 2, [2.0], logit_stand=True)[0]
    assert a.item() == pytest.approx(b.item(), rel=1e-4)


def test_dist_by_hand():
    tau = 4.0
    ps, pt = softmax(ZS / tau), softmax(ZT / tau)

    def pearson(a, b):
        return np.corrcoef(a, b)[0, 1]

    inter = 1 - np.mean([pearson(ps[i], pt[i]) for i in range(3)])
    intra = 1 - np.mean([pearson(ps[:, j], pt[:, j]) for j in range(4)])
    got_inter, got_intra = dist_terms(t(ZS), t(ZT), tau)
    assert got_inter.item() == pytest.approx(tau**2 * inter, rel=1e-4)
    assert got_intra.item() == pytest.approx(tau**2 * intra, rel=1e-4)
    # a perfect match costs nothing
    assert dist_terms(t(ZT), t(ZT), tau)[0].item() == pytest.approx(0.0, abs=1e-5)


def test_nkd_by_hand():
    T = 2.0
    tgt = non = 0.0
    for i in range(3):
        ps, pt = softmax(ZS[i]), softmax(ZT[i])
        tgt += -pt[Y[i]] * np.log(ps[Y[i]])
        other = [j for j in range(4) if j != Y[i]]
        qs, qt = softmax(ZS[i, other] / T), softmax(ZT[i, other] / T)
        non += -(qt * np.log(qs)).sum()
    got_t, got_n = nkd_terms(t(ZS), t(ZT), torch.tensor(Y), T)
    assert got_t.item() == pytest.approx(tgt / 3, rel=1e-5)
    assert got_n.item() == pytest.approx(T**2 * non / 3, rel=1e-5)


def authors_mlkd(zs_weak, zs_strong, zt_weak, zt_strong, y, ce_w=0.1, kd_w=0.9, temps=(4.0, 3.0, 5.0, 2.0, 6.0)):
    """The authors' ``KD_ours.forward_train`` (Jin-Ying/Multi-Level-Logit-Distillation,
    mdistiller/distillers/KD_ours.py) in numpy, from logits of both views: every ``kd_loss``, ``cc_loss`` and
    ``bc_loss`` reduced to a scalar, then ``(scalar * mask).mean()`` for the masked ones."""
    p1 = softmax(zt_weak)
    mask = (p1.max(1) <= np.percentile(p1.max(1), 50)).astype(float)
    cmask = (p1.sum(0) <= np.percentile(p1.sum(0), 50)).astype(float)
    B, C = zt_weak.shape

    def kd(zs, zt, T):
        return kl_rows(softmax(zt / T), softmax(zs / T)).mean() * T**2

    def cc(zs, zt, T):
        ps, pt = softmax(zs / T), softmax(zt / T)
        return (((pt.T @ pt) - (ps.T @ ps)) ** 2).sum() / C

    def bc(zs, zt, T):
        ps, pt = softmax(zs / T), softmax(zt / T)
        return (((pt @ pt.T) - (ps @ ps.T)) ** 2).sum() / B

    ce = -np.log(softmax(zs_weak)[np.arange(B), y]).mean() - np.log(softmax(zs_strong)[np.arange(B), y]).mean()
    kd_weak = sum(kd_w * (kd(zs_weak, zt_weak, T) * mask).mean() for T in temps)
    kd_strong = sum(kd_w * kd(zs_strong, zt_strong, T) for T in temps[:3]) + sum(
        kd_w * kd(zs_weak, zt_weak, T) for T in temps[3:])  # the last two on the weak view, as coded
    return {"ce": ce_w * ce, "instance": kd_weak + kd_strong,
            "class": sum(kd_w * (cc(zs_weak, zt_weak, T) * cmask).mean() for T in temps),
            "batch": sum(kd_w * (bc(zs_weak, zt_weak, T) * mask).mean() for T in temps)}, mask, cmask


def test_mlkd_equals_the_authors_forward_with_one_view_as_both():
    s, te = pair()
    x, y = torch.randn(5, 3, 32, 32), torch.tensor([0, 1, 2, 3, 4])
    d = build_distiller(method_cfg("mlkd"), s, te)
    d.train()
    logits, losses = d.forward_train(x, y)
    with torch.no_grad():
        zs, zt = d.student(x).double().numpy(), te(x).double().numpy()
    ref, mask, cmask = authors_mlkd(zs, zs, zt, zt, y.numpy())
    assert 0 < mask.sum() < 5 and 0 < cmask.sum() < 10  # the masks really drop something
    assert set(losses) == set(ref)
    for k in ref:
        assert losses[k].item() == pytest.approx(ref[k], rel=1e-4), k
    # and the reference reading is the per-view term scaled by the kept fraction, not a selection
    T = 4.0
    kl = kl_rows(softmax(zt / T), softmax(zs / T)) * T**2
    assert (kl.mean() * mask).mean() == pytest.approx(kl.mean() * mask.mean())
    assert (kl * mask).mean() != pytest.approx(kl.mean() * mask.mean(), rel=1e-3)


def test_mlkd_two_views_equal_the_authors_forward():
    """mlkd.views=2: the student and teacher run on the weak batch and on the strong view the data pipeline makes
    (``batch["views"]["strong"]``); every term equals the authors' forward_train on the two views' logits (CE per
    view, the first three unmasked KL terms on the strong view)."""
    s, te = pair()
    x, y = torch.randn(5, 3, 32, 32), torch.tensor([0, 1, 2, 3, 4])
    x2 = torch.randn(5, 3, 32, 32)
    d = build_distiller(method_cfg("mlkd", views=2), s, te)
    d.train()
    logits, losses = d.forward_train(x, y, views={"strong": x2})
    with torch.no_grad():
        zs, zs2 = d.student(x).double().numpy(), d.student(x2).double().numpy()
        zt, zt2 = te(x).double().numpy(), te(x2).double().numpy()
    assert np.allclose(logits.detach().numpy(), zs, atol=1e-5)  # the step's logits are the weak view's
    ref, _, _ = authors_mlkd(zs, zs2, zt, zt2, y.numpy())
    for k in ref:
        assert losses[k].item() == pytest.approx(ref[k], rel=1e-4), k
    one, _, _ = authors_mlkd(zs, zs, zt, zt, y.numpy())
    assert losses["instance"].item() != pytest.approx(one["instance"], rel=1e-3)  # the strong view counts


def test_mlkd_views_settings_are_checked():
    from lakd.distillers.mlkd import MLKD, STRONG_VIEW

    s, te = pair()
    with pytest.raises(LakdError, match=r"mlkd.views \(1: one view .*\) must be one of 1, 2, got 3"):
        build_distiller(method_cfg("mlkd", views=3), s, te)
    with pytest.raises(LakdError, match="mlkd.views must be 1"):
        MLKD.views({"mlkd": {"views": True}})
    assert MLKD.views({}) == {} and MLKD.views({"mlkd": {"views": 2}}) == STRONG_VIEW
    assert STRONG_VIEW == {"strong": {"randaugment": 2, "cutout": 0.5}}  # own crop and flip: the spec's defaults
    import lakd  # one's own loop: the strong view is the data pipeline's; without it, a one-line way out

    d = lakd.distiller(create_model("resnet8", 10), create_model("resnet8", 10), "mlkd", options={"mlkd": {"views": 2}})
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([1, 2])
    with pytest.raises(LakdError, match=r"batch\['views'\]\['strong'\]\), but this batch has none") as info:
        d.train_step({"image": x, "target": y}, lambda loss: loss.backward())
    assert "\n" not in str(info.value)
    with pytest.raises(LakdError, match=r"strong view \(1, 3, 32, 32\) does not match the batch \(2, 3, 32, 32\)"):
        d.train_step({"image": x, "target": y, "views": {"strong": x[:1]}}, lambda loss: loss.backward())
    _, losses = d.train_step({"image": x, "target": y, "views": {"strong": x.flip(3)}}, lambda loss: loss.backward())
    assert set(losses) == {"ce", "instance", "batch", "class"}


def test_mlkd_terms_by_hand_in_both_mask_modes():
    T = 3.0
    p1 = softmax(ZT)
    mask = (p1.max(1) <= np.percentile(p1.max(1), 50)).astype(float)
    cmask = (p1.sum(0) <= np.percentile(p1.sum(0), 50)).astype(float)
    assert mask.sum() == 2 and cmask.sum() == 2  # 2 of 3 samples, 2 of 4 classes kept
    kl = kl_rows(softmax(ZT / T), softmax(ZS / T)) * T**2
    ps, pt = softmax(ZS / T), softmax(ZT / T)
    b_err = (((pt @ pt.T) - (ps @ ps.T)) ** 2).sum(1)  # per-sample rows: their sum / B is the authors' bc_loss
    c_err = (((pt.T @ pt) - (ps.T @ ps)) ** 2).sum(0)
    expected = {
        "reference": (kl.mean() * 2 / 3 + kl.mean(), b_err.sum() / 3 * 2 / 3, c_err.sum() / 4 * 2 / 4),
        "per_sample": ((kl * mask).mean() + kl.mean(), (b_err * mask).mean(), (c_err * cmask).mean()),
    }
    for mode, exp in expected.items():
        got = mlkd_terms(t(ZS), t(ZT), [T], mask_mode=mode)
        for g, e in zip(got, exp):
            assert g.item() == pytest.approx(e, rel=1e-4), mode
        two = mlkd_terms(t(ZS), t(ZT), [T, 5.0], mask_mode=mode)
        five = mlkd_terms(t(ZS), t(ZT), [5.0], mask_mode=mode)
        for a, b, c in zip(two, got, five):  # temperatures add
            assert a.item() == pytest.approx(b.item() + c.item(), rel=1e-5)
    with pytest.raises(LakdError, match="mask_mode"):
        mlkd_terms(t(ZS), t(ZT), [T], mask_mode="paper")


def test_mlkd_instance_gradient_reaches_every_sample_in_reference_and_only_the_kept_in_per_sample():
    """d/dz_s of ``KL_i * T^2`` is ``T (p_s[i] - p_t[i])``: the instance level's gradient on row ``i`` is that
    times ``(frac + 1) / B`` with the authors' masks and ``(m_i + 1) / B`` with the per-sample ones; the teacher's
    logits get none."""
    T = 2.0
    mask = (softmax(ZT).max(1) <= np.percentile(softmax(ZT).max(1), 50)).astype(float)
    base = T * (softmax(ZS / T) - softmax(ZT / T)) / 3
    for mode, w in (("reference", np.full(3, mask.mean() + 1)), ("per_sample", mask + 1)):
        zs, zt = t(ZS).requires_grad_(True), t(ZT).requires_grad_(True)
        mlkd_terms(zs, zt.detach(), [T], mask_mode=mode)[0].backward()
        np.testing.assert_allclose(zs.grad.numpy(), base * w[:, None], rtol=1e-4, atol=1e-7)
        assert zt.grad is None


def test_mlkd_variant_and_configs_carry_the_references_weights():
    name, overrides = method_variants()["mlkd_ls"]
    cfg = load_config(None, [f"method={name}", "model.name=resnet8", "teacher.name=resnet8", *overrides])
    d = build_distiller(cfg, *pair())
    assert (d.logit_stand, d.temperatures, d.kd_weight, d.ce_weight, d.mask_mode) == (
        True, [2.0, 3.0, 5.0, 2.0, 6.0], 9.0, 0.1, "reference")
    assert d.extra_state_dict() == {}  # nothing to save: no learned part, no warm-up
    for teacher, student in PAIRS:
        ls = load_config(os.path.join(ROOT, "configs", "cifar100", "mlkd_ls", f"{teacher}_{student}.yaml"))["mlkd"]
        assert ls["kd_weight"] == (6.0 if student == "vgg8" else 9.0)  # the LS repo's logs/MLKD/*,2,6 / *,2,9
        ml = load_config(os.path.join(ROOT, "configs", "cifar100", "mlkd", f"{teacher}_{student}.yaml"))["mlkd"]
        assert (ml["ce_weight"], ml["kd_weight"], ml["temperatures"], ml["mask_mode"]) == (
            0.1, 0.9, [4.0, 3.0, 5.0, 2.0, 6.0], "reference")
        assert ls["views"] == ml["views"] == 2  # the authors' weak and strong views
    im = load_config(os.path.join(ROOT, "configs", "imagenet", "mlkd", "resnet34_resnet18.yaml"))["mlkd"]
    assert (im["ce_weight"], im["kd_weight"], im["temperatures"], im["views"]) == (
        0.5, 0.5, [1.0, 3.0, 5.0, 2.0, 6.0], 2)  # their configs/imagenet/r34_r18/kd_ours.yaml: KD T 1, CE/KD 0.5


def test_tfkd_by_hand():
    a, T, C = 0.9, 5.0, 4
    u = np.full((3, C), (1 - a) / (C - 1))
    u[np.arange(3), Y] = a
    u = softmax(u / T)
    expected = (u * (np.log(u) - np.log(softmax(ZS)))).sum() / (3 * C)
    assert tfkd_reg_loss(t(ZS), torch.tensor(Y), a, T).item() == pytest.approx(expected, rel=1e-5)
    s = create_model("resnet8", 10)
    d = build_distiller(method_cfg("tfkd"), s, None)
    assert d.teacher is None and not DISTILLERS.get("tfkd").needs_teacher
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([1, 2])
    _, losses = d.forward_train(x, y)
    assert set(losses) == {"ce", "reg"} and all(torch.isfinite(v) for v in losses.values())


def test_ctkd_temperature_curriculum_and_reversed_gradient():
    assert cosine_lambda(0, 10) == 0.0 and cosine_lambda(5, 10) == pytest.approx(0.5)
    assert cosine_lambda(10, 10) == 1.0 and cosine_lambda(50, 10) == 1.0
    s, te = pair()
    d = build_distiller(method_cfg("ctkd"), s, te)
    assert d.current_temperature() == pytest.approx(1 + 20 / (1 + math.exp(-1.0)), rel=1e-6)
    d.set_epoch(4, 240)  # 1-based epoch 5: lambda 1/2
    assert d.grl_lambda() == pytest.approx(0.5)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    _, losses = d.forward_train(x, y)
    losses["kd"].backward()
    # the true derivative of the KD loss w.r.t. the raw parameter, then reversed and halved by the layer
    with torch.no_grad():
        zs, zt = s(x), te(x)
    p = d.temperature.t.detach().clone().requires_grad_(True)
    direct = 0.9 * kd_loss(zs, zt, 1 + 20 * torch.sigmoid(p))
    (g,) = torch.autograd.grad(direct, p)
    assert d.temperature.t.grad.item() == pytest.approx(-0.5 * g.item(), rel=1e-4)
    assert losses["kd"].item() == pytest.approx(direct.item(), rel=1e-5)


# ----- DOT: the optimizer ---------------------------------------------------------------------------------------
def test_dot_update_equals_a_hand_computed_two_momentum_step():
    torch.manual_seed(0)
    lin = nn.Linear(3, 2)
    x, tgt = torch.randn(5, 3), torch.tensor([0, 1, 1, 0, 1])
    lr, m, delta, wd = 0.1, 0.9, 0.075, 5e-4
    opt = DOTSGD(lin.parameters(), lr=lr, momentum=m - delta, momentum_kd=m + delta, weight_decay=wd)
    w = [p.detach().clone().double() for p in lin.parameters()]
    v_task = v_kd = None
    for step in range(3):
        out = lin(x)
        loss_kd = (out**2).mean() * (step + 1)  # any two different losses
        loss_ce = nn.functional.cross_entropy(out, tgt)
        g_kd = [g.double() for g in torch.autograd.grad(loss_kd, list(lin.parameters()), retain_graph=True)]
        g_ce = [g.double() for g in torch.autograd.grad(loss_ce, list(lin.parameters()), retain_graph=True)]
        opt.zero_grad(set_to_none=True)
        loss_kd.backward(retain_graph=True)
        opt.stash_kd_gradients()
        assert all(p.grad is None for p in lin.parameters())
        loss_ce.backward()
        opt.step()
        # by hand: task buffer with m - delta and weight decay, KD buffer with m + delta; first step: the gradients
        d_task = [gc + wd * wi for gc, wi in zip(g_ce, w)]
        v_task = d_task if v_task is None else [(m - delta) * v + d for v, d in zip(v_task, d_task)]
        v_kd = g_kd if v_kd is None else [(m + delta) * v + g for v, g in zip(v_kd, g_kd)]
        w = [wi - lr * a - lr * b for wi, a, b in zip(w, v_task, v_kd)]
        for p, e in zip(lin.parameters(), w):
            torch.testing.assert_close(p.detach().double(), e, rtol=1e-5, atol=1e-6)


def test_dot_trains_through_the_engine_step_and_its_state_resumes_bitwise():
    """The distiller's two backward passes through ``training_step`` give the optimizer's two-momentum update,
    and a second distiller + optimizer loaded from the state dicts continues bitwise."""

    def make():
        s, te = pair()
        d = build_distiller(method_cfg("dot"), s, te)
        opt = d.build_optimizer(d.trainable_parameters(), {"lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4})
        return d, opt

    scaler = torch.amp.GradScaler("cpu", enabled=False)
    g = torch.Generator().manual_seed(3)
    batches = [{"image": torch.randn(4, 3, 32, 32, generator=g), "target": torch.randint(0, 10, (4,), generator=g)}
               for _ in range(3)]
    d, opt = make()
    assert isinstance(opt, DOTSGD) and opt.param_groups[0]["momentum"] == pytest.approx(0.825)
    d.train()
    for b in batches[:2]:
        training_step(d, opt, scaler, b)
    st = opt.state[next(iter(d.student.parameters()))]
    assert {"momentum_buffer", "momentum_kd_buffer"} <= set(st)
    saved_model, saved_opt = copy.deepcopy(d.state_dict()), copy.deepcopy(opt.state_dict())
    training_step(d, opt, scaler, batches[2])
    d2, opt2 = make()
    d2.load_state_dict(saved_model)
    opt2.load_state_dict(saved_opt)
    d2.train()
    training_step(d2, opt2, scaler, batches[2])
    for (k, a), b in zip(d.state_dict().items(), d2.state_dict().values()):
        assert torch.equal(a, b), k
    # without its optimizer the method says what it needs
    s, te = pair()
    with pytest.raises(LakdError, match="build_optimizer"):
        build_distiller(method_cfg("dot"), s, te).train_step(batches[0], lambda loss, **kw: loss.backward(**kw))
    with pytest.raises(LakdError, match="retain_graph"):
        d.train_step(batches[0], lambda loss: loss.backward())


def test_the_engine_builds_dot_with_its_optimizer_and_every_other_method_with_sgd(tmp_path):
    from lakd.engine.build import build

    for method, kind in (("dot", DOTSGD), ("kd", torch.optim.SGD)):
        cfg = load_config(None, [f"method={method}", "model.name=resnet8", "teacher.name=resnet8",
                                 "model.num_classes=10", "device=cpu"])
        parts = build(cfg, num_data=64, warn=False)
        assert type(parts.optimizer) is kind


# ----- gradients, state, settings -----------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS + ["kd_ls", "dkd_ls", "ctkd_ls", "mlkd_ls"])
def test_gradients_reach_the_student_and_extra_parts_never_the_teacher(method):
    name, overrides = method_variants()[method]
    cfg = load_config(None, [f"method={name}", "model.name=resnet8", "teacher.name=resnet8", *overrides])
    s, te = pair()
    d = build_distiller(cfg, s, te)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    d.train()
    _, losses = d.forward_train(x, y)
    sum(losses.values()).backward()
    assert all(p.grad is None for p in te.parameters())
    assert all(p.grad is not None for p in s.parameters() if p.requires_grad)
    extra = [n for n, _ in d.named_trainable_parameters() if not n.startswith("student.")]
    assert extra == (["temperature.t"] if name == "ctkd" else [])
    for n, p in d.named_trainable_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n


def test_ctkd_temperature_is_saved_and_restored():
    s, te = pair()
    d = build_distiller(method_cfg("ctkd"), s, te)
    with torch.no_grad():
        d.temperature.t.fill_(-0.3)
    sd = d.extra_state_dict()
    assert list(sd) == ["temperature.t"]
    d2 = build_distiller(method_cfg("ctkd"), copy.deepcopy(s), te)
    d2.load_extra_state_dict(copy.deepcopy(sd))
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([1, 2])
    a, b = d.forward_train(x, y)[1], d2.forward_train(x, y)[1]
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(LakdError, match="lacks"):
        d2.load_extra_state_dict({})


@pytest.mark.parametrize("method, section, match", [
    ("dist", {"tau": 0}, "dist.tau"), ("nkd", {"T": -1}, "nkd.T"), ("ctkd", {"decay_epochs": "x"}, "decay_epochs"),
    ("ctkd", {"t_start": 0}, "t_start"), ("mlkd", {"temperatures": []}, "temperatures"),
    ("mlkd", {"mask_percentile": 120}, "mask_percentile"), ("mlkd", {"mask_mode": "paper"}, "mlkd.mask_mode"),
    ("dot", {"delta": -0.1}, "dot.delta"),
    ("tfkd", {"alpha": 2}, "tfkd.alpha"), ("kd", {"logit_stand": "yes"}, "kd.logit_stand"),
    ("dkd", {"logit_stand": 1}, "dkd.logit_stand")])
def test_bad_settings_name_the_key(method, section, match):
    s, te = pair()
    with pytest.raises(LakdError, match=match):
        build_distiller(method_cfg(method, **section), s, te)


def test_dot_refuses_fp16_and_impossible_momenta():
    s, te = pair()
    cfg = method_cfg("dot")
    cfg["train"]["amp"] = "fp16"
    with pytest.raises(LakdError, match="fp16"):
        build_distiller(cfg, s, te)
    d = build_distiller(method_cfg("dot", delta=0.2), s, te)
    with pytest.raises(LakdError, match="momenta"):
        d.build_optimizer(d.trainable_parameters(), {"lr": 0.1, "momentum": 0.9, "weight_decay": 0})


def test_lakd_methods_lists_the_methods_and_the_logit_standardised_variants(capsys):
    from lakd.cli.main import main

    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for name in METHODS:
        assert f"\n{name} " in "\n" + out
    assert "kd_ls" in out and "dkd_ls" in out
    variants = method_variants()
    for v in ("kd_ls", "dkd_ls", "ctkd_ls", "mlkd_ls"):
        assert any("logit_stand=true" in o for o in variants[v][1])
    from lakd.distillers import bench_default_methods

    assert "kd" in bench_default_methods() and "kd_ls" not in bench_default_methods()  # still the paper's Table 4
    order = [DISTILLERS.get(m).report_order for m in METHODS]
    assert all(8 < o < DISTILLERS.get("lakd").report_order for o in order)


# ----- shipped configs on the real architectures ------------------------------------------------------------------
def test_every_config_of_these_methods_loads():
    paths = [p for d in CONFIG_DIRS for p in glob.glob(os.path.join(ROOT, "configs", "*", d, "*.yaml"))]
    assert len(paths) >= 7 * len(CONFIG_DIRS)
    for p in paths:
        cfg = load_config(p)
        assert cfg["method"] in METHODS + ["kd", "dkd", "ctkd", "mlkd"], p


@pytest.mark.parametrize("teacher, student", PAIRS)
def test_configs_run_on_the_real_architectures(teacher, student, run_shipped_configs):
    run_shipped_configs(CONFIG_DIRS, [(teacher, student)])  # MLKD's strong view: random here, the data's in a run


def test_cifar10_configs_run_on_the_real_architectures(run_shipped_configs):
    run_shipped_configs(CONFIG_DIRS, [("resnet56", "resnet20")], dataset="cifar10")
    for method in ("dist", "nkd", "ctkd"):  # ImageNet: where the authors give ImageNet settings
        cfg = load_config(os.path.join(ROOT, "configs", "imagenet", method, "resnet34_resnet18.yaml"))
        assert cfg["method"] == method and cfg["model"]["name"] == "resnet18"


# ----- the command and other networks --------------------------------------------------------------------------
def test_two_step_train_runs_through_the_command(digits_overrides, capsys):
    from lakd.cli.main import main

    for method in METHODS:
        assert main(["train", *digits_overrides(method, [f"experiment=smoke_{method}"])]) == 0, method
    assert main(["train", *digits_overrides("mlkd", ["experiment=smoke_mlkd2", "mlkd.views=2"])]) == 0
    capsys.readouterr()


def test_on_an_adapted_torchvision_network():
    """``lakd.distiller`` on torchvision resnet18s (DOT, the method with the most machinery), then every method
    on the same adapted pair (adapted once: the fx trace is the slow part)."""
    import torchvision

    import lakd
    from lakd.models import adapt

    torch.manual_seed(0)
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([1, 4])
    s, te = torchvision.models.resnet18(num_classes=10), torchvision.models.resnet18(num_classes=10)
    d = lakd.distiller(s, te, "dot", image_size=32)
    opt = d.build_optimizer(d.trainable_parameters(), {"lr": 0.01, "momentum": 0.9, "weight_decay": 0.0})
    before = [p.detach().clone() for p in d.student.parameters()]
    d.train_step({"image": x, "target": y}, lambda loss, **kw: loss.backward(**kw))
    opt.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, d.student.parameters()))
    fs, ft = adapt(s, input_size=32), adapt(te, input_size=32)
    for method in METHODS:
        dm = build_distiller(method_cfg(method), fs, None if method == "tfkd" else ft)
        opt = dm.build_optimizer(dm.trainable_parameters(), {"lr": 0.01, "momentum": 0.9})  # DOT's; else None
        assert (opt is not None) == (method == "dot")
        _, losses = dm.train_step({"image": x, "target": y}, lambda loss, **kw: loss.backward(**kw))
        assert all(torch.isfinite(v) for v in losses.values()), method


@pytest.mark.parametrize("method", ["dot", "ctkd", "mlkd"])
def test_a_resumed_run_continues_bitwise(method, tmp_path):
    """DOT's two momentum buffers (optimizer state), CTKD's temperature (extra state) and curriculum, and MLKD's
    random strong views (mlkd.views=2): a run stopped after its first epoch and resumed ends bitwise where the
    uninterrupted run does."""

    teacher = tmp_path / "t.pt"
    torch.save({"model": create_model("resnet8", 10).state_dict(), "arch": "resnet8", "num_classes": 10}, teacher)
    common = ["data.dataset=digits", "data.train_subset=96", "data.test_subset=32", "solver.batch_size=32",
              "solver.lr=0.05", "model.name=resnet8", "train.progress=false", "train.threads=1",
              "data.num_workers=0", f"method={method}", "teacher.name=resnet8", f"teacher.checkpoint={teacher}",
              "solver.epochs=2", "solver.max_steps_per_epoch=2", f"output_dir={tmp_path}", "ctkd.decay_epochs=2",
              "mlkd.views=2"]
    full, resumed = run_stopped_and_resumed(common, tmp_path)
    a, b = full.distiller.state_dict(), resumed.distiller.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    if method == "dot":
        sa, sb = full.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
        assert sa.keys() == sb.keys() and all("momentum_kd_buffer" in v for v in sa.values())
        for k in sa:
            for key in sa[k]:
                assert torch.equal(sa[k][key], sb[k][key]), (k, key)
