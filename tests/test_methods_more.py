"""CTKD's instance-wise temperature, Tf-KD's self-training and PAD-L2: each loss against the paper's / reference's
formula on tiny tensors, where the gradients go, extra state saved and a stopped run resumed bitwise, bad
settings, the shipped configs on their real architectures, and a 2-step ``lakd train`` each."""
from __future__ import annotations

import copy
import glob
import logging
import os

import numpy as np
import pytest
import torch
from test_baselines import method_cfg, run_stopped_and_resumed  # tests/ is on sys.path under pytest

import lakd
from lakd.config import load_config
from lakd.distillers import build_distiller, method_variants
from lakd.distillers.ctkd import instance_kd_loss
from lakd.distillers.pad import pad_l2_loss
from lakd.distillers.tfkd import tfkd_self_loss
from lakd.errors import LakdError
from lakd.models import create_model

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_DIRS = ["ctkd_instance", "tfkd_self", "pad_l2"]
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


def pair(seed=0, teacher="resnet8", classes=10):
    torch.manual_seed(seed)
    return create_model("resnet8", classes), create_model(teacher, classes)


def batch(n=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g), torch.arange(n) % 10


# ----- CTKD, instance-wise temperature --------------------------------------------------------------------------
def test_ctkd_instance_loss_and_temperatures_by_hand():
    # the authors' README: per sample T^2 * sum(p_t * (log p_t - log_softmax(z_s / T))), p_t = softmax(z_t / T)
    # + 1e-7, averaged over the batch
    temps = np.array([1.5, 4.0, 11.0])
    by_hand = 0.0
    for i in range(3):
        pt = softmax(ZT[i] / temps[i]) + 1e-7
        by_hand += temps[i] ** 2 * (pt * (np.log(pt) - np.log(softmax(ZS[i] / temps[i])))).sum()
    assert instance_kd_loss(t(ZS), t(ZT), t(temps)).item() == pytest.approx(by_hand / 3, rel=1e-4)
    # equal temperatures: the global KD loss
    from lakd.distillers.kd import kd_loss

    assert instance_kd_loss(t(ZS), t(ZT), t([4.0] * 3)).item() == pytest.approx(kd_loss(t(ZS), t(ZT), 4.0).item())
    # the module: T_i = 1 + 20 sigmoid(W2 relu(W1 [softmax(z_t), softmax(z_s)] + b1) + b2), one per sample
    s, te = pair(classes=4)
    d = build_distiller(method_cfg("ctkd", temperature="instance", instance_hidden=5), s, te)
    w1, b1, w2, b2 = (p.detach().double().numpy() for p in d.temperature.mlp.parameters())
    assert w1.shape == (5, 8) and w2.shape == (1, 5)
    x = np.concatenate([softmax(ZT), softmax(ZS)], 1)
    o = np.maximum(x @ w1.T + b1, 0) @ w2.T + b2
    expected = 1 + 20 / (1 + np.exp(-o[:, 0]))
    np.testing.assert_allclose(d.temperature(0.5, t(ZT), t(ZS)).detach().numpy(), expected, rtol=1e-5)
    assert d.current_temperature() is None


def test_ctkd_instance_gradients_reversed_into_the_mlp_and_the_student_sees_fixed_temperatures():
    s, te = pair()
    d = build_distiller(method_cfg("ctkd", temperature="instance"), s, te)
    d.train()
    d.set_epoch(4, 240)  # 1-based epoch 5 of a 10-epoch curriculum: lambda 1/2
    x, y = batch()
    _, losses = d.forward_train(x, y)
    sum(losses.values()).backward()
    assert all(p.grad is None for p in te.parameters())
    assert all(p.grad is not None for p in s.parameters())
    mlp = list(d.temperature.mlp.parameters())
    got = [p.grad.clone() for p in mlp]
    # by hand: the KD term's true gradient w.r.t. the MLP, reversed and halved by the layer
    with torch.no_grad():
        zs, zt = s(x), te(x)
    inp = torch.cat([torch.softmax(zt, 1), torch.softmax(zs, 1)], 1)
    direct = 0.9 * instance_kd_loss(zs, zt, 1 + 20 * torch.sigmoid(d.temperature.mlp(inp).squeeze(1)))
    true = torch.autograd.grad(direct, mlp)
    for g, e in zip(got, true):
        torch.testing.assert_close(g, -0.5 * e, rtol=1e-4, atol=1e-7)
    assert losses["kd"].item() == pytest.approx(direct.item(), rel=1e-5)
    # the student's gradient is that of KD at the (constant) predicted temperatures: none through the MLP's input
    s2 = copy.deepcopy(s)
    s2.zero_grad(set_to_none=True)
    s2.train()
    with torch.no_grad():
        temps = d.temperature(0.5, zt, zs)
    z2 = s2(x)
    (0.1 * torch.nn.functional.cross_entropy(z2, y) + 0.9 * instance_kd_loss(z2, zt, temps)).backward()
    for a, b in zip(s.parameters(), s2.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6)


def test_ctkd_instance_mlp_is_extra_state_and_a_resumed_run_continues_bitwise(tmp_path):
    s, te = pair()
    d = build_distiller(method_cfg("ctkd", temperature="instance"), s, te)
    sd = d.extra_state_dict()
    assert list(sd) == ["temperature.mlp.0.weight", "temperature.mlp.0.bias", "temperature.mlp.2.weight",
                        "temperature.mlp.2.bias"]
    with pytest.raises(LakdError, match="lacks"):
        build_distiller(method_cfg("ctkd", temperature="instance"), s, te).load_extra_state_dict({})
    teacher = tmp_path / "t.pt"
    torch.save({"model": create_model("resnet8", 10).state_dict(), "arch": "resnet8", "num_classes": 10}, teacher)
    common = ["data.dataset=digits", "data.train_subset=64", "data.test_subset=32", "solver.batch_size=32",
              "solver.lr=0.05", "model.name=resnet8", "train.progress=false", "train.threads=1",
              "data.num_workers=0", "method=ctkd", "ctkd.temperature=instance", "ctkd.decay_epochs=2",
              "teacher.name=resnet8", f"teacher.checkpoint={teacher}", "solver.epochs=2",
              "solver.max_steps_per_epoch=2", f"output_dir={tmp_path}"]
    full, resumed = run_stopped_and_resumed(common, tmp_path)
    a, b = full.distiller.state_dict(), resumed.distiller.state_dict()
    assert a.keys() == b.keys() and "temperature.mlp.0.weight" in a
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ----- Tf-KD, self-training ----------------------------------------------------------------------------------
def test_tfkd_self_loss_by_hand_and_its_terms():
    T, C = 6.0, 4
    pt, ps = softmax(ZT / T), softmax(ZS / T)
    # loss_kd_self: nn.KLDivLoss() (mean over B x C) of log p_s and p_t, times T * T (then its multiplier)
    expected = (pt * (np.log(pt) - np.log(ps))).sum() / (3 * C) * T * T
    assert tfkd_self_loss(t(ZS), t(ZT), T).item() == pytest.approx(expected, rel=1e-5)
    s, te = pair()
    d = build_distiller(method_cfg("tfkd", mode="self"), s, te)
    assert d.teacher is te and (d.alpha, d.T, d.multiplier) == (0.95, 6.0, 50.0)
    d.train()
    x, y = batch()
    _, losses = d.forward_train(x, y)
    assert set(losses) == {"ce", "kd"}
    with torch.no_grad():
        zs, zt = s(x), te(x)
    assert losses["ce"].item() == pytest.approx(0.05 * torch.nn.functional.cross_entropy(zs, y).item(), rel=1e-5)
    assert losses["kd"].item() == pytest.approx(0.95 * 50 * tfkd_self_loss(zs, zt, 6.0).item(), rel=1e-5)
    sum(losses.values()).backward()
    assert all(p.grad is None for p in te.parameters()) and all(not p.requires_grad for p in te.parameters())
    assert all(p.grad is not None for p in s.parameters())
    # the regularisation mode keeps ignoring a teacher it is given
    assert build_distiller(method_cfg("tfkd"), s, te).teacher is None


def test_tfkd_self_needs_a_teacher_and_warns_on_another_architecture(caplog):
    s, te = pair()
    with pytest.raises(LakdError, match="tfkd.mode=self needs a teacher"):
        build_distiller(method_cfg("tfkd", mode="self"), s, None)
    with pytest.raises(LakdError, match="needs a teacher: set teacher.name"):
        load_config(None, ["method=tfkd", "tfkd.mode=self", "model.name=resnet8"])
    assert load_config(None, ["method=tfkd", "model.name=resnet8"])["teacher"]["name"] is None  # reg: none needed
    assert method_variants()["tfkd_self"] == ("tfkd", ["tfkd.mode=self"])
    with caplog.at_level(logging.WARNING, logger="lakd.distillers.tfkd"):
        build_distiller(method_cfg("tfkd", mode="self"), s, te)
        assert not caplog.records
        build_distiller(method_cfg("tfkd", mode="self"), s, create_model("resnet14", 10))
    assert "another architecture" in caplog.text
    # lakd.distiller keeps the teacher only when the settings use it
    d = lakd.distiller(s, te, "tfkd", options={"tfkd": {"mode": "self"}}, image_size=32)
    assert d.teacher is not None and d.mode == "self"
    assert lakd.distiller(s, te, "tfkd", image_size=32).teacher is None
    with pytest.raises(LakdError, match="needs a teacher"):
        lakd.distiller(s, None, "tfkd", options={"tfkd": {"mode": "self"}})


# ----- PAD-L2 -----------------------------------------------------------------------------------------------------
def test_pad_l2_loss_by_hand():
    rng = np.random.default_rng(0)
    fs, ft, lv = rng.normal(size=(3, 5)), rng.normal(size=(3, 5)), rng.normal(size=(3, 5)) * 0.5
    eps = 1e-6
    expected = np.mean(np.mean((ft - fs) ** 2 / (eps + np.exp(lv)) + lv, axis=1))
    assert pad_l2_loss(t(fs), t(ft), t(lv), eps).item() == pytest.approx(expected, rel=1e-5)
    # at log sigma^2 = 0 it is the MSE
    assert pad_l2_loss(t(fs), t(ft), torch.zeros(3, 5), 0.0).item() == pytest.approx(((ft - fs) ** 2).mean(), rel=1e-5)


def test_pad_l2_stages_and_where_the_gradients_go():
    s, te = pair(teacher="resnet8x4")  # embeddings 64 -> 256: a connector
    d = build_distiller(method_cfg("pad_l2", l2_fraction=0.5), s, te)
    assert d.connector is not None and d.l2_epochs() == 120  # solver.epochs 240 by default
    groups = d.trainable_groups()
    ids = [{id(p) for p in g.parameters()} for g in groups]
    assert not ids[0] & ids[1] and ids[0] | ids[1] == {id(p) for p in d.trainable_parameters()}
    assert ids[1] == {id(p) for p in d.var_branch.parameters()}
    x, y = batch()
    d.train()
    for epoch, name in ((119, "l2"), (120, "pad")):
        d.zero_grad(set_to_none=True)
        d.set_epoch(epoch, 240)
        _, losses = d.forward_train(x, y)
        assert set(losses) == {"ce", name}
        with torch.no_grad():
            logits, feats = s(x, features=True)
            f_t = te(x, features=True)[1]["embedding"]
            f_s = d.connector(feats["embedding"])
            if name == "l2":
                expected = 15.0 * torch.nn.functional.mse_loss(f_s, f_t)
            else:
                expected = pad_l2_loss(f_s, f_t, d.var_branch(feats["embedding"]))
        assert losses[name].item() == pytest.approx(expected.item(), rel=1e-4)
        losses[name].backward()
        assert all(p.grad is None for p in te.parameters())
        assert all(p.grad is not None for p in d.connector.parameters())
        head = {id(p) for p in s.classifier.parameters()}
        assert all(p.grad is not None for p in s.parameters() if id(p) not in head)
        assert all(p.grad is None for p in s.classifier.parameters())  # the feature terms stop at the embedding
        assert all((p.grad is not None) == (name == "pad") for p in d.var_branch.parameters())
    # the reachability check knows the branch idles in the first stage, and finds it reached without one
    assert d.unreached_parameters() == []
    assert build_distiller(method_cfg("pad_l2", l2_fraction=0), *pair()).unreached_ok == ()
    assert build_distiller(method_cfg("pad_l2"), *pair()).connector is None  # equal widths: none


def test_pad_l2_resumed_across_its_stage_switch_continues_bitwise(tmp_path):
    teacher = tmp_path / "t.pt"
    torch.save({"model": create_model("resnet8", 10).state_dict(), "arch": "resnet8", "num_classes": 10}, teacher)
    common = ["data.dataset=digits", "data.train_subset=64", "data.test_subset=32", "solver.batch_size=32",
              "solver.lr=0.05", "model.name=resnet8", "train.progress=false", "train.threads=1",
              "data.num_workers=0", "method=pad_l2", "pad_l2.l2_fraction=0.5", "teacher.name=resnet8",
              f"teacher.checkpoint={teacher}", "solver.epochs=2", "solver.max_steps_per_epoch=2",
              f"output_dir={tmp_path}"]
    full, resumed = run_stopped_and_resumed(common, tmp_path)  # stopped after the L2 epoch, resumed into PAD
    a, b = full.distiller.state_dict(), resumed.distiller.state_dict()
    assert a.keys() == b.keys() and "var_branch.1.running_var" in a
    fresh = build_distiller(load_config(None, common), create_model("resnet8", 10), create_model("resnet8", 10))
    assert not torch.equal(a["var_branch.0.weight"], fresh.state_dict()["var_branch.0.weight"])  # it trained
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ----- settings, configs, the command -----------------------------------------------------------------------------
@pytest.mark.parametrize("method, section, match", [
    ("ctkd", {"temperature": "local"}, "ctkd.temperature"),
    ("ctkd", {"temperature": "instance", "instance_hidden": 0}, "ctkd.instance_hidden"),
    ("tfkd", {"mode": "teacher"}, "tfkd.mode"), ("tfkd", {"mode": "self", "self_alpha": 2}, "tfkd.self_alpha"),
    ("tfkd", {"mode": "self", "self_T": 0}, "tfkd.self_T"), ("pad_l2", {"l2_fraction": 1.5}, "pad_l2.l2_fraction"),
    ("pad_l2", {"eps": 0}, "pad_l2.eps"), ("pad_l2", {"l2_weight": -1}, "pad_l2.l2_weight")])
def test_bad_settings_name_the_key(method, section, match):
    s, te = pair()
    with pytest.raises(LakdError, match=match):
        build_distiller(method_cfg(method, **section), s, te)


def test_the_configs_load_and_run_on_the_real_architectures(run_shipped_configs):
    paths = [p for d in CONFIG_DIRS for p in glob.glob(os.path.join(ROOT, "configs", "*", d, "*.yaml"))]
    imnet = {os.path.basename(os.path.dirname(p)) for p in paths if "/configs/imagenet/" in p}
    assert imnet == {"pad_l2"} and len(paths) == 7 * len(CONFIG_DIRS) + 1
    # torchdistill's official rrpr2020 ce_l2 + pad_l2 pair: CE 1 + 15 x MSE for 90 epochs, then CE 1 + PAD-L2 1
    # (eps 1e-6) for 30: the last quarter of the run
    pad = load_config(os.path.join(ROOT, "configs/imagenet/pad_l2/resnet34_resnet18.yaml"))["pad_l2"]
    assert pad == {"ce_weight": 1.0, "l2_weight": 15.0, "pad_weight": 1.0, "l2_fraction": 0.75, "eps": 1e-6}
    for p in paths:
        cfg = load_config(p)
        d = os.path.basename(os.path.dirname(p))
        name, over = method_variants()[d]
        assert cfg["method"] == name and cfg["experiment"].split("_", 1)[1].startswith(d + "_"), p
        if d == "tfkd_self":  # the student's own architecture, from its scratch run
            assert cfg["teacher"]["name"] == cfg["model"]["name"]
            assert cfg["teacher"]["checkpoint"] == f"runs/{cfg['data']['dataset']}_scratch_{cfg['model']['name']}" \
                                                   f"_paper/best.pt"
    run_shipped_configs(CONFIG_DIRS, PAIRS)


def test_two_step_train_runs_through_the_command(digits_overrides, capsys):
    from lakd.cli.main import main

    for variant in CONFIG_DIRS:
        name, over = method_variants()[variant]
        extra = [*over, f"experiment=smoke_{variant}", "teacher.name=resnet8"]
        assert main(["train", *digits_overrides(name, extra)]) == 0, variant
    capsys.readouterr()
