"""Issue 24's feature methods with learnable parts or a pre-training stage: ReviewKD, VID, FT, AB, FSP.

Losses against direct formulas on tiny tensors, gradients, extra state, every config on the real architectures,
the `prepare` stage (fresh runs only; a resumed run continues bitwise), the CLI and adapted torchvision models.
"""
from __future__ import annotations

import glob
import math
import os
from pathlib import Path

import pytest
import torch

import lakd
from lakd.cli.main import main
from lakd.config import load_config
from lakd.distillers import DISTILLERS, build_distiller
from lakd.errors import LakdError
from lakd.models import create_model

ROOT = Path(__file__).resolve().parents[1]
METHODS = ["fsp", "ft", "ab", "vid", "reviewkd"]
STAGED = ["fsp", "ft", "ab"]
TINY = ["data.dataset=digits", "data.train_subset=64", "data.test_subset=32", "solver.batch_size=32",
        "solver.lr=0.05", "solver.schedule=linear", "model.name=resnet8", "train.progress=false",
        "train.threads=1", "data.num_workers=0"]


def _pair(seed=0, classes=10):
    torch.manual_seed(seed)
    return create_model("resnet8", classes), create_model("resnet14", classes)


def _options(method, **extra):
    base = {"ab": {"feat_weight": 1.0}, "fsp": {"feat_weight": 1.0}}.get(method, {})
    sec = {**base, **({"pretrain_epochs": 1} if method in STAGED else {}), **extra}
    return {method: sec} if sec else None


# ----- the losses against the papers' equations, by direct formulas -------------------------------------------
def test_vid_nll_is_the_gaussian_negative_log_likelihood():
    from lakd.distillers.vid import vid_nll

    mu = torch.tensor([0.5, -1.0]).view(1, 2, 1, 1)
    t = torch.tensor([1.5, 1.0]).view(1, 2, 1, 1)
    alpha = torch.tensor([0.0, 2.0])
    eps = 1e-5
    want = 0.0
    for c in range(2):
        var = math.log(1 + math.exp(float(alpha[c]))) + eps
        want += 0.5 * ((float(t[0, c]) - float(mu[0, c])) ** 2 / var + math.log(var))
    assert float(vid_nll(mu, t, alpha, eps)) == pytest.approx(want / 2, rel=1e-6)


def test_vid_initial_variance_is_the_setting():
    s, t = _pair()
    d = lakd.distiller(s, t, "vid", image_size=32, options={"vid": {"init_pred_var": 3.0}})
    var = torch.nn.functional.softplus(d.log_scales[0]) + d.eps
    torch.testing.assert_close(var, torch.full_like(var, 3.0))


def test_reviewkd_hcl_by_hand():
    from lakd.distillers.reviewkd import hcl_loss

    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(1, 1, 4, 4, generator=g), torch.randn(1, 1, 4, 4, generator=g)

    def mse(a, b):
        return float(((a - b) ** 2).mean())

    def pool(x, k):  # k x k average pooling of a 4 x 4 map, by loops
        n = 4 // k
        return torch.tensor([[float(x[0, 0, i * n:(i + 1) * n, j * n:(j + 1) * n].mean()) for j in range(k)]
                             for i in range(k)])

    # level sizes 4 (skipped: not smaller than the map), 2 (weight 1/2), 1 (weight 1/4)
    want = (mse(s, t) + 0.5 * mse(pool(s, 2), pool(t, 2)) + 0.25 * mse(pool(s, 1), pool(t, 1))) / 1.75
    one = torch.randn(1, 3, 1, 1, generator=g), torch.randn(1, 3, 1, 1, generator=g)
    assert float(hcl_loss([s, one[0]], [t, one[1]])) == pytest.approx(want + mse(*one), rel=1e-5)


def test_reviewkd_fuses_from_the_deepest_level_and_warms_up():
    s, t = _pair()
    d = lakd.distiller(s, t, "reviewkd", image_size=32, options={"reviewkd": {"warmup": 4}})
    assert [abf.att is None for abf in d.abfs] == [False, False, False, True]  # the pooled level fuses nothing
    d.set_epoch(0, 10)
    assert d.warmup_factor() == 0.25
    d.set_epoch(5, 10)
    assert d.warmup_factor() == 1.0
    x = torch.randn(2, 3, 32, 32)
    _, f = t(x, features=True, preact=True)
    want = [*[p.shape for p in f["stages_preact"]], (2, f["embedding"].shape[1], 1, 1)]
    _, fs = s(x, features=True)
    outs = d.fuse([*fs["stages"], fs["embedding"][:, :, None, None]], [w[-2:] for w in want])
    assert [o.shape for o in outs] == want


@pytest.mark.parametrize("form", ["paper", "repdistiller"])
def test_ft_distance_by_hand(form):
    from lakd.distillers.ft import ft_distance

    fs = torch.tensor([[[[1.0, 2.0]], [[0.0, 2.0]]]])  # 1 x 2 x 1 x 2
    ft = torch.tensor([[[[3.0, 0.0]], [[1.0, 1.0]]]])
    if form == "paper":  # || F_S/||F_S|| - F_T/||F_T|| ||_1 over C x H x W
        a, b = [1.0, 2.0, 0.0, 2.0], [3.0, 0.0, 1.0, 1.0]
        na, nb = math.sqrt(sum(v * v for v in a)), math.sqrt(sum(v * v for v in b))
        want = sum(abs(x / na - y / nb) for x, y in zip(a, b))
    else:  # channel mean of squares per position, normalised, mean absolute difference
        a, b = [(1 + 0) / 2, (4 + 4) / 2], [(9 + 1) / 2, (0 + 1) / 2]
        na, nb = math.sqrt(sum(v * v for v in a)), math.sqrt(sum(v * v for v in b))
        want = sum(abs(x / na - y / nb) for x, y in zip(a, b)) / 2
    assert float(ft_distance(fs, ft, form)) == pytest.approx(want, rel=1e-6)


def test_ab_hinge_by_hand():
    from lakd.distillers.ab import ab_hinge

    s = torch.tensor([-2.0, -0.5, 0.5, 2.0, -0.5, 0.5])
    t = torch.tensor([-1.0, -1.0, -1.0, -1.0, 1.0, 1.0])
    mu = 1.0
    want = 0.0
    for a, b in zip(s.tolist(), t.tolist()):
        if b <= 0 and a > -mu:
            want += (a + mu) ** 2  # teacher off: push the student below -mu
        if b > 0 and a <= mu:
            want += (a - mu) ** 2  # teacher on: push the student above mu
    assert want == pytest.approx(0.25 + 2.25 + 9 + 2.25 + 0.25)
    assert float(ab_hinge(s, t, mu)) == pytest.approx(want)


def test_ab_weights_the_deepest_stage_most():
    s, t = _pair()
    d = lakd.distiller(s, t, "ab", image_size=32)
    pre = [torch.zeros(1, 1, 1, 1) for _ in range(3)]
    on = [torch.ones(1, 1, 1, 1) for _ in range(3)]
    d.connectors = torch.nn.ModuleList(torch.nn.Identity() for _ in range(3))
    # each stage: (0 - 1)^2 = 1, weighted 1/4, 1/2, 1, times 3/1000
    assert float(d.ab_loss(pre, on)) == pytest.approx((0.25 + 0.5 + 1.0) * 3 / 1000)


def test_fsp_matrix_by_hand():
    from lakd.distillers.fsp import fsp_matrix

    a = torch.tensor([[[[1.0, 2.0]], [[3.0, -1.0]]]])  # 1 x 2 x 1 x 2
    b = torch.tensor([[[[2.0, 4.0]]]])  # 1 x 1 x 1 x 2
    g = fsp_matrix(a, b)
    assert g.shape == (1, 2, 1)
    assert g[0, :, 0].tolist() == pytest.approx([(1 * 2 + 2 * 4) / 2, (3 * 2 - 1 * 4) / 2])
    big = torch.arange(16.0).view(1, 1, 4, 4)  # a larger map is average-pooled to the smaller one's size
    small = torch.ones(1, 1, 2, 2)
    assert float(fsp_matrix(big, small)) == pytest.approx(float(big.mean()))


def test_fsp_matrix_stays_float32_under_autocast():
    from lakd.distillers.fsp import fsp_matrix

    a, b = torch.randn(2, 3, 4, 4), torch.randn(2, 5, 2, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        g = fsp_matrix(a.bfloat16(), b.bfloat16())
    assert g.dtype == torch.float32


def test_fsp_refuses_unequal_widths():
    with pytest.raises(LakdError, match="same channels"):
        lakd.distiller(create_model("wrn_16_1", 10), create_model("wrn_16_2", 10), "fsp", image_size=32)


# ----- gradients, extra state ----------------------------------------------------------------------------
#: the method's own parts that the distillation loss trains (True) or must leave alone (False)
PARTS = {"vid": {"regressors": True, "log_scales": True}, "reviewkd": {"abfs": True},
         "ft": {"translator": True, "paraphraser": False}, "ab": {"connectors": True}, "fsp": {}}


@pytest.mark.parametrize("method", METHODS)
def test_gradients_reach_the_student_and_parts_not_the_teacher(method):
    s, t = _pair()
    if method == "ab":  # a teacher of other widths, so that AB has connectors (none between equal shapes)
        t = create_model("wrn_16_2", 10)
    d = lakd.distiller(s, t, method, image_size=32, options=_options(method))
    d.train()
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([1, 2])
    _, losses = d.forward_train(x, y)
    feat = sum(v for k, v in losses.items() if k != "ce")
    feat.backward()
    assert all(p.grad is None for p in t.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in s.parameters())
    for part, trained in PARTS[method].items():
        grads = [p.grad for p in getattr(d, part).parameters()]
        assert all((g is not None) == trained for g in grads), part
    names = {n for n, _ in d.named_trainable_parameters()}
    for part, trained in PARTS[method].items():
        assert any(n.startswith(part + ".") for n in names) == trained, part


@pytest.mark.parametrize("method", METHODS)
def test_extra_state_is_saved_and_restored(method):
    s, t = _pair(0)
    a = lakd.distiller(s, t, method, image_size=32, options=_options(method))
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([1, 2, 3, 4])
    if method in STAGED:
        a.prepare([{"image": x, "target": y}])
    s2, _ = _pair(1)
    b = lakd.distiller(s2, t, method, image_size=32, options=_options(method))
    b.student.load_state_dict(a.student.state_dict())
    b.load_extra_state_dict(a.extra_state_dict())
    a.eval(), b.eval()
    with torch.no_grad():
        la, lb = a.forward_train(x, y)[1], b.forward_train(x, y)[1]
    assert la.keys() == lb.keys()
    for k in la:
        assert torch.equal(la[k], lb[k]), k


@pytest.mark.parametrize("method", STAGED)
def test_prepare_trains_only_what_the_stage_trains(method):
    s, t = _pair()
    if method == "ab":  # other widths: connectors to train
        t = create_model("wrn_16_2", 10)
    d = lakd.distiller(s, t, method, image_size=32, options={method: {"pretrain_epochs": 2}})
    before = {k: v.clone() for k, v in d.state_dict().items()}
    head = d.student.classifier.weight.detach().clone()
    g = torch.Generator().manual_seed(0)
    loader = [(torch.randn(4, 3, 32, 32, generator=g), torch.tensor([0, 1, 2, 3])) for _ in range(2)]
    d.prepare(loader)
    after = d.state_dict()
    changed = {k.split(".")[0] for k in after if not torch.equal(before[k], after[k])}
    assert "teacher" not in changed
    assert changed == {"ft": {"paraphraser"}, "ab": {"student", "connectors"}, "fsp": {"student"}}[method]
    assert all(not p.requires_grad for p in d.teacher.parameters())
    if method == "ft":
        assert not any(p.requires_grad for p in d.paraphraser.parameters())  # fixed again after the stage
    else:  # the student's classifier is not part of a feature stage (RepDistiller's get_feat_modules)
        assert torch.equal(d.student.classifier.weight, head)


# ----- configs -------------------------------------------------------------------------------------------
def _configs(method):
    return sorted(glob.glob(str(ROOT / "configs" / "*" / method / "*.yaml")))


def test_every_method_has_its_configs():
    pairs = {"resnet56_resnet20", "resnet110_resnet32", "resnet32x4_resnet8x4", "wrn_40_2_wrn_16_2",
             "wrn_40_2_wrn_40_1", "vgg13_vgg8"}
    for m in METHODS:
        have = {Path(p).stem for p in glob.glob(str(ROOT / "configs" / "cifar100" / m / "*.yaml"))}
        # FSP needs equal widths: wrn_40_2 -> wrn_40_1 has none (RepDistiller refuses it too)
        assert have == (pairs - {"wrn_40_2_wrn_40_1"} if m == "fsp" else pairs), m
        assert os.path.exists(ROOT / "configs" / "cifar10" / m / "resnet56_resnet20.yaml")
        for p in _configs(m):
            cfg = load_config(p)
            dataset = Path(p).parts[-3]
            assert cfg["method"] == m
            assert cfg["experiment"] == f"{dataset}_{m}_{cfg['teacher']['name']}_{cfg['model']['name']}"
    # ImageNet: torchdistill's sample configs (configs/sample/ilsvrc2012/<fsp, ft>/resnet18_from_resnet34.yaml) for FSP
    # and FT, mdistiller's for ReviewKD
    imnet = {Path(p).parts[-2] for m in METHODS for p in glob.glob(str(ROOT / "configs" / "imagenet" / m / "*.yaml"))}
    assert imnet == {"fsp", "ft", "reviewkd"}
    fsp = load_config(str(ROOT / "configs" / "imagenet" / "fsp" / "resnet34_resnet18.yaml"))["fsp"]
    # 5 epochs of the FSP loss alone at lr 1e-4, then cross-entropy only
    assert fsp == {"ce_weight": 1.0, "feat_weight": 0.0, "pretrain_epochs": 5, "pretrain_lr": 1e-4}
    ft = load_config(str(ROOT / "configs" / "imagenet" / "ft" / "resnet34_resnet18.yaml"))["ft"]
    # torchdistill's official rrpr2020 config: k 0.5, 1 paraphraser epoch at lr 0.01; FTLoss p 1 (the paper's
    # distance) weight 1000, which averages over the 256 x 7 x 7 factor elements that ours sums: 1000 / 12544
    assert ft == {"ce_weight": 1.0, "feat_weight": 0.07972, "rate": 0.5, "factor": "paper", "pretrain_epochs": 1,
                  "pretrain_lr": 0.01}
    assert ft["feat_weight"] == pytest.approx(1000 / (256 * 7 * 7), rel=1e-4)


def _built(path):
    cfg = load_config(path)
    if cfg["data"]["dataset"] == "imagenet":  # the ImageNet nets, run on a small image (classes do not matter)
        n, size = 10, 64
    else:
        n, size = {"cifar100": 100, "cifar10": 10}[cfg["data"]["dataset"]], 32
    torch.manual_seed(0)
    t, s = create_model(cfg["teacher"]["name"], n), create_model(cfg["model"]["name"], n)
    return build_distiller(cfg, s, t, num_data=64), size


@pytest.mark.parametrize("method", METHODS)
def test_configs_build_on_the_real_architectures(method):
    for path in _configs(method):
        d, _ = _built(path)
        assert d.name == method


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_configs_run_on_the_real_architectures(method):
    y = torch.tensor([3, 7])
    for path in _configs(method):
        d, size = _built(path)
        d.train()
        logits, losses = d.forward_train(torch.randn(2, 3, size, size), y)
        total = sum(losses.values())
        assert torch.isfinite(total), (path, losses)
        total.backward()


def test_methods_are_listed_with_a_sentence():
    for m in METHODS:
        cls = DISTILLERS.get(m)
        first = (cls.__doc__ or "").strip().splitlines()[0]  # what `lakd methods` prints: one whole sentence
        assert first.endswith(".") and first.startswith(cls.display_name + " (") and "et al." in first, m
        assert 8 < cls.report_order < 10_000, m  # after the existing baselines, before LAKD


# ----- the stage in the trainer: fresh runs only, resumed runs continue bitwise -----------------------------
def _teacher_ckpt(tmp_path):
    path = tmp_path / "t.pt"
    torch.save({"model": create_model("resnet14", 10).state_dict(), "arch": "resnet14", "num_classes": 10}, path)
    return path


@pytest.mark.parametrize("method", ["ab", pytest.param("ft", marks=pytest.mark.slow)])
def test_resumed_run_skips_the_stage_and_continues_bitwise(method, tmp_path, monkeypatch):
    from lakd.engine.checkpoint import atomic_save
    from lakd.engine.trainer import Trainer

    cls = DISTILLERS.get(method)
    calls = []
    original = cls.prepare
    monkeypatch.setattr(cls, "prepare", lambda self, *a, **k: (calls.append(1), original(self, *a, **k)))
    common = [*TINY, f"method={method}", "teacher.name=resnet14", f"teacher.checkpoint={_teacher_ckpt(tmp_path)}",
              "solver.epochs=2", f"{method}.pretrain_epochs=1", f"output_dir={tmp_path}"]
    full = Trainer(load_config(None, common + ["experiment=full"]), quiet=True)
    full.fit()
    assert len(calls) == 1
    tr = Trainer(load_config(None, common + ["experiment=part"]), quiet=True)
    tr.distiller.prepare(tr.data.train, tr.device)  # what fit() does before epoch 1 of a fresh run
    tr.train_epoch(0)
    atomic_save(tr._checkpoint(1), str(tmp_path / "part" / "last.pt"))
    tr.close()
    calls.clear()
    resumed = Trainer(load_config(None, common + ["experiment=part", f"resume={tmp_path}/part"]), quiet=True)
    assert resumed.start_epoch == 1
    resumed.fit()
    assert calls == []  # the stage's result came with the checkpoint
    a, b = full.distiller.state_dict(), resumed.distiller.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ----- the CLI and adapted torchvision models ---------------------------------------------------------------
def test_two_step_cli_runs_of_every_method(tmp_path, capsys):
    teacher = _teacher_ckpt(tmp_path)
    for m in METHODS:
        extra = [f"{m}.pretrain_epochs=1"] if m in STAGED else []
        extra += ["reviewkd.warmup=1"] if m == "reviewkd" else []  # a warm-up within the one epoch
        code = main(["train", *TINY, f"method={m}", "teacher.name=resnet14", f"teacher.checkpoint={teacher}",
                     "solver.epochs=1", "solver.max_steps_per_epoch=2", *extra, f"output_dir={tmp_path}",
                     f"experiment=smoke_{m}"])
        assert code == 0, (m, capsys.readouterr().err[-2000:])
        assert (tmp_path / f"smoke_{m}" / "summary.json").exists()


@pytest.mark.parametrize("method", METHODS)
def test_on_adapted_torchvision_models(method):
    torchvision = pytest.importorskip("torchvision")
    s, t = torchvision.models.resnet18(num_classes=10), torchvision.models.resnet18(num_classes=10)
    try:
        d = lakd.distiller(s, t, method, image_size=32, options=_options(method))
    except LakdError as e:  # refusals name what is missing, in one line
        assert "\n" not in str(e) and method in str(e).lower()
        return
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([1, 2])
    if method in STAGED:
        d.prepare([{"image": x, "target": y}])
    logits, losses = d.train_step({"image": x, "target": y}, lambda loss: loss.backward())
    assert logits.shape == (2, 10) and all(torch.isfinite(v) for v in losses.values())
