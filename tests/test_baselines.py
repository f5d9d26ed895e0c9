"""The baseline distillers (FitNet, AT, RKD, CRD, OFD, CAT-KD, DKD): each loss against a hand computation,
a few SGD steps that lower the loss, the save/load round trip of the extra state, bad settings, and every
shipped baseline config (it loads, and its distiller runs on the real architectures)."""
from __future__ import annotations

import copy
import glob
import math
import os

import numpy as np
import pytest
import torch
import torch.nn as nn

from lakd.config import default_data_root, full_defaults, load_config
from lakd.distillers import build_distiller
from lakd.distillers.at import at_loss
from lakd.distillers.crd import ContrastMemory, nce_loss
from lakd.distillers.dkd import DKD, dkd_terms
from lakd.distillers.ofd import bn_before_stage_outputs, ofd_distance, ofd_margin
from lakd.distillers.rkd import rkd_angle_loss, rkd_distance_loss
from lakd.errors import LakdError
from lakd.models import create_model, list_models

pytestmark = pytest.mark.usefixtures("one_thread")  # small tensors: one thread is faster (conftest.py)


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = ["fitnet", "at", "rkd", "crd", "ofd", "catkd", "dkd"]
PAIRS = [("resnet56", "resnet20"), ("resnet110", "resnet32"), ("resnet32x4", "resnet8x4"),
         ("wrn_40_2", "wrn_16_2"), ("wrn_40_2", "wrn_40_1"), ("vgg13", "vgg8")]


def method_cfg(method: str, **section) -> dict:
    cfg = copy.deepcopy(full_defaults())
    cfg["method"] = method
    if section:
        cfg[method] = {**cfg.get(method, {}), **section}
    return cfg


def run_stopped_and_resumed(overrides: list[str], tmp_path):
    """The same tiny run twice: uninterrupted (``full``), and stopped after its first epoch's checkpoint, then
    resumed from it (``resumed``). The stopped run starts as ``fit`` does a fresh run, with the method's own stage
    (``Distiller.prepare``; a no-op for most methods). Returns both trainers, fitted."""
    from lakd.engine.checkpoint import atomic_save
    from lakd.engine.trainer import Trainer

    full = Trainer(load_config(None, overrides + ["experiment=full"]), quiet=True)
    full.fit()
    tr = Trainer(load_config(None, overrides + ["experiment=part"]), quiet=True)
    tr.distiller.prepare(tr.data.train, tr.device)
    tr.train_epoch(0)
    atomic_save(tr._checkpoint(1), str(tmp_path / "part" / "last.pt"))
    tr.close()
    resumed = Trainer(load_config(None, overrides + ["experiment=part", f"resume={tmp_path}/part"]), quiet=True)
    assert resumed.start_epoch == 1
    resumed.fit()
    return full, resumed


def calibrated(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """Set every BN's running statistics to those of ``x`` (a random-init teacher then has sane outputs)."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # cumulative average: one pass sets the batch statistics
    model.train()
    with torch.no_grad():
        model(x)
    return model.eval()


# ----- losses against hand computations ---------------------------------------------------------------------
def test_at_loss_by_hand():
    f_s = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]], [[0.0, 1.0], [1.0, 0.0]]]])  # 1 x 2 x 2 x 2
    f_t = torch.arange(16, dtype=torch.float32).view(1, 1, 4, 4) / 4  # 1 x 1 x 4 x 4, pooled to 2 x 2
    t = f_t.numpy()[0, 0]
    pooled = np.array([[t[0:2, 0:2].mean(), t[0:2, 2:4].mean()], [t[2:4, 0:2].mean(), t[2:4, 2:4].mean()]])
    a_t = (pooled**2).ravel()
    a_t /= np.linalg.norm(a_t)
    a_s = np.array([(1 + 0) / 2, (4 + 1) / 2, (9 + 1) / 2, (16 + 0) / 2])
    a_s /= np.linalg.norm(a_s)
    expected = ((a_s - a_t) ** 2).mean()
    assert at_loss([f_s], [f_t], 2.0).item() == pytest.approx(expected, rel=1e-5)
    # two stages sum; lists of different length pair their last entries
    assert at_loss([f_s, f_s], [f_t, f_t], 2.0).item() == pytest.approx(2 * expected, rel=1e-5)
    assert at_loss([f_t, f_s], [f_t], 2.0).item() == pytest.approx(expected, rel=1e-5)


def test_rkd_distance_and_angle_by_hand():
    s = torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 4.0]])  # a 3-4-5 right triangle
    t = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])  # a right isosceles triangle

    def smooth_l1(d):
        d = abs(d)
        return 0.5 * d * d if d < 1 else d - 0.5

    # distances divided by the mean of the positive ones: student (3, 4, 5)/4, teacher (1, 1, sqrt 2)/mean
    mt = (2 + math.sqrt(2)) / 3
    pairs = [(3 / 4, 1 / mt), (4 / 4, 1 / mt), (5 / 4, math.sqrt(2) / mt)]
    dist = 2 * sum(smooth_l1(a - b) for a, b in pairs) / 9  # each pair twice in the 3 x 3 matrix
    assert rkd_distance_loss(s, t).item() == pytest.approx(dist, rel=1e-5)
    # cosines at each vertex: student 0, 3/5, 4/5; teacher 0, 1/sqrt2, 1/sqrt2; (j, k) and (k, j) per vertex,
    # the (j, j) entries are 1 on both sides and the entries involving the vertex itself 0
    c = 1 / math.sqrt(2)
    angle = 2 * (smooth_l1(0 - 0) + smooth_l1(0.6 - c) + smooth_l1(0.8 - c)) / 27
    assert rkd_angle_loss(s, t).item() == pytest.approx(angle, rel=1e-5)
    # scale invariance of the distance term; the teacher side carries no gradient
    assert rkd_distance_loss(10 * s, t).item() == pytest.approx(dist, rel=1e-5)
    s.requires_grad_(True)
    tt = t.clone().requires_grad_(True)
    (rkd_distance_loss(s, tt) + rkd_angle_loss(s, tt)).backward()
    assert tt.grad is None and s.grad is not None and torch.isfinite(s.grad).all()


def test_dkd_split_by_hand():
    zs = np.array([[2.0, 0.5, -1.0, 0.0], [0.1, 0.3, 1.5, -0.4]])
    zt = np.array([[3.0, -0.5, 0.2, 1.0], [-1.0, 0.0, 2.5, 0.5]])
    y = np.array([0, 2])
    T = 4.0

    def softmax(z):
        e = np.exp(z - z.max())
        return e / e.sum()

    tckd = nckd = kd = 0.0
    for i in range(2):
        ps, pt = softmax(zs[i] / T), softmax(zt[i] / T)
        bs = np.array([ps[y[i]], 1 - ps[y[i]]])
        bt = np.array([pt[y[i]], 1 - pt[y[i]]])
        other = [j for j in range(4) if j != y[i]]
        qs, qt = ps[other] / ps[other].sum(), pt[other] / pt[other].sum()
        tckd += (bt * np.log(bt / bs)).sum()
        nckd += (qt * np.log(qt / qs)).sum()
        kd_i = (pt * np.log(pt / ps)).sum()
        # the DKD identity: KD = TCKD + (1 - p_t^teacher) * NCKD, per sample
        assert kd_i == pytest.approx((bt * np.log(bt / bs)).sum() + bt[1] * (qt * np.log(qt / qs)).sum())
        kd += kd_i
    got_t, got_n = dkd_terms(torch.tensor(zs, dtype=torch.float32), torch.tensor(zt, dtype=torch.float32),
                             torch.tensor(y), T)
    assert got_t.item() == pytest.approx(tckd * T**2 / 2, rel=1e-4)
    assert got_n.item() == pytest.approx(nckd * T**2 / 2, rel=1e-4)


def test_dkd_warmup_and_weights():
    torch.manual_seed(0)
    s, t = create_model("resnet8", 10), create_model("resnet8", 10)
    d = DKD(s, t, method_cfg("dkd", alpha=2.0, beta=3.0, warmup=20))
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    d.set_epoch(0, 240)
    assert d.warmup_factor() == pytest.approx(1 / 20)  # mdistiller's epoch 1
    _, losses = d.forward_train(x, y)
    with torch.no_grad():
        tckd, nckd = dkd_terms(s(x), t(x), y, 4.0)
    assert losses["tckd"].item() == pytest.approx(2.0 * tckd.item() / 20, rel=1e-4)
    assert losses["nckd"].item() == pytest.approx(3.0 * nckd.item() / 20, rel=1e-4)
    d.set_epoch(19, 240)
    assert d.warmup_factor() == 1.0
    d.set_epoch(100, 240)
    assert d.warmup_factor() == 1.0


def test_crd_nce_and_memory_by_hand():
    n, dim, k, temp, mom = 4, 2, 2, 0.5, 0.5
    mem = ContrastMemory(dim, n, k, temp, mom, negatives="uniform")
    mem.memory_s.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [-1.0, 0.0]]))
    mem.memory_t.copy_(torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.8, 0.6], [0.0, -1.0]]))
    v_s = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    v_t = torch.tensor([[0.6, 0.8], [0.8, 0.6]])
    index = torch.tensor([0, 2])
    cidx = torch.tensor([[0, 1, 3], [2, 0, 1]])
    ms, mt = mem.memory_s.clone().numpy(), mem.memory_t.clone().numpy()
    out_s, out_t = mem(v_s, v_t, index, contrast_index=cidx)
    # by hand: exp(<v, bank row> / T), Z = mean * N fixed on this first batch
    raw_s = np.exp(np.stack([mt[cidx[i].numpy()] @ v_s[i].numpy() for i in range(2)]) / temp)
    raw_t = np.exp(np.stack([ms[cidx[i].numpy()] @ v_t[i].numpy() for i in range(2)]) / temp)
    exp_s, exp_t = raw_s / (raw_s.mean() * n), raw_t / (raw_t.mean() * n)
    np.testing.assert_allclose(out_s.numpy(), exp_s, rtol=1e-5)
    np.testing.assert_allclose(out_t.numpy(), exp_t, rtol=1e-5)
    assert mem.z[0].item() == pytest.approx(raw_s.mean() * n, rel=1e-5)

    def nce_by_hand(p):
        c = k / n  # m * Pn
        pos = np.log(p[:, 0] / (p[:, 0] + c + 1e-7)).sum()
        neg = np.log(c / (p[:, 1:] + c + 1e-7)).sum()
        return -(pos + neg) / p.shape[0]

    assert nce_loss(out_s, n).item() == pytest.approx(nce_by_hand(exp_s), rel=1e-5)
    # the banks' rows of the batch images moved to normalize(m * old + (1 - m) * v); the others did not
    new_row = mom * ms[2] + (1 - mom) * v_s[1].numpy()
    np.testing.assert_allclose(mem.memory_s[2].numpy(), new_row / np.linalg.norm(new_row), rtol=1e-5)
    np.testing.assert_allclose(mem.memory_s[1].numpy(), ms[1])
    new_row = mom * mt[0] + (1 - mom) * v_t[0].numpy()
    np.testing.assert_allclose(mem.memory_t[0].numpy(), new_row / np.linalg.norm(new_row), rtol=1e-5)
    # Z stays fixed after the first batch
    z = mem.z.clone()
    mem(v_s, v_t, index, contrast_index=cidx)
    assert torch.equal(mem.z, z)


def test_crd_negatives_avoid_known_same_class():
    torch.manual_seed(0)
    mem = ContrastMemory(4, 8, 5, 0.07, 0.5, negatives="other_class")
    mem.labels.copy_(torch.tensor([0, 0, 0, 0, 1, 1, 1, 1]))
    idx = mem.sample(torch.tensor([0, 5]), torch.tensor([0, 1]))
    assert idx.shape == (2, 6) and idx[:, 0].tolist() == [0, 5]
    # with 3 redraws the chance of a leftover same-class negative is tiny; check the redraw took place
    same = (mem.labels[idx[:, 1:]] == torch.tensor([[0], [1]])).float().mean().item()
    assert same < 0.2


def test_fitnet_mse_with_identity_regressor():
    torch.manual_seed(0)
    s, t = create_model("resnet8", 10), create_model("resnet14", 10)
    d = build_distiller(method_cfg("fitnet", hint_stage=2, feat_weight=100.0), s, t)
    conv = d.regressor.conv
    assert isinstance(conv, nn.Conv2d) and conv.kernel_size == (1, 1)  # equal sizes: 1x1 (mdistiller)
    with torch.no_grad():
        conv.weight.copy_(torch.eye(32).view(32, 32, 1, 1))
        conv.bias.zero_()
    d.eval()  # BN with fresh running stats (0, 1) and affine (1, 0) is the identity
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([1, 2])
    _, losses = d.forward_train(x, y)
    with torch.no_grad():
        f_s = s(x, features=True)[1]["stages"][1]
        f_t = t(x, features=True)[1]["stages"][1]
        expected = 100.0 * ((f_s / math.sqrt(1 + 1e-5) - f_t) ** 2).mean()
    assert losses["fitnet"].item() == pytest.approx(expected.item(), rel=1e-4)


def test_fitnet_regressor_handles_size_mismatch():
    torch.manual_seed(0)
    # resnet8's stage 1 is 16 x 32 x 32, vgg8's 128 x 16 x 16 (after the first max-pool)
    s, t = create_model("resnet8", 10), create_model("vgg8", 10)
    d = build_distiller(method_cfg("fitnet", hint_stage=1), s, t)  # 32x32 student -> 16x16 teacher
    assert d.regressor.conv.stride == (2, 2)
    x = torch.randn(2, 3, 32, 32)
    _, losses = d.forward_train(x, torch.tensor([0, 1]))
    assert torch.isfinite(losses["fitnet"])


def test_ofd_partial_l2_and_margin_by_hand():
    # margin of N(0, 1): E[x | x < 0] = -sqrt(2 / pi); of N(1, 2^2): 1 - 2 phi(0.5) / Phi(-0.5); far positive: -3s
    m = ofd_margin(torch.tensor([1.0, 2.0, 1.0]), torch.tensor([0.0, 1.0, 5.0]))
    assert m.tolist() == pytest.approx([-math.sqrt(2 / math.pi), -1.2821559, -3.0], rel=1e-5)
    margin = torch.tensor([-1.0]).view(1, 1, 1, 1)
    t = torch.tensor([-3.0, -3.0, -0.5, -0.5, 2.0, 2.0]).view(1, 1, 1, 6)
    s = torch.tensor([-2.0, -0.5, -0.8, 0.0, 1.0, 3.0]).view(1, 1, 1, 6)
    # target = max(t, m) = [-1, -1, -0.5, -0.5, 2, 2]; counted where s > target or target > 0
    # cases: -2 < -1 (0); -0.5 > -1 (0.25); -0.8 < -0.5 (0); 0 > -0.5 (0.25); target 2 > 0: (1 - 2)^2, (3 - 2)^2
    expected = 0.25 + 0.25 + 1.0 + 1.0
    assert ofd_distance(s, t, margin).item() == pytest.approx(expected)
    # batch mean: two copies give the same value
    assert ofd_distance(s.repeat(2, 1, 1, 1), t.repeat(2, 1, 1, 1), margin).item() == pytest.approx(expected)


@pytest.mark.parametrize("arch,names", [
    ("resnet8", ["layer1.0.bn2", "layer2.0.bn2", "layer3.0.bn2"]),  # not the downsample BN
    ("wrn_16_1", ["block2.layer.0.bn1", "block3.layer.0.bn1", "bn1"]),
    ("vgg8", ["block1.1", "block2.1", "block3.1", "block4.1"]),
])
def test_ofd_finds_bn_before_each_stage_output(arch, names):
    model = create_model(arch, 10)
    found = bn_before_stage_outputs(model)
    lookup = {m: n for n, m in model.named_modules()}
    assert [lookup[b] for b in found] == names


def test_ofd_loss_uses_margins_and_stage_weights():
    torch.manual_seed(0)
    s, t = create_model("resnet8", 10), create_model("resnet8", 10)
    d = build_distiller(method_cfg("ofd"), s, t)
    assert d.margin0.shape == (1, 16, 1, 1)
    assert torch.allclose(d.margin2, torch.full((1, 64, 1, 1), -math.sqrt(2 / math.pi)))
    pre_s = [torch.randn(2, c, h, h) for c, h in ((16, 32), (32, 16), (64, 8))]
    pre_t = [torch.randn(2, c, h, h) for c, h in ((16, 32), (32, 16), (64, 8))]
    d.eval()
    with torch.no_grad():
        got = d.ofd_loss(pre_s, pre_t).item()
        want = sum(ofd_distance(conn(fs), ft, m).item() / 2 ** (2 - i)
                   for i, (fs, ft, conn, m) in enumerate(zip(pre_s, pre_t, d.connectors, d.margins())))
    assert got == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("role", ["student", "teacher"])
def test_ofd_refuses_a_model_without_preactivations(role):
    # MobileNetV2's stages end with a linear projection: the base class's check names the role and the fix
    models = {"student": create_model("resnet8", 10), "teacher": create_model("resnet8", 10)}
    models[role] = create_model("mobilenetv2", 10)
    with pytest.raises(LakdError, match=f"^method ofd needs pre-activation stage outputs from the {role}, but "
                                        f"MobileNetV2 has no pre-activation .*or another model$"):
        build_distiller(method_cfg("ofd"), models["student"], models["teacher"])


def test_catkd_on_tiny_cams():
    class Tiny(nn.Module):  # just what CAT-KD reads: the last map and the classifier
        def __init__(self, fmap, weight):
            super().__init__()
            self.fmap = fmap
            self.classifier = nn.Linear(weight.shape[1], weight.shape[0])
            with torch.no_grad():
                self.classifier.weight.copy_(weight)
            self.anchor = nn.Parameter(torch.zeros(()))

        def feature_info(self):
            return {"num_classes": self.classifier.out_features}

        def forward(self, x, features=False):
            logits = torch.zeros(x.shape[0], 2) + self.anchor
            return (logits, {"last": self.fmap}) if features else logits

    fmap_s = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]], [[0.0, 1.0], [0.0, 1.0]]]])  # 1 x 2 x 2 x 2
    fmap_t = torch.tensor([[[[2.0, 0.0], [0.0, 2.0]], [[1.0, 1.0], [1.0, 1.0]]]])
    w_s = torch.tensor([[1.0, 0.0], [1.0, -1.0]])
    w_t = torch.tensor([[0.5, 0.5], [0.0, 1.0]])
    d = build_distiller(method_cfg("catkd", beta=3.0, resolution=1, ce_weight=0.0),
                        Tiny(fmap_s, w_s), Tiny(fmap_t, w_t))
    _, losses = d.forward_train(torch.zeros(1, 3, 4, 4), torch.tensor([0]))
    # CAMs pooled to 1x1 = classifier applied to the mean feature: student mean (2.5, 0.5) -> (2.5, 2.0);
    # teacher mean (1, 1) -> (1.0, 1.0); MSE = ((1.5)^2 + 1^2) / 2
    assert losses["cat"].item() == pytest.approx(3.0 * (1.5**2 + 1.0) / 2)


# ----- training steps and state round trip -------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS + ["kd"])
def test_steps_lower_loss_and_state_round_trips(method, tmp_path):
    torch.manual_seed(0)
    x = torch.randn(16, 3, 32, 32)
    y = torch.arange(16) % 10
    index = torch.arange(16)
    teacher = calibrated(create_model("resnet14", 10), x)
    student = create_model("resnet8", 10)
    cfg = method_cfg(method, **({"nce_k": 15} if method == "crd" else {}))  # 16 images: at most 15 negatives
    d = build_distiller(cfg, student, teacher, num_data=16)
    d.train()
    params = d.trainable_parameters()
    assert all(not n.startswith("teacher.") for n, _ in d.named_trainable_parameters())
    opt = torch.optim.SGD(params, lr=0.01, momentum=0.9)
    # a stationary objective: CRD's banks move and its negatives are redrawn at every step, so each step starts
    # from the same bank state (after the first batch has fixed Z) and draws the same negatives
    torch.manual_seed(1)
    d.forward_train(x, y, index=index)
    bank = {k: v.clone() for k, v in d.named_buffers() if not k.startswith(("student.", "teacher."))}
    totals = []
    for _ in range(6):
        for k, v in d.named_buffers():
            if k in bank:
                v.copy_(bank[k])
        torch.manual_seed(1)
        _, losses = d.forward_train(x, y, index=index)
        total = sum(losses.values())
        totals.append(total.item())
        opt.zero_grad()
        total.backward()
        opt.step()
    assert all(math.isfinite(v) for v in totals)
    assert totals[-1] < totals[0], totals

    extra = d.extra_state_dict()
    expected_keys = {"fitnet": "regressor.", "ofd": "connectors.", "crd": "contrast.memory_s"}
    if method in expected_keys:
        assert any(k.startswith(expected_keys[method]) for k in extra)
    path = tmp_path / "extra.pt"
    torch.save(extra, path)
    student2 = create_model("resnet8", 10)
    student2.load_state_dict(student.state_dict())
    teacher2 = create_model("resnet14", 10)
    teacher2.load_state_dict(teacher.state_dict())
    d2 = build_distiller(cfg, student2, teacher2, num_data=16)
    d2.load_extra_state_dict(torch.load(path, weights_only=True))
    outs = []
    for dist in (d, d2):
        dist.eval()
        torch.manual_seed(1)  # the same CRD negatives for both
        with torch.no_grad():
            logits, losses = dist.forward_train(x, y, index=index)
        outs.append((logits, {k: v.item() for k, v in losses.items()}))
    assert torch.allclose(outs[0][0], outs[1][0])
    assert outs[0][1] == pytest.approx(outs[1][1], rel=1e-6)
    assert torch.equal(d.forward(x), d2.forward(x))  # evaluation uses the student only


# ----- bad settings -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method,section,match", [
    ("fitnet", {"hint_stage": 4}, "hint_stage"),
    ("fitnet", {"hint_stage": -1}, "hint_stage"),
    ("at", {"p": 0.0}, "at.p"),
    ("crd", {"nce_k": 0}, "nce_k"),
    ("crd", {"negatives": "random"}, "negatives"),
    ("crd", {"momentum": 1.5}, "momentum"),
    ("ofd", {"connector_kernel": 2}, "connector_kernel"),
    ("catkd", {"resolution": 0}, "resolution"),
    ("dkd", {"T": 0.0}, "dkd.T"),
    ("dkd", {"warmup": -1}, "warmup"),
])
def test_bad_settings_raise(method, section, match):
    s, t = create_model("resnet8", 10), create_model("resnet8", 10)
    with pytest.raises(LakdError, match=match):
        build_distiller(method_cfg(method, **section), s, t, num_data=100)


def test_crd_needs_index_and_data_size():
    s, t = create_model("resnet8", 10), create_model("resnet8", 10)
    with pytest.raises(LakdError, match="num_data"):
        build_distiller(method_cfg("crd"), s, t, num_data=1)
    # more negatives than the other images of the training set: refused (it used to be cut to N - 1 silently)
    with pytest.raises(LakdError, match=r"crd.nce_k=16384 must be < the training set's 50 images .*crd.nce_k=49$"):
        build_distiller(method_cfg("crd"), s, t, num_data=50)
    d = build_distiller(method_cfg("crd", nce_k=49), s, t, num_data=50)
    assert d.contrast.k == 49
    with pytest.raises(LakdError, match="index"):
        d.forward_train(torch.randn(2, 3, 32, 32), torch.tensor([0, 1]))


# ----- shipped configs ------------------------------------------------------------------------------------------------
def _configs(dataset: str) -> list[str]:
    out = []
    for method in ["kd", *METHODS]:
        out += sorted(glob.glob(os.path.join(ROOT, "configs", dataset, method, "*.yaml")))
    return out


def test_every_baseline_config_exists_and_loads():
    c100, c10 = _configs("cifar100"), _configs("cifar10")
    assert len(c100) == 8 * 6 and len(c10) == 8
    models = set(list_models())
    catkd_beta = {"resnet20": 0.7, "resnet32": 1.8, "resnet8x4": 15.0, "wrn_16_2": 12.0, "wrn_40_1": 1.5,
                  "vgg8": 4.5}
    dkd_beta = {"resnet20": 2.0, "resnet32": 2.0, "resnet8x4": 8.0, "wrn_16_2": 6.0, "wrn_40_1": 6.0,
                "vgg8": 6.0}
    for path in c100 + c10:
        cfg = load_config(path)
        method = os.path.basename(os.path.dirname(path))
        dataset = os.path.basename(os.path.dirname(os.path.dirname(path)))
        t, s = cfg["teacher"]["name"], cfg["model"]["name"]
        assert cfg["method"] == method and os.path.basename(path) == f"{t}_{s}.yaml"
        assert (t, s) in PAIRS and t in models and s in models
        assert cfg["experiment"] == f"{dataset}_{method}_{t}_{s}"
        assert cfg["data"]["dataset"] == dataset
        sol = cfg["solver"]
        # the paper's recipe, shared by every method of its tables (configs/_recipe_paper.yaml)
        assert (sol["epochs"], sol["batch_size"], sol["lr"], sol["schedule"]) == (300, 64, 0.05, "linear")
        assert sol["weight_decay"] == 0.0005 and sol["momentum"] == 0.9 and sol["nesterov"] is True
        assert cfg["data"]["root"] == default_data_root()  # $LAKD_DATA or ./data: a folder every user has
        if dataset == "cifar100":  # mdistiller's published teachers, unpacked as its README says
            assert cfg["teacher"]["checkpoint"] == f"download_ckpts/cifar_teachers/{t}_vanilla/ckpt_epoch_240.pth"
        else:  # the run folder of the shipped teacher config (lakd train configs/cifar10/teachers/resnet56.yaml)
            assert cfg["teacher"]["checkpoint"] == "runs/cifar10_teacher_resnet56/best.pt"
            assert load_config(os.path.join(ROOT, "configs/cifar10/teachers/resnet56.yaml"))["experiment"] == "cifar10_teacher_resnet56"
        if method == "catkd":
            assert cfg["catkd"]["beta"] == catkd_beta[s] and cfg["catkd"]["resolution"] == 2
            assert cfg["catkd"]["normalize"] is False
        if method == "dkd":
            assert cfg["dkd"]["beta"] == dkd_beta[s] and cfg["dkd"]["warmup"] == 20
        if method == "kd":
            assert (cfg["kd"]["T"], cfg["kd"]["ce_weight"], cfg["kd"]["kd_weight"]) == (4.0, 0.1, 0.9)
    # ImageNet RKD: torchdistill's sample configs/sample/ilsvrc2012/rkd/resnet18_from_resnet34.yaml (KDLoss at alpha 1:
    # CE 1; RKDLoss distance 1, angle 2)
    rkd = load_config(os.path.join(ROOT, "configs/imagenet/rkd/resnet34_resnet18.yaml"))
    assert rkd["method"] == "rkd" and rkd["experiment"] == "imagenet_rkd_resnet34_resnet18"
    assert (rkd["rkd"]["ce_weight"], rkd["rkd"]["distance_weight"], rkd["rkd"]["angle_weight"]) == (1.0, 1.0, 2.0)


@pytest.mark.parametrize("teacher,student", PAIRS)
def test_config_distillers_run_on_the_real_architectures(teacher, student, run_shipped_configs):
    run_shipped_configs(METHODS, [(teacher, student)], num_data=50_000)  # CIFAR-100's (CRD's 16384 negatives)


@pytest.mark.parametrize("n, block", [(300, 2**20), (300, 1000), (5000, 2**20), (5000, 3000)])
def test_crd_bank_scores_equal_the_gathered_form(n, block):
    """Scores against the bank (one product, blocked, or gathered rows) equal the former implementation's
    gather-and-bmm, values and gradients, in both regimes (N <= B(K+1): product; N > B(K+1): gather)."""
    from lakd.distillers.crd import bank_scores

    g = torch.Generator().manual_seed(0)
    b, k1, d = 8, 65, 16
    bank = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1)
    cidx = torch.randint(0, n, (b, k1), generator=g)
    v1 = torch.nn.functional.normalize(torch.randn(b, d, generator=g), dim=1).requires_grad_(True)
    v2 = v1.detach().clone().requires_grad_(True)
    old = torch.bmm(bank[cidx.reshape(-1)].view(b, k1, -1), v1.unsqueeze(2)).squeeze(2)
    new = bank_scores(v2, bank, cidx, block=block)
    torch.testing.assert_close(new, old, rtol=1e-5, atol=1e-6)
    w = torch.randn(b, k1, generator=g)
    (old * w).sum().backward()
    (new * w).sum().backward()
    torch.testing.assert_close(v2.grad, v1.grad, rtol=1e-5, atol=1e-5)


def test_crd_loss_equals_the_former_implementation():
    """The whole CRD loss (NCE of both sides, Z, bank update) with the new scoring equals the gather-and-bmm
    form of the previous release on the same negatives, and so does its gradient."""
    from lakd.distillers import crd as crd_mod

    def old_scores(v, bank, cidx, block=None):
        b, k1 = cidx.shape
        return torch.bmm(bank[cidx.reshape(-1)].view(b, k1, -1), v.unsqueeze(2)).squeeze(2)

    torch.manual_seed(0)
    s, t = create_model("resnet8", 10), create_model("resnet8x4", 10)
    cfg = method_cfg("crd", nce_k=200)
    runs = []
    for scores in (crd_mod.bank_scores, old_scores):
        torch.manual_seed(0)
        d = build_distiller(cfg, copy.deepcopy(s), copy.deepcopy(t), num_data=1000)
        orig = crd_mod.bank_scores
        crd_mod.bank_scores = scores
        try:
            x = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(1))
            y = torch.arange(6) % 10
            out = []
            for step in range(2):
                d.zero_grad()
                _, losses = d.forward_train(x, y, index=torch.arange(6) + 6 * step)
                losses["crd"].backward()
                out.append((losses["crd"].detach(), d.embed_s.linear.weight.grad.clone()))
            runs.append((out, d.contrast.memory_s.clone(), d.contrast.z.clone()))
        finally:
            crd_mod.bank_scores = orig
    (new, bank_new, z_new), (old, bank_old, z_old) = runs
    for (ln, gn), (lo, go) in zip(new, old):
        torch.testing.assert_close(ln, lo, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(gn, go, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(bank_new, bank_old, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(z_new, z_old, rtol=1e-5, atol=0)
