"""The similarity and feature-statistics methods (PKT, SP, NST, CC, ICKD, KDSVD, SRRL, SRD): each loss against a direct,
naive computation of its paper's equation on tiny tensors, gradients reaching exactly the parts they should, the
extra state's round trip, bad settings, every shipped config (it loads, and its distiller runs on the real
architectures), a two-step ``lakd train`` per method, and the methods on adapted torchvision networks."""
from __future__ import annotations

import copy
import glob
import itertools
import math
import os

import numpy as np
import pytest
import torch
import torch.nn as nn
import torchvision
from test_baselines import method_cfg, run_stopped_and_resumed  # tests/ is on sys.path under pytest

import lakd
from lakd.cli.main import main
from lakd.config import load_config
from lakd.distillers import DISTILLERS, build_distiller
from lakd.distillers.cc import cc_loss, rbf_taylor_correlation, repdistiller_correlation_loss
from lakd.distillers.ickd import ickd_loss
from lakd.distillers.kdsvd import align_vectors, kdsvd_loss, right_singular
from lakd.distillers.nst import nst_loss
from lakd.distillers.pkt import pkt_loss
from lakd.distillers.sp import sp_loss
from lakd.distillers.srd import srd_rep_loss
from lakd.errors import LakdError
from lakd.models import create_model

pytestmark = pytest.mark.usefixtures("one_thread")  # small tensors: one thread is faster (conftest.py)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = ["pkt", "sp", "nst", "cc", "ickd", "kdsvd", "srrl", "srd"]
PAIRS = [("resnet56", "resnet20"), ("resnet110", "resnet32"), ("resnet32x4", "resnet8x4"),
         ("wrn_40_2", "wrn_16_2"), ("wrn_40_2", "wrn_40_1"), ("vgg13", "vgg8")]
#: the extra learnable parts of each method (state-dict prefixes)
PARTS = {"cc": ("embed_s.", "embed_t."), "ickd": ("connector.",), "srrl": ("connector.",), "srd": ("projector.",)}
#: the extra state beyond PARTS' parameters (SRD's two affine-free BatchNorms hold running statistics only)
STATE = {"srd": ("projector.", "bn_s.", "bn_t.")}


# ----- each loss against a naive computation of its equation -----------------------------------------------------
def test_pkt_loss_by_hand():
    s = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    t = torch.tensor([[1.0, 1.0], [-1.0, 1.0], [2.0, 0.0]])

    def probs(x):
        n = len(x)
        cos = [[float(np.dot(x[i], x[j]) / (np.linalg.norm(x[i]) * np.linalg.norm(x[j]))) for j in range(n)]
               for i in range(n)]
        k = [[(c + 1) / 2 for c in row] for row in cos]
        return [[v / sum(row) for v in row] for row in k]

    ps, pt = probs(s.numpy()), probs(t.numpy())
    expected = sum(pt[i][j] * math.log(pt[i][j] / ps[i][j]) for i in range(3) for j in range(3)) / 9
    assert pkt_loss(s, t).item() == pytest.approx(expected, abs=1e-6)
    assert pkt_loss(t, t).item() == pytest.approx(0.0, abs=1e-7)


def test_sp_loss_by_hand():
    s = torch.tensor([[1.0, 2.0, 0.0], [0.0, 1.0, 1.0]]).view(2, 3, 1, 1)
    t = torch.tensor([[2.0, 0.0], [1.0, 1.0]]).view(2, 2, 1, 1)  # other channel count: only B x B matters
    # G_s = [[5, 2], [2, 2]] -> rows / norms (sqrt 29, sqrt 8); G_t = [[4, 2], [2, 2]] -> (sqrt 20, sqrt 8)
    g_s = np.array([[5 / math.sqrt(29), 2 / math.sqrt(29)], [2 / math.sqrt(8), 2 / math.sqrt(8)]])
    g_t = np.array([[4 / math.sqrt(20), 2 / math.sqrt(20)], [2 / math.sqrt(8), 2 / math.sqrt(8)]])
    assert sp_loss(s, t).item() == pytest.approx(((g_t - g_s) ** 2).sum() / 4, rel=1e-6)


def test_nst_mmd_by_hand():
    # one sample; student 2 channels, teacher 3 channels, each a 1 x 2 map (normalised over the 2 positions)
    s = torch.tensor([[[[3.0, 4.0]], [[1.0, 0.0]]]])
    t = torch.tensor([[[[0.0, 2.0]], [[1.0, 1.0]], [[5.0, 0.0]]]])
    unit = lambda v: np.asarray(v) / np.linalg.norm(v)  # noqa: E731
    ss = [unit(c) for c in ([3, 4], [1, 0])]
    tt = [unit(c) for c in ([0, 2], [1, 1], [5, 0])]

    def mean_k(a, b):
        return np.mean([float(np.dot(x, y)) ** 2 for x in a for y in b])

    expected = mean_k(tt, tt) + mean_k(ss, ss) - 2 * mean_k(ss, tt)
    assert nst_loss([s], [t]).item() == pytest.approx(expected, abs=1e-6)
    # the larger map is average-pooled to the smaller one's size; stages add up
    big = s.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)  # 2 x 4, pools back to s
    assert nst_loss([big, s], [t, t]).item() == pytest.approx(2 * expected, abs=2e-6)


def test_cc_taylor_kernel_and_loss_by_hand():
    gamma, order = 0.4, 2
    v_s = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]]), dim=1)
    v_t = torch.nn.functional.normalize(torch.tensor([[1.0, 2.0], [2.0, 1.0], [-1.0, 1.0]]), dim=1)

    def corr(v):
        v = v.numpy()
        return np.array([[sum(math.exp(-2 * gamma) * (2 * gamma) ** p / math.factorial(p) * float(v[i] @ v[j]) ** p
                              for p in range(order + 1)) for j in range(3)] for i in range(3)])

    np.testing.assert_allclose(rbf_taylor_correlation(v_s, gamma, order).numpy(), corr(v_s), rtol=1e-6)
    expected = ((corr(v_s) - corr(v_t)) ** 2).sum() / 9
    assert cc_loss(v_s, v_t, gamma, order).item() == pytest.approx(expected, rel=1e-6)
    # the expansion converges to the Gaussian RBF exp(-gamma |x - y|^2) of unit vectors
    exact = torch.exp(-gamma * torch.cdist(v_s, v_s) ** 2)
    assert torch.allclose(rbf_taylor_correlation(v_s, gamma, 12), exact, atol=1e-6)


def test_cc_repdistiller_form_by_hand():
    v_s = torch.tensor([[1.0, 2.0], [0.0, 1.0], [3.0, -1.0]])
    v_t = torch.tensor([[0.0, 0.0], [1.0, 1.0], [1.0, 1.0]])
    # |v_s - v_t| = [[1, 2], [1, 0], [2, 2]]: consecutive rows' products summed (2 + 0, 2 + 0), mean over 2 pairs
    assert repdistiller_correlation_loss(v_s, v_t).item() == pytest.approx((1 * 1 + 2 * 0 + 1 * 2 + 0 * 2) / 2)
    s, t = create_model("resnet8", 10), create_model("resnet14", 10)
    d = build_distiller(method_cfg("cc", form="repdistiller"), s, t)
    assert type(d.embed_s).__name__ == "LinearEmbed"
    x = torch.randn(3, 64)
    assert not torch.allclose(d.embed_s(x).norm(dim=1), torch.ones(3))  # no normalisation


def test_ickd_loss_by_hand():
    # one sample, 2 channels, 2 positions: G = F F^T, rows L2-normalised; loss = sum (G_s - G_t)^2 / (C B)
    s = torch.tensor([[[[1.0, 2.0]], [[0.0, 1.0]]]])
    t = torch.tensor([[[[1.0, 0.0]], [[1.0, 1.0]]]])
    g_s = np.array([[5.0, 2.0], [2.0, 1.0]])
    g_t = np.array([[1.0, 1.0], [1.0, 2.0]])
    g_s /= np.linalg.norm(g_s, axis=1, keepdims=True)
    g_t /= np.linalg.norm(g_t, axis=1, keepdims=True)
    assert ickd_loss(s, t).item() == pytest.approx(((g_s - g_t) ** 2).sum() / 2, rel=1e-6)
    # a batch of two copies: the same per-sample mean
    assert ickd_loss(s.repeat(2, 1, 1, 1), t.repeat(2, 1, 1, 1)).item() == pytest.approx(
        ((g_s - g_t) ** 2).sum() / 2, rel=1e-6)


def _naive_kdsvd(g_s, g_t, k):
    """KDSVD's loss from numpy's SVD and explicit loops (mdistiller's B x (C*H) x W layout)."""
    total, prev = 0.0, None
    b = g_s[0].shape[0]
    for f_s, f_t in zip(g_s, g_t):
        cur = []
        for n in range(b):
            vs, vt = [], []
            for f, m, out in ((f_s, k + 3, vs), (f_t, k, vt)):
                x = f[n].numpy().astype(np.float64)
                x = x.reshape(x.shape[0] * x.shape[1], x.shape[2])
                _, sv, vh = np.linalg.svd(x, full_matrices=False)
                out.append((vh[:m].T / np.linalg.norm(vh[:m].T, axis=0), sv[:m] / np.linalg.norm(sv[:m])))
            (v_s, _), (v_t, s_t) = vs[0], vt[0]
            aligned = np.zeros_like(v_t)
            for j in range(k):  # the student vector of largest |cosine| with teacher vector j, sign-aligned
                cos = v_s.T @ v_t[:, j]
                i = int(np.argmax(np.abs(cos)))
                aligned[:, j] = np.sign(cos[i]) * v_s[:, i]
            cur.append((aligned * s_t, v_t * s_t))
        if prev is not None:
            for n in range(b):
                (a_s, a_t), (p_s, p_t) = cur[n], prev[n]
                for j in range(k):
                    r_s = np.exp(-(a_s[:, j][:, None] - p_s[:, j][None, :]) ** 2 / 8)
                    r_t = np.exp(-(a_t[:, j][:, None] - p_t[:, j][None, :]) ** 2 / 8)
                    total += ((r_s - r_t) ** 2).sum()
        prev = cur
    return total / b


@pytest.mark.parametrize("k", [1, 2])
def test_kdsvd_core_against_a_naive_computation(k):
    torch.manual_seed(0)
    g_s = [torch.randn(2, 3, 4, 4), torch.randn(2, 5, 2, 2)]
    g_t = [torch.randn(2, 4, 4, 4), torch.randn(2, 6, 2, 2)]
    assert kdsvd_loss(g_s, g_t, k).item() == pytest.approx(_naive_kdsvd(g_s, g_t, k), rel=1e-4)
    # a student equal to its teacher finds every teacher vector among its own: loss 0
    assert kdsvd_loss(g_t, g_t, k).item() == pytest.approx(0.0, abs=1e-10)


def test_kdsvd_singular_vectors_and_alignment():
    x = torch.tensor([[[[3.0, 0.0], [0.0, 1.0]]]])  # one 1 x 2 x 2 map: singular values 3, 1
    v, s = right_singular(x, 2)
    assert s[0].tolist() == pytest.approx([3 / math.sqrt(10), 1 / math.sqrt(10)], rel=1e-6)
    np.testing.assert_allclose(v[0].abs().numpy(), np.eye(2), atol=1e-6)
    # alignment picks the student column of largest |cosine| and flips its sign to match
    v_s = torch.tensor([[[1.0, 0.0], [0.0, -1.0]]])
    v_t = torch.tensor([[[0.0], [1.0]]])
    assert align_vectors(v_s, v_t).tolist() == [[[0.0], [1.0]]]


def test_srrl_losses_with_identity_connector():
    torch.manual_seed(0)
    s, t = create_model("resnet8", 10), create_model("resnet14", 10)  # both 64-wide embeddings
    d = build_distiller(method_cfg("srrl"), s, t)
    conv = d.connector[0]
    with torch.no_grad():
        conv.weight.copy_(torch.eye(64).view(64, 64, 1, 1))
    d.eval()  # BN with fresh statistics is x / sqrt(1 + eps); the embedding is post-ReLU, so ReLU is the identity
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([1, 2])
    _, losses = d.forward_train(x, y)
    with torch.no_grad():
        h_s = s(x, features=True)[1]["embedding"] / math.sqrt(1 + 1e-5)
        z_t, f_t = t(x, features=True)
        z_s = h_s @ t.classifier.weight.t() + t.classifier.bias
        assert losses["srrl_feat"].item() == pytest.approx(((h_s - f_t["embedding"]) ** 2).mean().item(), rel=1e-5)
        assert losses["srrl_logit"].item() == pytest.approx(((z_s - z_t) ** 2).mean().item(), rel=1e-5)


def test_srd_losses_by_hand():
    """SRD (Miles & Mikolajczyk): 2 log sum |BN(P h_s) - BN(h_t)|^4 with batch statistics, KD at T 1."""
    torch.manual_seed(0)
    s, t = create_model("resnet8", 10), create_model("resnet14", 10)  # both 64-wide embeddings
    d = build_distiller(method_cfg("srd"), s, t)
    with torch.no_grad():
        d.projector.weight.copy_(2 * torch.eye(64))
        d.projector.bias.fill_(1.0)
    d.train()
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([1, 2, 3, 4])
    _, losses = d.forward_train(x, y)
    assert set(losses) == {"ce", "srd_feat", "kd"}
    with torch.no_grad():
        h_s = s(x, features=True)[1]["embedding"].double().numpy()
        z_t, f_t = t(x, features=True)
        h_t = f_t["embedding"].double().numpy()
        z_s = s(x).double().numpy()
    norm = lambda a: (a - a.mean(0)) / np.sqrt(a.var(0) + 1e-4)  # noqa: E731  (biased batch variance)
    rep = math.log((np.abs(norm(2 * h_s + 1) - norm(h_t)) ** 4).sum())
    assert losses["srd_feat"].item() == pytest.approx(2 * rep, rel=1e-4)
    p_t = np.exp(z_t.double().numpy()) / np.exp(z_t.double().numpy()).sum(1, keepdims=True)
    log_p_s = z_s - np.log(np.exp(z_s).sum(1, keepdims=True))
    kl = (p_t * (np.log(p_t) - log_p_s)).sum(1).mean()
    assert losses["kd"].item() == pytest.approx(kl, rel=1e-4)
    # the BatchNorms keep running statistics (momentum 0.1 from zero means) and have no parameters
    assert torch.allclose(d.bn_t.running_mean, 0.1 * torch.from_numpy(h_t.mean(0)).float(), atol=1e-6)
    assert not list(d.bn_s.parameters()) and not list(d.bn_t.parameters())
    # the soft maximum: scaling the distance by c shifts the log-sum by 4 log c (its gradient is scale-free)
    a, b = torch.randn(6, 5), torch.randn(6, 5)
    one = nn.Identity()
    shift = srd_rep_loss(3 * a, 3 * b, one, one) - srd_rep_loss(a, b, one, one)
    assert shift.item() == pytest.approx(4 * math.log(3), rel=1e-5)


# ----- gradients and state ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_gradients_reach_the_student_and_the_parts_only(method):
    torch.manual_seed(0)
    s, t = create_model("resnet8", 10), create_model("resnet14", 10)
    d = build_distiller(method_cfg(method), s, t)
    d.train()
    x, y = torch.randn(4, 3, 32, 32), torch.arange(4)
    _, losses = d.forward_train(x, y)
    name = next(k for k in losses if k != "ce")
    losses[name].backward()  # the method's own term, without CE
    assert all(p.grad is None for p in t.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in s.parameters()), method
    for prefix in PARTS.get(method, ()):
        grads = [p.grad for n, p in d.named_parameters() if n.startswith(prefix)]
        assert grads and all(g is not None and g.abs().sum() > 0 for g in grads), (method, prefix)
    trainable = {n for n, _ in d.named_trainable_parameters()}
    assert not any(n.startswith("teacher.") for n in trainable)
    assert {n.split(".")[0] + "." for n in trainable if not n.startswith("student.")} == set(PARTS.get(method, ()))


@pytest.mark.parametrize("method", METHODS)
def test_steps_lower_loss_and_state_round_trips(method, tmp_path):
    torch.manual_seed(0)
    x, y = torch.randn(8, 3, 32, 32), torch.arange(8) % 10
    teacher = create_model("resnet14", 10)
    student = create_model("resnet8", 10)
    d = build_distiller(method_cfg(method), student, teacher)
    d.train()
    opt = torch.optim.SGD(d.trainable_parameters(), lr=0.01, momentum=0.9)
    totals = []
    for _ in range(4):
        _, losses = d.forward_train(x, y)
        total = sum(losses.values())
        totals.append(total.item())
        opt.zero_grad()
        total.backward()
        opt.step()
    assert all(math.isfinite(v) for v in totals) and totals[-1] < totals[0], totals
    extra = d.extra_state_dict()
    assert {k.split(".")[0] + "." for k in extra} == set(STATE.get(method, PARTS.get(method, ())))
    torch.save(extra, tmp_path / "extra.pt")
    student2, teacher2 = create_model("resnet8", 10), create_model("resnet14", 10)
    student2.load_state_dict(student.state_dict())
    teacher2.load_state_dict(teacher.state_dict())
    d2 = build_distiller(method_cfg(method), student2, teacher2)
    d2.load_extra_state_dict(torch.load(tmp_path / "extra.pt", weights_only=True))
    outs = []
    for dist in (d, d2):
        dist.eval()
        with torch.no_grad():
            outs.append({k: v.item() for k, v in dist.forward_train(x, y)[1].items()})
    assert outs[0] == pytest.approx(outs[1], rel=1e-6)


@pytest.mark.parametrize("method,section,match", [
    ("pkt", {"eps": 0.0}, "pkt.eps"),
    ("cc", {"feat_dim": 0}, "cc.feat_dim"),
    ("cc", {"gamma": -1.0}, "cc.gamma"),
    ("cc", {"order": 1.5}, "cc.order"),
    ("cc", {"form": "cosine"}, "cc.form"),
    ("ickd", {"T": 0.0}, "ickd.T"),
    ("kdsvd", {"k": 0}, "kdsvd.k"),
    ("kdsvd", {"layout": "rows"}, "kdsvd.layout"),
    ("srrl", {"logit_loss": "l1"}, "srrl.logit_loss"),
    ("srd", {"exponent": 0.0}, "srd.exponent"),
    ("srd", {"T": -1.0}, "srd.T"),
    ("srd", {"kd_weight": "one"}, "srd.kd_weight"),
])
def test_bad_settings_raise(method, section, match):
    s, t = create_model("resnet8", 10), create_model("resnet8", 10)
    with pytest.raises(LakdError, match=match):
        build_distiller(method_cfg(method, **section), s, t)


def test_kdsvd_refuses_mismatched_stage_layouts():
    s, t = create_model("resnet8", 10), create_model("vgg8", 10)
    with pytest.raises(LakdError, match="same stage layout"):
        build_distiller(method_cfg("kdsvd"), s, t)


def test_kdsvd_channels_layout_runs():
    s, t = create_model("resnet8", 10), create_model("resnet14", 10)
    d = build_distiller(method_cfg("kdsvd", layout="channels"), s, t)
    _, losses = d.forward_train(torch.randn(2, 3, 32, 32), torch.tensor([0, 1]))
    assert torch.isfinite(losses["kdsvd"]) and losses["kdsvd"] > 0


def test_ickd_kd_term():
    s, t = create_model("resnet8", 10), create_model("resnet14", 10)
    d = build_distiller(method_cfg("ickd", kd_weight=0.5, T=1.0), s, t)
    _, losses = d.forward_train(torch.randn(2, 3, 32, 32), torch.tensor([0, 1]))
    assert set(losses) == {"ce", "ickd", "kd"}


@pytest.mark.parametrize("method", sorted(PARTS))
def test_resume_is_exact(method, tmp_path):
    """A run resumed after its first epoch ends with the same student and parts (connector, BN statistics) as
    the uninterrupted run."""

    torch.manual_seed(0)
    teacher = tmp_path / "t.pt"
    torch.save({"model": create_model("resnet8", 10).state_dict(), "arch": "resnet8", "num_classes": 10}, teacher)
    common = ["data.dataset=digits", "data.train_subset=96", "data.test_subset=32", "solver.batch_size=32",
              "solver.lr=0.05", "model.name=resnet8", "train.progress=false", "train.threads=1",
              "data.num_workers=0", f"method={method}", "teacher.name=resnet8", f"teacher.checkpoint={teacher}",
              "solver.epochs=2", "solver.max_steps_per_epoch=2", f"output_dir={tmp_path}"]
    full, resumed = run_stopped_and_resumed(common, tmp_path)
    a, b = full.distiller.state_dict(), resumed.distiller.state_dict()
    assert a.keys() == b.keys() and any(k.startswith(PARTS[method]) for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ----- shipped configs -----------------------------------------------------------------------------------------------
def _configs(dataset: str) -> list[str]:
    return [p for m in METHODS for p in sorted(glob.glob(os.path.join(ROOT, "configs", dataset, m, "*.yaml")))]


def test_every_config_exists_loads_and_holds_the_reference_settings():
    c100, c10, imnet = _configs("cifar100"), _configs("cifar10"), _configs("imagenet")
    assert len(c100) == 6 * len(METHODS) and len(c10) == len(METHODS)
    assert {os.path.basename(os.path.dirname(p)) for p in imnet} == {"sp", "ickd", "srd"}
    for path in c100 + c10 + imnet:
        cfg = load_config(path)
        method = os.path.basename(os.path.dirname(path))
        dataset = os.path.basename(os.path.dirname(os.path.dirname(path)))
        t, s = cfg["teacher"]["name"], cfg["model"]["name"]
        assert cfg["method"] == method and os.path.basename(path) == f"{t}_{s}.yaml"
        assert cfg["experiment"] == f"{dataset}_{method}_{t}_{s}" and cfg["data"]["dataset"] == dataset
        if dataset != "imagenet":
            assert (t, s) in PAIRS
            # the CIFAR configs carry the references' CIFAR-100 settings, which are the method's defaults (but
            # SRRL's KD term: SimKD's script adds it, -d 1; the method alone has none)
            want = dict(DISTILLERS.get(method).DEFAULTS[method], **({"kd_weight": 1.0} if method == "srrl" else {}))
            assert cfg[method] == want, path
            sol = cfg["solver"]
            assert (sol["epochs"], sol["batch_size"], sol["lr"], sol["schedule"]) == (300, 64, 0.05, "linear")
        if dataset == "cifar100":
            assert cfg["teacher"]["checkpoint"] == f"download_ckpts/cifar_teachers/{t}_vanilla/ckpt_epoch_240.pth"
    srd = load_config(os.path.join(ROOT, "configs/imagenet/srd/resnet34_resnet18.yaml"))["srd"]
    assert (srd["feat_weight"], srd["kd_weight"], srd["T"], srd["exponent"], srd["bn_eps"]) == (2.0, 1.0, 1.0, 4.0, 1e-4)
    ickd = load_config(os.path.join(ROOT, "configs/imagenet/ickd/resnet34_resnet18.yaml"))["ickd"]
    assert (ickd["ce_weight"], ickd["kd_weight"], ickd["T"], ickd["feat_weight"]) == (0.5, 0.5, 1.0, 500.0)


@pytest.mark.parametrize("teacher,student", PAIRS)
def test_config_distillers_run_on_the_real_architectures(teacher, student, run_shipped_configs):
    run_shipped_configs(METHODS, [(teacher, student)])


def test_cifar10_and_imagenet_configs_build():
    for path in _configs("cifar10"):
        cfg = load_config(path)
        build_distiller(cfg, create_model(cfg["model"]["name"], 10), create_model(cfg["teacher"]["name"], 10))
    t, s = create_model("resnet34", 1000), create_model("resnet18", 1000)
    for path in _configs("imagenet"):
        d = build_distiller(load_config(path), s, t)
        assert d.trainable_parameters()


# ----- the command line and other networks --------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_two_step_cli_run(method, digits_overrides, tmp_path, capsys):
    assert main(["train", *digits_overrides(method), "experiment=smoke"]) == 0
    assert (tmp_path / "smoke" / "last.pt").exists()


def test_methods_are_listed(capsys):
    assert main(["methods"]) == 0
    out = " ".join(capsys.readouterr().out.split())  # the listing wraps long sentences
    for method in METHODS:
        cls = DISTILLERS.get(method)
        first = cls.__doc__.strip().splitlines()[0]  # a whole sentence on one line, naming the paper
        assert first.startswith(cls.display_name + " (") and first.endswith(".") and len(first) <= 112
        assert first in out


@pytest.fixture(scope="module")
def resnets():
    torch.manual_seed(0)
    return lakd.adapt(torchvision.models.resnet18(num_classes=10), input_size=32), \
        lakd.adapt(torchvision.models.resnet34(num_classes=10), input_size=32)


@pytest.mark.parametrize("method", METHODS)
def test_torchvision_resnets(resnets, method):
    s, t = copy.deepcopy(resnets[0]), copy.deepcopy(resnets[1])
    d = lakd.distiller(s, t, method, image_size=32)
    opt = torch.optim.SGD(d.trainable_parameters(), lr=0.01)
    x, y = torch.randn(4, 3, 32, 32), torch.arange(4)
    logits, losses = d.train_step({"image": x, "target": y}, lambda loss: loss.backward())
    opt.step()
    assert logits.shape == (4, 10) and all(torch.isfinite(v) for v in losses.values())


def test_kdsvd_refuses_an_adapted_pair_of_other_stage_layouts(resnets):
    # torchvision's resnet18 has four stages (8, 4, 2, 1 at 32 x 32), the zoo's resnet8 three (32, 16, 8)
    with pytest.raises(LakdError, match="same stage layout") as e:
        lakd.distiller(copy.deepcopy(resnets[0]), create_model("resnet8", 10), "kdsvd", image_size=32)
    assert "\n" not in str(e.value)


def test_srrl_reads_the_classifier_input_of_an_adapted_teacher(resnets):
    # MobileNetV3's classifier reads a hidden 1024-wide layer: the embedding SRRL matches is that layer's output
    mobile = lakd.adapt(torchvision.models.mobilenet_v3_small(num_classes=10), input_size=32)
    d = lakd.distiller(copy.deepcopy(resnets[0]), mobile, "srrl", image_size=32)
    assert d.connector[0].out_channels == mobile.classifier.in_features == 1024
    _, losses = d.train_step({"image": torch.randn(2, 3, 32, 32), "target": torch.tensor([0, 1])},
                             lambda loss: loss.backward())
    assert all(torch.isfinite(v) for v in losses.values())


def test_kdsvd_gradient_stays_finite_on_rank_deficient_maps():
    f_s = torch.zeros(2, 4, 4, 4)
    f_s[:, :, 0, 0] = torch.tensor([1.0, 2.0, 3.0, 4.0])  # rank 1: repeated zero singular values
    f_s = f_s.clone().requires_grad_(True)
    g_t = [torch.randn(2, 4, 4, 4), torch.randn(2, 4, 2, 2)]
    loss = kdsvd_loss([f_s, torch.zeros(2, 4, 2, 2, requires_grad=True)], g_t, 1)
    loss.backward()
    assert torch.isfinite(f_s.grad).all()


def test_report_order_between_the_baselines_and_lakd():
    orders = [DISTILLERS.get(m).report_order for m in METHODS]
    assert len(set(orders)) == len(orders)
    assert min(orders) > DISTILLERS.get("catkd").report_order
    assert max(orders) < DISTILLERS.get("lakd").report_order
    assert list(itertools.accumulate(orders, max)) == orders  # the table order of this file's list
    assert isinstance(DISTILLERS.get("srrl")(create_model("resnet8", 10), create_model("resnet8", 10),
                                             method_cfg("srrl")).connector, nn.Sequential)
