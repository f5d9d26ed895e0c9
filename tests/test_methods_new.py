"""The 2024-2026 methods (issue 36): SDD, WTTM, WKD-L, WKD-F, SKD, CRLD. Each loss against a numpy computation written
from the paper's equation and against a transcription of the authors' code on the same tensors (``authors_*``,
torch, as their repositories compute it), where the gradients go, extra state and a stopped run resumed bitwise,
bad settings, every shipped config on its real architectures, a 2-step ``lakd train`` per method, and an adapted
torchvision pair."""
from __future__ import annotations

import glob
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_baselines import method_cfg, run_stopped_and_resumed  # tests/ is on sys.path under pytest

from lakd.config import load_config
from lakd.distillers import DISTILLERS, build_distiller, method_variants
from lakd.distillers.crld import crld_terms
from lakd.distillers.kd import kd_loss
from lakd.distillers.sdd import region_logits, sdd_loss
from lakd.distillers.skd import confidence_fractions, skd_direction_loss
from lakd.distillers.wkd_f import wkd_feature_terms
from lakd.distillers.wkd_l import classifier_cost, cosine_decay, wkd_logit_terms
from lakd.distillers.wttm import wttm_loss
from lakd.errors import LakdError
from lakd.models import create_model

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = ["sdd", "wttm", "wkd_l", "wkd_f", "skd", "crld"]
PAIRS = [("resnet56", "resnet20"), ("resnet110", "resnet32"), ("resnet32x4", "resnet8x4"),
         ("wrn_40_2", "wrn_16_2"), ("wrn_40_2", "wrn_40_1"), ("vgg13", "vgg8")]


def t(a):
    return torch.tensor(a, dtype=torch.float32)


def softmax(z, axis=-1):
    e = np.exp(z - z.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def logits(b=6, c=10, seed=0, scale=(3.0, 5.0)):
    g = np.random.default_rng(seed)
    return g.normal(size=(b, c)) * scale[0], g.normal(size=(b, c)) * scale[1]


def pair(seed=0, classes=10):
    torch.manual_seed(seed)
    return create_model("resnet8", classes), create_model("resnet8", classes)


def batch(n=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g), torch.arange(n) % 10


# ----- WTTM -----------------------------------------------------------------------------------------------------
def authors_wttm(y_s, y_t, gamma, weighted=True):
    """zkxufo/TTM distiller_zoo/wttm.py (and ttm.py without ``norm *``): the power of the teacher's softmax,
    normalised, KLDivLoss per sample, the batch mean of ``norm * KL``."""
    p_s = F.log_softmax(y_s, dim=1)
    p_t = torch.pow(torch.softmax(y_t, dim=1), gamma)
    norm = torch.sum(p_t, dim=1)
    p_t = p_t / norm.unsqueeze(1)
    kl = torch.sum(F.kl_div(p_s, p_t, reduction="none"), dim=1)
    return torch.mean(norm * kl) if weighted else torch.mean(kl)


def test_wttm_by_the_papers_equation_and_the_authors_code():
    zs, zt = logits()
    for gamma in (0.1, 0.2, 0.5, 1.0):
        pw = softmax(zt) ** gamma
        u = pw.sum(1)
        q = pw / u[:, None]
        kl = (q * np.log(q / softmax(zs))).sum(1)
        assert wttm_loss(t(zs), t(zt), gamma).item() == pytest.approx((u * kl).mean(), rel=1e-5)
        assert wttm_loss(t(zs), t(zt), gamma, weighted=False).item() == pytest.approx(kl.mean(), rel=1e-5)
        for w in (True, False):
            assert wttm_loss(t(zs), t(zt), gamma, w).item() == pytest.approx(
                authors_wttm(t(zs), t(zt), gamma, w).item(), rel=1e-5)
    # gamma 1 and no weight: KD at T 1 (without the T^2 that is 1 anyway)
    assert wttm_loss(t(zs), t(zt), 1.0, False).item() == pytest.approx(kd_loss(t(zs), t(zt), 1.0).item(), rel=1e-5)
    # the teacher far from uniform (gamma small flattens it): U grows, and with it the sample's weight
    _, u_flat = __import__("lakd.distillers.wttm", fromlist=["x"]).wttm_terms(t(zs), t(zt), 0.1)
    _, u_sharp = __import__("lakd.distillers.wttm", fromlist=["x"]).wttm_terms(t(zs), t(zt), 0.9)
    assert (u_flat > u_sharp).all()


def test_wttm_gradient_is_the_weighted_difference_of_student_and_transformed_teacher():
    """d/dz_s of ``U_i KL(q_i || softmax(z_s)_i)`` is ``U_i (softmax(z_s) - q)``; the batch mean divides by B."""
    zs, zt = logits(b=4)
    gamma = 0.3
    z = t(zs).requires_grad_(True)
    wttm_loss(z, t(zt), gamma).backward()
    pw = softmax(zt) ** gamma
    u = pw.sum(1, keepdims=True)
    np.testing.assert_allclose(z.grad.numpy(), u * (softmax(zs) - pw / u) / 4, rtol=1e-4, atol=1e-6)


# ----- SKD -------------------------------------------------------------------------------------------------------
def authors_skd(logits_student, logits_teacher, target, temp=4.0, tik=0.1, ce=0.1, kd=0.9):
    """HyunJunSik/StreamLined Distiller/SKD.py, ``SKD.forward_train`` from the two logits: the median masks, KD
    times T^2 (``kd_loss`` reduced), ``SKD_loss`` (Gram / C, covariance + Tikhonov, Cholesky inverse, Mahalanobis),
    each reduced term times its mask, averaged."""
    pred_teacher = F.softmax(logits_teacher, dim=1)
    confidence = pred_teacher.max(dim=1)[0]
    mask = confidence.le(float(np.percentile(confidence.numpy(), 50)))
    class_confidence = torch.sum(pred_teacher, dim=0)
    class_mask = class_confidence.le(float(np.percentile(class_confidence.numpy(), 50)))
    log_ps = F.log_softmax(logits_student / temp, dim=1)
    loss_kd_plain = F.kl_div(log_ps, F.softmax(logits_teacher / temp, dim=1), reduction="none").sum(1).mean()
    loss_kd_plain = loss_kd_plain * temp**2
    c = logits_student.shape[1]
    gs = F.normalize(logits_student, p=2, dim=1)
    gt = F.normalize(logits_teacher, p=2, dim=1)
    diff = torch.mm(gs, gs.T) / c - torch.mm(gt, gt.T) / c
    cov = torch.cov(diff.T) + tik * torch.eye(diff.size(1))
    inv = torch.cholesky_inverse(torch.linalg.cholesky(cov))
    direction = torch.sqrt(torch.einsum("bi,ij,bj->b", diff, inv, diff)).mean()
    return {"ce": ce * F.cross_entropy(logits_student, target), "instance": kd * (loss_kd_plain * mask).mean(),
            "direction": kd * (direction * class_mask).mean()}


def test_skd_direction_by_the_papers_equation():
    zs, zt = logits(b=8, c=12)
    for by_classes, lam in ((True, 0.1), (False, 0.1), (True, 1e-3)):
        def gram(z, by_classes=by_classes):
            g = z / np.linalg.norm(z, axis=1, keepdims=True)
            return g @ g.T / (z.shape[1] if by_classes else 1)

        d = gram(zs) - gram(zt)
        sigma = np.cov(d, rowvar=False) + lam * np.eye(8)  # rows of D are the observations
        inv = np.linalg.inv(sigma)
        expected = np.mean([math.sqrt(d[i] @ inv @ d[i]) for i in range(8)])
        assert skd_direction_loss(t(zs), t(zt), lam, by_classes).item() == pytest.approx(expected, rel=1e-4)
    # identical relations cost nothing; the distance is invariant to a per-sample scale of either side's logits
    assert skd_direction_loss(t(zt), t(zt), 0.1).item() == pytest.approx(0.0, abs=1e-6)
    scale = t(np.arange(1, 9)[:, None] * 0.7)
    assert skd_direction_loss(t(zs) * scale, t(zt), 0.1).item() == pytest.approx(
        skd_direction_loss(t(zs), t(zt), 0.1).item(), rel=1e-5)
    with pytest.raises(LakdError, match="batch of 2 or more"):
        skd_direction_loss(t(zs[:1]), t(zt[:1]), 0.1)


def test_skd_equals_the_authors_forward():
    s, te = pair()
    x, y = torch.randn(6, 3, 32, 32), torch.tensor([0, 1, 2, 3, 4, 5])
    d = build_distiller(method_cfg("skd"), s, te)
    d.train()
    _, losses = d.forward_train(x, y)
    with torch.no_grad():
        zs, zt = d.student(x), te(x)
    ref = authors_skd(zs, zt, y)
    assert set(losses) == set(ref)
    for k in ref:
        assert losses[k].item() == pytest.approx(ref[k].item(), rel=1e-4), k
    fb, fc = confidence_fractions(zt)
    assert 0 < fb < 1 and 0 < fc < 1  # the masks scale the terms (here by 1/2), they select nothing
    off = build_distiller(method_cfg("skd", masks=False), s, te)
    off.train()
    _, l2 = off.forward_train(x, y)
    assert l2["instance"].item() == pytest.approx(losses["instance"].item() / fb.item(), rel=1e-4)


# ----- SDD -------------------------------------------------------------------------------------------------------
def authors_sdd_kd(out_s_multi, out_t_multi, temp, target):
    """shicaiwei123/SDD-CVPR2024 mdistiller/distillers/KD.py ``sdd_kd_loss`` (B x C x N region logits): the
    regions flattened region-major, KL per region times T^2, the four consistency masks built from the teacher's
    region and global (first B rows) predictions, complementary regions weighted 2, summed over N * B."""
    s = out_s_multi.permute(2, 0, 1)
    te = out_t_multi.permute(2, 0, 1)
    out_t = te.reshape(te.shape[0] * te.shape[1], te.shape[2])
    out_s = s.reshape(s.shape[0] * s.shape[1], s.shape[2])
    target_r = target.repeat(te.shape[0])
    loss = (F.kl_div(F.log_softmax(out_s / temp, dim=1), F.softmax(out_t / temp, dim=1), reduction="none")
            * temp**2).sum(1)
    return _authors_sdd_weighting(loss, out_t, target, target_r, te.shape[0]).sum() / target_r.shape[0]


def _authors_sdd_weighting(loss, out_t, target, target_r, n):
    pred = torch.argmax(out_t, dim=1)
    b = len(target)
    g_true = (pred[0:b] == target).repeat(n)
    g_false = (pred[0:b] != target).repeat(n)
    gt_lw = pred != target_r
    gt_lw[g_false] = False
    gt_lw[0:b] = False
    gw_lt = pred == target_r
    gw_lt[g_true] = False
    gw_lt[0:b] = False
    gw_lw = pred != target_r
    gw_lw[g_true] = False
    gt_lt = pred == target_r
    gt_lt[g_false] = False
    assert int(gt_lt.sum() + gw_lw.sum() + gt_lw.sum() + gw_lt.sum()) == target_r.shape[0]
    index = torch.zeros_like(loss)
    index[gw_lw] = 1.0
    index[gt_lt] = 1.0
    index[gw_lt] = 2.0
    index[gt_lw] = 2.0
    return loss * index


def authors_sdd_dkd(out_s_multi, out_t_multi, target, alpha, beta, temp):
    """SDD_DKD.py ``multi_dkd``: mdistiller's DKD per region row (divided by N * B inside), the same weights."""
    s = out_s_multi.permute(2, 0, 1)
    te = out_t_multi.permute(2, 0, 1)
    out_t = te.reshape(-1, te.shape[2])
    out_s = s.reshape(-1, s.shape[2])
    target_r = target.repeat(out_t_multi.shape[2])
    gt = torch.zeros_like(out_s).scatter_(1, target_r.unsqueeze(1), 1).bool()
    other = ~gt
    ps, pt = F.softmax(out_s / temp, dim=1), F.softmax(out_t / temp, dim=1)
    cat_s = torch.cat([(ps * gt).sum(1, keepdims=True), (ps * other).sum(1, keepdims=True)], dim=1)
    cat_t = torch.cat([(pt * gt).sum(1, keepdims=True), (pt * other).sum(1, keepdims=True)], dim=1)
    n = target_r.shape[0]
    tckd = (F.kl_div(torch.log(cat_s), cat_t, reduction="none") * temp**2 / n).sum(1)
    nckd = (F.kl_div(F.log_softmax(out_s / temp - 1000.0 * gt, dim=1), F.softmax(out_t / temp - 1000.0 * gt, dim=1),
                     reduction="none") * temp**2 / n).sum(1)
    loss = alpha * tckd + beta * nckd
    return _authors_sdd_weighting(loss, out_t, target, target_r, out_t_multi.shape[2]).sum()


def authors_spp_logits(model, fmap, scales):
    """Their ``SPP`` (4 x 4 first, 2 x 2 and 1 x 1 from it) and ``self.fc`` on every region: B x K x N."""
    x4 = F.adaptive_avg_pool2d(fmap, (4, 4))
    grids = {4: x4, 2: F.adaptive_avg_pool2d(x4, (2, 2)), 1: F.adaptive_avg_pool2d(x4, (1, 1))}
    x = torch.cat([grids[s].flatten(2) for s in scales], dim=2).permute(2, 0, 1)
    m, b, c = x.shape
    return model.classifier(x.reshape(m * b, c)).reshape(m, b, -1).permute(1, 2, 0)


def test_sdd_region_logits_are_the_authors_spp_and_classifier():
    torch.manual_seed(0)
    for arch, size in (("resnet8", 32), ("resnet8", 28)):  # an 8 x 8 map, and a 7 x 7 one (overlapping windows)
        m = create_model(arch, 10).eval()
        with torch.no_grad():
            z, feats = m(torch.randn(3, 3, size, size), features=True)
            for scales in ([1, 2, 4], [1, 2]):
                ours = region_logits(m, feats["last"], scales)
                assert ours.shape == (3, 10, sum(s * s for s in scales))
                torch.testing.assert_close(ours, authors_spp_logits(m, feats["last"], scales), rtol=1e-5, atol=1e-6)
            if size == 32:  # on an 8 x 8 map the global region is the network's own logits
                torch.testing.assert_close(region_logits(m, feats["last"], [1])[:, :, 0], z, rtol=1e-5, atol=1e-5)


def test_sdd_by_the_papers_equation_and_the_authors_code():
    g = np.random.default_rng(3)
    b, k, n = 5, 6, 5  # regions of scales [1, 2]
    zs, zt = g.normal(size=(b, k, n)) * 2, g.normal(size=(b, k, n)) * 3
    y = np.array([0, 1, 2, 3, 4])
    zt[1, 1, :] += 20  # sample 1: the teacher right everywhere; sample 0 wrong globally, right on region 2
    zt[0, 0, 2] += 20
    zt[0, 0, 0] -= 20
    T = 4.0
    pred = zt.argmax(1)  # B x N
    w = np.where((pred == y[:, None]) != (pred[:, :1] == y[:, None]), 2.0, 1.0)
    assert w[0, 2] == 2.0 and (w[1] == 1).all() and (w[:, 0] == 1).all()
    kl = (softmax(zt / T, 1) * np.log(softmax(zt / T, 1) / softmax(zs / T, 1))).sum(1) * T**2  # B x N
    expected_kd = (w * kl).sum() / (b * n)
    got = sdd_loss(t(zs), t(zt), torch.tensor(y), "kd", T)
    assert got.item() == pytest.approx(expected_kd, rel=1e-5)
    assert got.item() == pytest.approx(authors_sdd_kd(t(zs), t(zt), T, torch.tensor(y)).item(), rel=1e-5)
    # SD-DKD: DKD's two terms per region
    ps, pt = softmax(zs / T, 1), softmax(zt / T, 1)
    onehot = np.eye(k)[y][:, :, None]  # B x K x 1
    bs = np.stack([(ps * onehot).sum(1), (ps * (1 - onehot)).sum(1)], 1)
    bt = np.stack([(pt * onehot).sum(1), (pt * (1 - onehot)).sum(1)], 1)
    tckd = (bt * np.log(bt / bs)).sum(1) * T**2
    qs = softmax(zs / T - 1000.0 * onehot, 1)
    qt = softmax(zt / T - 1000.0 * onehot, 1)
    nckd = (qt * (np.log(qt + 1e-30) - np.log(qs + 1e-30))).sum(1) * T**2
    expected_dkd = (w * (1.0 * tckd + 8.0 * nckd)).sum() / (b * n)
    got = sdd_loss(t(zs), t(zt), torch.tensor(y), "dkd", T, 1.0, 8.0)
    assert got.item() == pytest.approx(expected_dkd, rel=1e-4)
    assert got.item() == pytest.approx(authors_sdd_dkd(t(zs), t(zt), torch.tensor(y), 1.0, 8.0, T).item(), rel=1e-5)
    # complementary weight 1: plain KD averaged over every region
    assert sdd_loss(t(zs), t(zt), torch.tensor(y), "kd", T, complementary=1.0).item() == pytest.approx(
        kl.mean(), rel=1e-5)


def test_sdd_distiller_loss_and_warmup():
    s, te = pair()
    x, y = batch(4)
    d = build_distiller(method_cfg("sdd", warmup=4), s, te)
    d.train()
    d.set_epoch(0, 10)  # 1-based epoch 1 of a 4-epoch warm-up
    _, losses = d.forward_train(x, y)
    with torch.no_grad():
        _, fs = d.student(x, features=True)
        _, ft = te(x, features=True)
        rs, rt = region_logits(d.student, fs["last"], [1, 2, 4]), region_logits(te, ft["last"], [1, 2, 4])
    expected = authors_sdd_dkd(rs, rt, y, 1.0, 8.0, 4.0).item()
    assert losses["sdd"].item() == pytest.approx(0.25 * expected, rel=1e-4)
    d.set_epoch(5, 10)
    assert d.warmup_factor() == 1.0
    name, over = method_variants()["sdd_kd"]
    cfg = load_config(None, [f"method={name}", "model.name=resnet8", "teacher.name=resnet8", *over])
    dk = build_distiller(cfg, s, te)
    assert (dk.base, dk.ce_weight, dk.kd_weight, dk.warmup_factor()) == ("kd", 0.1, 0.9, 1.0)


# ----- WKD-L ------------------------------------------------------------------------------------------------------
def authors_wkd_l(logits_student, logits_teacher, gt_label, temperature, gamma, cost_matrix, lam=0.05, iters=10):
    """JiamingLv/WKD mdistiller/distillers/WKD.py ``wkd_logit_loss_with_speration``: the target term, then the
    target column removed from the logits and its row and column from a per-sample copy of the cost, softmax at T,
    ``sinkhorn`` (u from 1/dim, v = w2 / (K^T u + 1e-8), u = w1 / (K v + 1e-8)), the plan's cost, batch mean."""
    label = gt_label.view(-1, 1)
    n, c = logits_student.shape
    s_t = torch.gather(F.log_softmax(logits_student, dim=1), 1, label)
    t_t = torch.gather(F.softmax(logits_teacher, dim=1), 1, label)
    loss_t = -(t_t * s_t).mean()
    mask = torch.ones_like(logits_student).scatter_(1, label, 0).bool()
    ls, lt = logits_student[mask].reshape(n, -1), logits_teacher[mask].reshape(n, -1)
    cost = cost_matrix.repeat(n, 1, 1)[mask.unsqueeze(1) * mask.unsqueeze(2)].reshape(n, c - 1, c - 1)
    w1 = F.softmax(ls / temperature, dim=-1).unsqueeze(-1)
    w2 = F.softmax(lt / temperature, dim=-1).unsqueeze(-1)
    cost = F.relu(cost) + 1e-8
    u = torch.ones_like(w1) / (c - 1)
    k = torch.exp(-cost / lam)
    for _ in range(iters):
        v = w2 / (torch.bmm(k.transpose(2, 1), u) + 1e-8)
        u = w1 / (torch.bmm(k, v) + 1e-8)
    flow = u.reshape(n, -1, 1) * k * v.reshape(n, 1, -1)
    return loss_t + gamma * (flow * cost).sum(-1).sum(-1).mean()


def numpy_sinkhorn_wd(p, q, cost, lam, iters):
    """The entropic OT distance of the paper's Eq. (Sinkhorn scaling) for one pair of distributions."""
    k = np.exp(-cost / lam)
    u = np.full_like(p, 1.0 / len(p))
    for _ in range(iters):
        v = q / (k.T @ u + 1e-8)
        u = p / (k @ v + 1e-8)
    return (u[:, None] * k * v[None, :] * cost).sum()


def test_wkd_l_by_the_papers_equation_and_the_authors_code():
    zs, zt = logits(b=5, c=8)
    y = np.array([0, 3, 7, 2, 2])
    g = np.random.default_rng(5)
    w = g.normal(size=(8, 6))
    wn = w / np.linalg.norm(w, axis=1, keepdims=True)
    d0 = 1 - wn @ wn.T
    d = 1 - np.exp(-d0)  # sharpen 1
    cost = np.maximum(d, 0) + 1e-8
    T, lam = 2.0, 0.05
    target = np.mean([-softmax(zt[i])[y[i]] * np.log(softmax(zs[i])[y[i]]) for i in range(5)])
    wds = []
    for i in range(5):
        keep = [j for j in range(8) if j != y[i]]
        wds.append(numpy_sinkhorn_wd(softmax(zs[i, keep] / T), softmax(zt[i, keep] / T), cost[np.ix_(keep, keep)],
                                     lam, 10))
    got_t, got_wd = wkd_logit_terms(t(zs), t(zt), torch.tensor(y), t(cost), T, lam, 10)
    assert got_t.item() == pytest.approx(target, rel=1e-5)
    assert got_wd.item() == pytest.approx(np.mean(wds), rel=1e-4)
    torch.testing.assert_close(classifier_cost(t(w)), t(d0), rtol=1e-5, atol=1e-6)
    ref = authors_wkd_l(t(zs).double(), t(zt).double(), torch.tensor(y), T, 30.0, t(d).double(), lam)
    assert (got_t + 30.0 * got_wd).item() == pytest.approx(ref.item(), rel=1e-5)
    # the gradient flows through the Sinkhorn iterations, as the authors'
    z = t(zs).double().requires_grad_(True)
    authors_wkd_l(z, t(zt).double(), torch.tensor(y), T, 30.0, t(d).double(), lam).backward()
    z2 = t(zs).requires_grad_(True)
    a, b = wkd_logit_terms(z2, t(zt), torch.tensor(y), t(cost), T, lam, 10)
    (a + 30.0 * b).backward()
    np.testing.assert_allclose(z2.grad.numpy(), z.grad.numpy(), rtol=1e-3, atol=1e-6)


def test_wkd_l_cost_sources_and_cosine_decay(tmp_path):
    s, te = pair()
    d = build_distiller(method_cfg("wkd_l"), s, te)
    expected = F.relu(1 - torch.exp(-classifier_cost(te.classifier.weight))) + 1e-8
    torch.testing.assert_close(d.cost, expected)
    assert d.extra_state_dict() == {}  # the cost is rebuilt from the teacher, not saved
    m = torch.rand(10, 10)
    torch.save(m, tmp_path / "cost.pth")
    np.save(tmp_path / "cost.npy", m.numpy())
    for name in ("cost.pth", "cost.npy"):
        dd = build_distiller(method_cfg("wkd_l", cost=str(tmp_path / name), sharpen=0.0), s, te)
        torch.testing.assert_close(dd.cost, m + 1e-8)
    torch.save(torch.rand(5, 5), tmp_path / "small.pth")
    with pytest.raises(LakdError, match="10 x 10"):
        build_distiller(method_cfg("wkd_l", cost=str(tmp_path / "small.pth")), s, te)
    with pytest.raises(LakdError, match="no file"):
        build_distiller(method_cfg("wkd_l", cost=str(tmp_path / "missing.pth")), s, te)
    # the authors' schedule: constant up to the start epoch, then half a cosine down to 0 at the last epoch
    assert cosine_decay(600.0, 150, 150, 240) == 600.0
    assert cosine_decay(600.0, 195, 150, 240) == pytest.approx(300.0)
    assert cosine_decay(600.0, 240, 150, 240) == pytest.approx(0.0, abs=1e-9)
    assert cosine_decay(30.0, 50, 0, 100) == pytest.approx(15.0)
    d.set_epoch(194, 240)  # 0-based: the authors' epoch 195
    assert d.weight_now() == pytest.approx(300.0)


# ----- WKD-F ------------------------------------------------------------------------------------------------------
def authors_wkd_f(f_s, f_t, eps=1e-5, grid=1):
    """JiamingLv/WKD ``wkd_feature_loss`` (and ``adaptive_avg_std_pool2d``'s floor/ceil windows for a grid):
    the summed squared differences of the means and of sqrt(var + eps), over (grid^2) B."""
    if grid == 1:
        ms, mt = f_s.mean(dim=(-1, -2)), f_t.mean(dim=(-1, -2))
        ss, st = torch.sqrt(f_s.var(dim=(-1, -2)) + eps), torch.sqrt(f_t.var(dim=(-1, -2)) + eps)
        n = f_s.size(0)
    else:
        def pool(x):
            b, c, h, w = x.shape
            avg, std = torch.zeros(b, c, grid, grid), torch.zeros(b, c, grid, grid)
            for oh in range(grid):
                h0, h1 = int(np.floor(oh * h / grid)), int(np.ceil((oh + 1) * h / grid))
                for ow in range(grid):
                    w0, w1 = int(np.floor(ow * w / grid)), int(np.ceil((ow + 1) * w / grid))
                    blk = x[:, :, h0:h1, w0:w1]
                    avg[:, :, oh, ow] = blk.mean(dim=(-1, -2))
                    std[:, :, oh, ow] = torch.sqrt(blk.var(dim=(-1, -2)) + eps)
            return avg, std

        (ms, ss), (mt, st) = pool(f_s), pool(f_t)
        n = grid**2 * f_s.size(0)
    return F.mse_loss(ms, mt, reduction="sum") / n, F.mse_loss(ss, st, reduction="sum") / n


def test_wkd_f_by_the_papers_equation_and_the_authors_code():
    g = np.random.default_rng(7)
    for hw, grid in ((8, 1), (8, 4), (7, 4), (7, 2)):
        fs, ft = np.maximum(g.normal(size=(3, 5, hw, hw)), 0), np.maximum(g.normal(size=(3, 5, hw, hw)), 0)
        # W2^2 of diagonal Gaussians, per cell: ||mu_s - mu_t||^2 + ||sigma_s - sigma_t||^2
        mean_sq = std_sq = 0.0
        for i in range(grid):
            r = slice(math.floor(i * hw / grid), math.ceil((i + 1) * hw / grid))
            for j in range(grid):
                c = slice(math.floor(j * hw / grid), math.ceil((j + 1) * hw / grid))
                bs, bt = fs[:, :, r, c].reshape(3, 5, -1), ft[:, :, r, c].reshape(3, 5, -1)
                mean_sq += ((bs.mean(-1) - bt.mean(-1)) ** 2).sum()
                std_sq += ((np.sqrt(bs.var(-1, ddof=1) + 1e-5) - np.sqrt(bt.var(-1, ddof=1) + 1e-5)) ** 2).sum()
        got = wkd_feature_terms(t(fs), t(ft), grid)
        assert got[0].item() == pytest.approx(mean_sq / (grid**2 * 3), rel=1e-5)
        assert got[1].item() == pytest.approx(std_sq / (grid**2 * 3), rel=1e-5)
        ref = authors_wkd_f(t(fs), t(ft), grid=grid)
        for a, b in zip(got, ref):
            assert a.item() == pytest.approx(b.item(), rel=1e-6)
    # a grid finer than the map: one-pixel cells have variance 0 (the authors' unbiased variance would be 0/0)
    mu, sd = wkd_feature_terms(torch.rand(2, 3, 2, 2), torch.rand(2, 3, 2, 2), 4)
    assert torch.isfinite(mu) and torch.isfinite(sd)


def test_wkd_f_projectors_and_the_distiller_loss():
    s, te = pair()
    x, y = batch(4)
    d = build_distiller(method_cfg("wkd_f", decay_from=0), s, te)
    assert [n for n, _ in d.named_trainable_parameters() if not n.startswith("student.")] == [
        "projector.conv.weight", "projector.conv.bias", "projector.bn.weight", "projector.bn.bias"]
    d.train()
    d.set_epoch(0, 4)  # epoch 1 of 4, decaying from the start: weight 0.08 * (1 + cos(pi / 4)) / 2
    _, losses = d.forward_train(x, y)
    with torch.no_grad():  # training mode: the projector's BatchNorm normalises by this batch's statistics again
        _, fs = d.student(x, features=True)
        _, ft = te(x, features=True)
        ps = d.projector(fs["stages"][-1])
    mean_t, std_t = authors_wkd_f(ps, ft["stages"][-1])
    w = 0.08 * (1 + math.cos(math.pi / 4)) / 2
    assert losses["wkd_f"].item() == pytest.approx(w * (4.0 * mean_t + std_t).item(), rel=1e-4)
    b = build_distiller(method_cfg("wkd_f", projector="bottleneck"), s, te)
    assert [type(m).__name__ for m in b.projector.children()] == ["Conv2d", "Conv2d", "Conv2d", "BatchNorm2d"]
    assert b.projector.conv1.out_channels == 256 and b.projector.conv2.kernel_size == (3, 3)


# ----- CRLD -------------------------------------------------------------------------------------------------------
def authors_crld(s_w, s_s, t_w, t_s, target, ce=1.0, wv=2.0, cv=0.5, temp=4.0, tau_w=0.9, tau_s=0.2):
    """The authors' ``CRLD.forward_train`` (mdistiller/distillers/CRLD.py of the CRLD code) from the four logits:
    per-sample ``kd_loss(reduce=False)`` times T^2, the masks ``max softmax >= tau`` of each teacher view, the
    masked sums averaged over the batch."""
    def kd(zs, zt):
        return F.kl_div(F.log_softmax(zs / temp, dim=1), F.softmax(zt / temp, dim=1), reduction="none").sum(1) * temp**2

    mask_w = F.softmax(t_w, dim=1).max(dim=1)[0].ge(tau_w)
    mask_s = F.softmax(t_s, dim=1).max(dim=1)[0].ge(tau_s)
    return {"ce": ce * (F.cross_entropy(s_w, target) + F.cross_entropy(s_s, target)),
            "within": wv * ((kd(s_w, t_w) + kd(s_s, t_s)) * mask_w).mean(),
            "cross": cv * ((kd(s_s, t_w) + kd(s_w, t_s)) * mask_s).mean()}


def test_crld_by_the_papers_equation():
    g = np.random.default_rng(11)
    sw, ss, tw, ts = (g.normal(size=(6, 5)) * k for k in (2, 2, 4, 3))
    tw[:3, 0] += 8  # three confident weak-view teacher rows
    T, tau_w, tau_s = 4.0, 0.9, 0.2

    def kl(zs, zt):
        pt, ps = softmax(zt / T), softmax(zs / T)
        return (pt * np.log(pt / ps)).sum(1) * T**2

    mw = (softmax(tw).max(1) >= tau_w).astype(float)
    ms = (softmax(ts).max(1) >= tau_s).astype(float)
    assert 0 < mw.sum() < 6  # the threshold selects samples
    within, cross = crld_terms(t(sw), t(ss), t(tw), t(ts), T, tau_w, tau_s)
    assert within.item() == pytest.approx(((kl(sw, tw) + kl(ss, ts)) * mw).mean(), rel=1e-5)
    assert cross.item() == pytest.approx(((kl(ss, tw) + kl(sw, ts)) * ms).mean(), rel=1e-5)


def test_crld_equals_the_authors_forward_on_two_views():
    s, te = pair()
    x, y = batch(5)
    x2 = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(9))
    d = build_distiller(method_cfg("crld", tau_w=0.1), s, te)  # a random teacher is not confident: a low threshold
    assert d.views(d.cfg) == {"strong": {"randaugment": 2, "cutout": 0.5}}  # the authors' RandAugment + Cutout
    d.train()
    logits_, losses = d.forward_train(x, y, views={"strong": x2})
    with torch.no_grad():
        sw, ss, tw, ts = d.student(x), d.student(x2), te(x), te(x2)
    assert torch.allclose(logits_, sw, atol=1e-5)  # the step's logits are the weak view's
    ref = authors_crld(sw, ss, tw, ts, y, tau_w=0.1)
    assert set(losses) == set(ref)
    for k in ref:
        assert losses[k].item() == pytest.approx(ref[k].item(), rel=1e-4), k
    with pytest.raises(LakdError, match="strong view"):
        d.forward_train(x, y)
    with pytest.raises(LakdError, match="does not match"):
        d.forward_train(x, y, views={"strong": x2[:3]})


# ----- every method: gradients, state, settings, configs, the command -------------------------------------------
@pytest.mark.parametrize("method", METHODS + ["sdd_kd", "ttm"])
def test_gradients_reach_the_student_and_extra_parts_never_the_teacher(method):
    name, overrides = method_variants()[method]
    cfg = load_config(None, [f"method={name}", "model.name=resnet8", "teacher.name=resnet8", *overrides])
    s, te = pair()
    d = build_distiller(cfg, s, te)
    x, y = batch(4)
    d.train()
    _, losses = d.forward_train(x, y, views=d.random_views(x) or None)
    assert all(torch.isfinite(v) for v in losses.values()), losses
    sum(losses.values()).backward()
    assert all(p.grad is None for p in te.parameters())
    for n, p in d.named_trainable_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n
    extra = [n for n, _ in d.named_trainable_parameters() if not n.startswith("student.")]
    assert bool(extra) == (name == "wkd_f")
    assert d.unreached_parameters() == []


@pytest.mark.parametrize("method, extra", [("wkd_f", ["wkd_f.decay_from=0"]), ("wkd_l", ["wkd_l.decay_from=0"]),
                                           ("sdd", ["sdd.warmup=2"]), ("crld", [])])
def test_a_resumed_run_continues_bitwise(method, extra, tmp_path):
    """WKD-F's projector (with BatchNorm statistics), the epoch-dependent weights of WKD-L (cosine decay) and SDD
    (warm-up), and CRLD's random strong views (made by the data pipeline): a run stopped after its first epoch and
    resumed ends bitwise where the uninterrupted run does."""
    teacher = tmp_path / "t.pt"
    torch.save({"model": create_model("resnet8", 10).state_dict(), "arch": "resnet8", "num_classes": 10}, teacher)
    common = ["data.dataset=digits", "data.train_subset=96", "data.test_subset=32", "solver.batch_size=32",
              "solver.lr=0.05", "model.name=resnet8", "train.progress=false", "train.threads=1",
              "data.num_workers=0", f"method={method}", "teacher.name=resnet8", f"teacher.checkpoint={teacher}",
              "solver.epochs=2", "solver.max_steps_per_epoch=2", f"output_dir={tmp_path}", *extra]
    full, resumed = run_stopped_and_resumed(common, tmp_path)
    a, b = full.distiller.state_dict(), resumed.distiller.state_dict()
    assert a.keys() == b.keys()
    if method == "wkd_f":
        assert "projector.bn.running_mean" in a and set(full.distiller.extra_state_dict()) >= {
            "projector.conv.weight", "projector.bn.running_var"}
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_wkd_f_extra_state_is_required_on_load():
    s, te = pair()
    d = build_distiller(method_cfg("wkd_f"), s, te)
    with pytest.raises(LakdError, match="lacks"):
        d.load_extra_state_dict({})


@pytest.mark.parametrize("method, section, match", [
    ("wttm", {"gamma": 0}, "wttm.gamma"), ("wttm", {"weighted": "yes"}, "wttm.weighted"),
    ("skd", {"tikhonov": -1}, "skd.tikhonov"), ("skd", {"masks": 1}, "skd.masks"),
    ("sdd", {"base": "nkd"}, "sdd.base"), ("sdd", {"scales": [2, 4]}, "sdd.scales"),
    ("sdd", {"scales": [1, 1]}, "sdd.scales"), ("sdd", {"T": 0}, "sdd.T"),
    ("wkd_l", {"sinkhorn_iters": 0}, "wkd_l.sinkhorn_iters"), ("wkd_l", {"cost": 3}, "wkd_l.cost"),
    ("wkd_l", {"T": -2}, "wkd_l.T"), ("wkd_f", {"projector": "mlp"}, "wkd_f.projector"),
    ("wkd_f", {"grid": 0}, "wkd_f.grid"), ("wkd_f", {"stage": 9}, "wkd_f.stage"),
    ("crld", {"tau_w": 1.5}, "crld.tau_w"), ("crld", {"T": 0}, "crld.T")])
def test_bad_settings_name_the_key(method, section, match):
    s, te = pair()
    with pytest.raises(LakdError, match=match):
        build_distiller(method_cfg(method, **section), s, te)


def test_lakd_methods_lists_the_new_methods(capsys):
    from lakd.cli.main import main

    assert main(["methods"]) == 0
    out = "\n" + capsys.readouterr().out
    for name in METHODS:
        assert f"\n{name} " in out, name
    assert {"sdd_kd", "ttm"} <= set(method_variants())
    assert [DISTILLERS.get(m).display_name for m in METHODS] == ["SDD", "WTTM", "WKD-L", "WKD-F", "SKD", "CRLD"]


def test_every_config_of_these_methods_loads():
    paths = [p for m in METHODS for p in glob.glob(os.path.join(ROOT, "configs", "*", m, "*.yaml"))]
    assert len(paths) == 7 * len(METHODS) + 6  # six CIFAR-100 pairs, CIFAR-10 and ImageNet each
    for p in paths:
        cfg = load_config(p)
        method = os.path.basename(os.path.dirname(p))
        assert cfg["method"] == method, p
        if "/cifar100/" in p:
            t_, s_ = cfg["teacher"]["name"], cfg["model"]["name"]
            assert (t_, s_) in PAIRS and cfg["experiment"] == f"cifar100_{method}_{t_}_{s_}"
            assert cfg["solver"]["epochs"] == 300 and cfg["solver"]["schedule"] == "linear"  # the paper's recipe
    sdd = load_config(os.path.join(ROOT, "configs/cifar100/sdd/resnet32x4_resnet8x4.yaml"))["sdd"]
    assert (sdd["base"], sdd["scales"], sdd["beta"], sdd["warmup"]) == ("dkd", [1, 2], 8.0, 20)
    skd = load_config(os.path.join(ROOT, "configs/cifar100/skd/resnet32x4_resnet8x4.yaml"))["skd"]
    assert (skd["ce_weight"], skd["kd_weight"], skd["T"], skd["tikhonov"]) == (0.5, 0.5, 4.0, 0.1)


@pytest.mark.parametrize("teacher, student", PAIRS)
def test_configs_run_on_the_real_architectures(teacher, student, run_shipped_configs):
    run_shipped_configs(METHODS, [(teacher, student)])


def test_two_step_train_runs_through_the_command(digits_overrides, capsys):
    from lakd.cli.main import main

    for method in METHODS:  # one epoch: SDD's warm-up no longer than the run
        extra = ["sdd.warmup=1"] if method == "sdd" else []
        assert main(["train", *digits_overrides(method, [f"experiment=smoke_{method}", *extra])]) == 0, method
    capsys.readouterr()


def test_on_an_adapted_torchvision_network():
    """Every method on torchvision resnet18s adapted by ``lakd.models.adapt`` (adapted once: the trace is the slow
    part): SDD's regions through the adapted network's class maps, WKD-L's cost from its fc."""
    import torchvision

    from lakd.models import adapt

    torch.manual_seed(0)
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([1, 4])
    fs = adapt(torchvision.models.resnet18(num_classes=10), input_size=32)
    ft = adapt(torchvision.models.resnet18(num_classes=10), input_size=32)
    with torch.no_grad():
        _, feats = ft(x, features=True)
        torch.testing.assert_close(region_logits(ft, feats["last"], [1])[:, :, 0], ft(x), rtol=1e-4, atol=1e-4)
    for method in METHODS:
        d = build_distiller(method_cfg(method), fs, ft)
        b = {"image": x, "target": y, **({"views": d.random_views(x)} if d.views(d.cfg) else {})}
        _, losses = d.train_step(b, lambda loss, **kw: loss.backward(**kw))
        assert all(torch.isfinite(v) for v in losses.values()), method
