"""SSKD (Xu et al., ECCV 2020): the rotations, the error ranking and the four terms against hand computations of
the paper's equations on tiny tensors, which parts each term trains (the teacher never; its SS head only in the
``prepare`` stage), the stage's learning-rate steps, the extra state, bad settings, every shipped config on the real
architectures, the stage in the trainer (fresh runs only; a resumed run continues bitwise), a two-step
``lakd train`` and adapted torchvision / timm networks."""
from __future__ import annotations

import glob
import logging
import math
import os
import re

import numpy as np
import pytest
import torch
import torchvision
from test_baselines import method_cfg, run_stopped_and_resumed  # tests/ is on sys.path under pytest

import lakd
from lakd.cli.main import main
from lakd.config import load_config
from lakd.distillers import DISTILLERS, build_distiller
from lakd.distillers.sskd import (
    ROTATED_COPIES,
    SSKD,
    error_levels,
    kept_rows,
    rotated_batch,
    rotation_similarity,
    sskd_terms,
)
from lakd.errors import LakdError
from lakd.models import create_model

pytestmark = pytest.mark.usefixtures("one_thread")  # small tensors: one thread is faster (conftest.py)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAIRS = [("resnet56", "resnet20"), ("resnet110", "resnet32"), ("resnet32x4", "resnet8x4"),
         ("wrn_40_2", "wrn_16_2"), ("wrn_40_2", "wrn_40_1"), ("vgg13", "vgg8")]


def _pair(seed=0):
    torch.manual_seed(seed)
    return create_model("resnet8", 10), create_model("resnet14", 10)


def _sskd(seed=0, **section):
    s, t = _pair(seed)
    return build_distiller(method_cfg("sskd", **section), s, t)


def _rot(x):
    """The views ``sskd.views: per_sample`` takes from the data, here each image's copies rotated without a crop
    of their own (then the 4B batch is ``rotated_batch``'s)."""
    return {name: torch.rot90(x, k, (2, 3)) for k, name in enumerate(ROTATED_COPIES, 1)}


# ----- the rotations, the ranking and the terms by hand -------------------------------------------------------------
def test_rotated_batch_is_each_image_then_its_three_rotations_as_np_rot90():
    x = torch.arange(2 * 3 * 3 * 3, dtype=torch.float32).view(2, 3, 3, 3)
    r = rotated_batch(x)
    assert r.shape == (8, 3, 3, 3)
    for i in range(2):
        for k in range(4):  # row 4i + k: image i turned k times counter-clockwise, as the authors' np.rot90 on H x W
            want = np.rot90(x[i].permute(1, 2, 0).numpy(), k).copy()
            np.testing.assert_array_equal(r[4 * i + k].permute(1, 2, 0).numpy(), want)
    cl = rotated_batch(x.contiguous(memory_format=torch.channels_last))  # train.channels_last's layout is kept
    assert cl.is_contiguous(memory_format=torch.channels_last) and torch.equal(cl, r)
    corner = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).view(1, 1, 2, 2)
    assert rotated_batch(corner)[1, 0].tolist() == [[2.0, 4.0], [1.0, 3.0]]
    with pytest.raises(LakdError, match=r"^sskd rotates .* square .* \(2, 3, 4, 6\)") as info:
        rotated_batch(torch.zeros(2, 3, 4, 6))
    assert "\n" not in str(info.value)


def test_per_sample_copies_come_from_the_batch_views_and_batch_mode_rotates_the_image():
    """``sskd.views: per_sample`` (default) stacks the data's copies image-major (row 4i + k: copy k of image i);
    with copies that are plain rotations it is ``sskd.views: batch`` exactly; copies with crops of their own (other
    pixels) change the losses."""
    from lakd.distillers.sskd import stacked_copies

    x, y = torch.randn(3, 3, 32, 32), torch.tensor([1, 2, 3])
    views = {name: torch.randn(3, 3, 32, 32) for name in ROTATED_COPIES}
    four = stacked_copies(x, views)
    for i in range(3):
        assert torch.equal(four[4 * i], x[i])
        for k, name in enumerate(ROTATED_COPIES, 1):
            assert torch.equal(four[4 * i + k], views[name][i])
    assert stacked_copies(x.contiguous(memory_format=torch.channels_last), views).is_contiguous(
        memory_format=torch.channels_last)
    per_sample, batch = _sskd().eval(), _sskd(views="batch").eval()
    assert SSKD.views(per_sample.cfg) == ROTATED_COPIES and SSKD.views(batch.cfg) == {}
    with torch.no_grad():
        a = per_sample.forward_train(x, y, views=_rot(x))[1]
        b = batch.forward_train(x, y)[1]
        c = per_sample.forward_train(x, y, views={k: v.roll(2, dims=3) for k, v in _rot(x).items()})[1]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert a["tf"] != c["tf"] and a["ss"] != c["ss"] and torch.equal(a["ce"], c["ce"])
    with pytest.raises(LakdError, match=r"batch lacks rot270;") as info:
        per_sample.forward_train(x, y, views={k: v for k, v in _rot(x).items() if k != "rot270"})
    assert "\n" not in str(info.value)


def test_error_levels_and_kept_rows_by_hand():
    scores = torch.tensor([[3.0, 1.0, 2.0],   # target 0: right (level 0)
                           [3.0, 1.0, 2.0],   # target 1: two above -> 2
                           [0.5, 2.0, 1.0],   # target 2: one above -> 1
                           [1.0, 1.0, 0.0],   # target 1: a tie with the top only, nothing strictly above -> 0
                           [0.0, 5.0, 4.0]])  # target 2: one above -> 1
    levels = error_levels(scores, torch.tensor([0, 1, 2, 1, 2]))
    assert levels.tolist() == [0, 2, 1, 0, 1]
    # 3 wrong rows: ratio 1 keeps all, 0.7 keeps floor(2.1) = 2 of lowest level (rows 2, 4), 0.5 keeps 1 (the
    # earlier of the two level-1 rows), 0 keeps only the right ones
    assert kept_rows(levels, 1.0).tolist() == [True] * 5
    assert kept_rows(levels, 0.7).tolist() == [True, False, True, True, True]
    assert kept_rows(levels, 0.5).tolist() == [True, False, True, True, False]
    assert kept_rows(levels, 0.0).tolist() == [True, False, False, True, False]


def _softmax(v, t):
    e = [math.exp(x / t) for x in v]
    return [x / sum(e) for x in e]


def _kl(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q))


def _kept(levels, ratio):
    """Rows kept by the authors' error ranking: all right ones, then the wrong ones by level (earlier row first)."""
    wrong = [r for r, lv in enumerate(levels) if lv > 0]
    chosen = sorted(wrong, key=lambda r: (levels[r], r))[:math.floor(ratio * len(wrong))]
    return [r for r, lv in enumerate(levels) if lv == 0 or r in chosen]


def _cos(a, b):
    return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def _hand_terms(s_logits, t_logits, s_z, t_z, y, kd_t, tf_t, ss_t, ratio_tf, ratio_ss):
    """The paper's L_ce, L_kd, L_T (transformed images) and L_ss, with plain Python lists; rows 4i + k."""
    b = len(y)
    nor = [4 * i for i in range(b)]
    rot = [(i, 4 * i + k) for i in range(b) for k in (1, 2, 3)]  # image-major, as the authors' aug_index
    ce = sum(-math.log(_softmax(s_logits[r], 1.0)[y[i]]) for i, r in enumerate(nor)) / b
    kd = sum(_kl(_softmax(t_logits[r], kd_t), _softmax(s_logits[r], kd_t)) for r in nor) / b * kd_t ** 2
    p_t = [_softmax(t_logits[r], tf_t) for _, r in rot]
    levels = [sum(p > p_t[n][y[i]] for p in p_t[n]) for n, (i, _) in enumerate(rot)]
    keep = _kept(levels, ratio_tf)
    tf = sum(_kl(p_t[n], _softmax(s_logits[rot[n][1]], tf_t)) for n in keep) / len(keep) * tf_t ** 2
    sim_s = [[_cos(s_z[r], s_z[j]) for j in nor] for _, r in rot]
    sim_t = [[_cos(t_z[r], t_z[j]) for j in nor] for _, r in rot]
    levels = [sum(v > sim_t[n][i] for v in sim_t[n]) for n, (i, _) in enumerate(rot)]
    keep = _kept(levels, ratio_ss)
    ss = sum(_kl(_softmax(sim_t[n], ss_t), _softmax(sim_s[n], ss_t)) for n in keep) / len(keep) * ss_t ** 2
    return {"ce": ce, "kd": kd, "tf": tf, "ss": ss}


@pytest.mark.parametrize("ratio_tf,ratio_ss", [(1.0, 0.75), (0.5, 0.5), (0.0, 1.0)])
def test_terms_by_hand(ratio_tf, ratio_ss):
    g = torch.Generator().manual_seed(3)
    b, k, d = 3, 4, 3
    s_logits, t_logits = torch.randn(4 * b, k, generator=g) * 2, torch.randn(4 * b, k, generator=g) * 2
    s_z, t_z = torch.randn(4 * b, d, generator=g), torch.randn(4 * b, d, generator=g)
    y = torch.tensor([0, 3, 1])
    got = sskd_terms(s_logits, t_logits, s_z, t_z, y, 4.0, 3.0, 0.5, ratio_tf, ratio_ss)
    want = _hand_terms(s_logits.tolist(), t_logits.tolist(), s_z.tolist(), t_z.tolist(), y.tolist(), 4.0, 3.0, 0.5,
                       ratio_tf, ratio_ss)
    for name in want:
        assert float(got[name]) == pytest.approx(want[name], rel=1e-5), name
    # the example has wrong rows on both sides, so the ranking matters: some kept, some dropped at ratio 0.5
    tf_levels = error_levels(t_logits.view(b, 4, k)[:, 1:].reshape(-1, k), y.repeat_interleave(3))
    ss_levels = error_levels(rotation_similarity(t_z), torch.arange(b).repeat_interleave(3))
    for levels in (tf_levels, ss_levels):
        assert 2 <= int((levels > 0).sum()) < 3 * b


def test_rotation_similarity_is_the_cosine_of_each_copy_to_each_normal_image():
    z = torch.randn(8, 5)
    sim = rotation_similarity(z)
    assert sim.shape == (6, 2)
    for n, (i, k) in enumerate([(i, k) for i in range(2) for k in (1, 2, 3)]):
        for j in range(2):
            assert float(sim[n, j]) == pytest.approx(float(torch.cosine_similarity(z[4 * i + k], z[4 * j], 0)),
                                                     abs=1e-6)


def test_weights_multiply_the_terms_and_the_logits_are_the_normal_images():
    d = _sskd(ce_weight=1.0, kd_weight=2.0, tf_weight=3.0, ss_weight=4.0).eval()
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([1, 2])
    with torch.no_grad():
        logits, losses = d.forward_train(x, y, views=_rot(x))
        t_logits, t_feats = d.teacher(rotated_batch(x), features=True)
        s_logits, s_feats = d.student(rotated_batch(x), features=True)
        want = sskd_terms(s_logits, t_logits, d.s_head(s_feats["embedding"]), d.t_head(t_feats["embedding"]), y)
        torch.testing.assert_close(logits, d.student(x))
    for w, name in enumerate(["ce", "kd", "tf", "ss"], 1):
        torch.testing.assert_close(losses[name], w * want[name])


def test_terms_are_float32_under_autocast():
    d = _sskd().eval()
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([1, 2])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        _, losses = d.forward_train(x, y, views=_rot(x))
    with torch.no_grad():
        _, full = d.forward_train(x, y, views=_rot(x))
    assert all(v.dtype == torch.float32 for v in losses.values())
    # the similarities (cosines near 1 at initialisation, divided by ss_T) would lose most digits in bfloat16
    assert float(losses["ss"]) == pytest.approx(float(full["ss"]), rel=0.2)


# ----- what each term trains --------------------------------------------------------------------------------------
def test_gradients_reach_the_student_and_its_head_never_the_teacher_or_its_head():
    d = _sskd().train()
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([1, 2, 3, 4])
    names = {n.split(".")[0] for n, _ in d.named_trainable_parameters()}
    assert names == {"student", "s_head"}  # the teacher's head is fixed outside the stage
    for term, head in [("ce", False), ("kd", False), ("tf", False), ("ss", True)]:
        d.zero_grad(set_to_none=True)
        _, losses = d.forward_train(x, y, views=_rot(x))
        losses[term].backward()
        assert all(p.grad is None for p in [*d.teacher.parameters(), *d.t_head.parameters()]), term
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in d.student.parameters()), term
        assert all((p.grad is not None) == head for p in d.s_head.parameters()), term
    assert d.unreached_parameters() == []


def test_prepare_trains_only_the_teacher_head_with_the_teacher_frozen():
    d = _sskd(pretrain_epochs=2)
    before = {k: v.clone() for k, v in d.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(4, 3, 32, 32, generator=g) for _ in range(2)]
    d.prepare([{"image": x, "target": torch.tensor([0, 1, 2, 3]), "views": _rot(x)} for x in xs])
    after = d.state_dict()
    assert {k.split(".")[0] for k in after if not torch.equal(before[k], after[k])} == {"t_head"}  # BN stats too
    assert not any(p.requires_grad for p in [*d.teacher.parameters(), *d.t_head.parameters()])
    assert all(p.requires_grad for p in d.s_head.parameters())


def test_the_stage_loss_is_the_cross_entropy_of_the_teacher_similarities_and_its_lr_steps(monkeypatch):
    d = _sskd(pretrain_epochs=1)
    x = torch.randn(3, 3, 32, 32)
    seen = {}

    def run_stage(train_loader, device, params, loss_fn, epochs, lr, what, milestones, gamma):
        seen.update(loss=loss_fn(x, None, views=_rot(x)), params=params, args=(epochs, lr, milestones, gamma))

    monkeypatch.setattr(d, "run_stage", run_stage)
    d.prepare([])
    with torch.no_grad():
        z = d.t_head(d.teacher(rotated_batch(x), features=True)[1]["embedding"])
    sim = rotation_similarity(z)  # no temperature in the authors' stage
    want = sum(-math.log(_softmax(sim[n].tolist(), 1.0)[n // 3]) for n in range(9)) / 9
    assert float(seen["loss"].detach()) == pytest.approx(want, rel=1e-5)
    assert seen["params"] == list(d.t_head.parameters())
    assert seen["args"] == (1, 0.05, (30, 45), 0.1)
    monkeypatch.undo()
    # the shared stage runner: lr x gamma from each milestone epoch on (SGD without momentum or decay: the step of a
    # parameter whose gradient is 1 is the learning rate itself)
    d.cfg = {**d.cfg, "solver": {"momentum": 0.0, "weight_decay": 0.0}}
    p = torch.nn.Parameter(torch.zeros(()))
    d.run_stage([(x, torch.zeros(3))], "cpu", [p], lambda image, target: p * 1.0, 3, 0.5, "test", (1, 2), 0.1)
    assert float(p.detach()) == pytest.approx(-0.5 * (1 + 0.1 + 0.01))


def test_extra_state_round_trips():
    a = _sskd(0, pretrain_epochs=1)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([1, 2, 3, 4])
    a.prepare([{"image": x, "target": y, "views": _rot(x)}])
    b = build_distiller(method_cfg("sskd"), _pair(1)[0], a.teacher)  # another student and heads, the same teacher
    assert set(a.extra_state_dict()) == {k for k in a.state_dict() if k.startswith(("s_head.", "t_head."))}
    b.student.load_state_dict(a.student.state_dict())
    b.load_extra_state_dict(a.extra_state_dict())
    a.eval(), b.eval()
    with torch.no_grad():
        la, lb = a.forward_train(x, y, views=_rot(x))[1], b.forward_train(x, y, views=_rot(x))[1]
    assert all(torch.equal(la[k], lb[k]) for k in la)


@pytest.mark.parametrize("key,value,match", [
    ("ratio_ss", 1.5, r"sskd.ratio_ss .* must be a finite number >= 0 and <= 1, got 1.5"),
    ("ss_T", 0.0, r"sskd.ss_T \(.*\) must be a finite number > 0, got 0.0"),
    ("tf_weight", -1.0, "sskd.tf_weight must be a finite number >= 0, got -1.0"),
    ("pretrain_epochs", -1, r"sskd.pretrain_epochs \(.*\) must be a whole number >= 0, got -1"),
    ("pretrain_milestones", [30, -1], r"sskd.pretrain_milestones \(.*\) must be a list of whole numbers >= 0, "
                                      r"increasing, got \[30, -1\]"),
    ("pretrain_milestones", [45, 30], r"sskd.pretrain_milestones .* increasing, got \[45, 30\]; e.g. "
                                      r"sskd.pretrain_milestones=\[30,45\]"),
    ("kd_T", float("nan"), r"sskd.kd_T \(the KD temperature\) must be a finite number > 0, got nan"),
    ("views", "rotated", r"sskd.views .* must be one of per_sample, batch, got 'rotated'"),
])
def test_bad_settings_raise_one_line(key, value, match):
    with pytest.raises(LakdError, match=match) as info:
        _sskd(**{key: value})
    assert "\n" not in str(info.value)


# ----- configs --------------------------------------------------------------------------------------------------------
def test_every_config_exists_loads_and_holds_the_authors_settings():
    c100 = sorted(glob.glob(os.path.join(ROOT, "configs", "cifar100", "sskd", "*.yaml")))
    c10 = sorted(glob.glob(os.path.join(ROOT, "configs", "cifar10", "sskd", "*.yaml")))
    assert {os.path.basename(p) for p in c100} == {f"{t}_{s}.yaml" for t, s in PAIRS}
    assert [os.path.basename(p) for p in c10] == ["resnet56_resnet20.yaml"]
    for path in c100 + c10:
        cfg = load_config(path)
        dataset = os.path.basename(os.path.dirname(os.path.dirname(path)))
        t, s = cfg["teacher"]["name"], cfg["model"]["name"]
        assert cfg["method"] == "sskd" and cfg["experiment"] == f"{dataset}_sskd_{t}_{s}"
        assert cfg["sskd"] == SSKD.DEFAULTS["sskd"], path
        sol = cfg["solver"]
        assert (sol["epochs"], sol["batch_size"], sol["lr"], sol["schedule"]) == (300, 64, 0.05, "linear")
        torch.manual_seed(0)
        n = {"cifar100": 100, "cifar10": 10}[dataset]
        d = build_distiller(cfg, create_model(s, n), create_model(t, n))
        assert d.s_head[0].in_features == d.student.feature_info()["embedding_dim"]
    # ImageNet: torchdistill's sample configs/sample/ilsvrc2012/sskd/resnet18_from_resnet34.yaml (loss_weights
    # [1.0, 0.9, 10.0, 2.7] for CE, KD, SS, TF; its SS module trained 30 epochs at lr 0.1, x0.1 at 10 and 20)
    assert [os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "configs", "imagenet", "sskd", "*.yaml"))] \
        == ["resnet34_resnet18.yaml"]
    im = load_config(os.path.join(ROOT, "configs", "imagenet", "sskd", "resnet34_resnet18.yaml"))
    assert im["experiment"] == "imagenet_sskd_resnet34_resnet18" and im["data"]["dataset"] == "imagenet"
    assert im["sskd"] == {"ce_weight": 1.0, "kd_weight": 0.9, "tf_weight": 2.7, "ss_weight": 10.0,
                          "kd_T": 4.0, "tf_T": 4.0, "ss_T": 0.5, "ratio_tf": 1.0, "ratio_ss": 0.75,
                          "pretrain_epochs": 30, "pretrain_lr": 0.1, "pretrain_milestones": [10, 20],
                          "pretrain_gamma": 0.1, "views": "per_sample"}
    assert SSKD.DEFAULTS["sskd"] == {"ce_weight": 0.1, "kd_weight": 0.9, "tf_weight": 2.7, "ss_weight": 10.0,
                                     "kd_T": 4.0, "tf_T": 4.0, "ss_T": 0.5, "ratio_tf": 1.0, "ratio_ss": 0.75,
                                     "pretrain_epochs": 60, "pretrain_lr": 0.05, "pretrain_milestones": [30, 45],
                                     "pretrain_gamma": 0.1, "views": "per_sample"}


def test_listed_with_a_sentence():
    cls = DISTILLERS.get("sskd")
    first = " ".join((cls.__doc__ or "").strip().split("\n\n")[0].split())
    assert first.startswith("SSKD (Xu et al., ECCV 2020)") and first.endswith(".")
    assert DISTILLERS.get("catkd").report_order < cls.report_order < DISTILLERS.get("lakd").report_order


# ----- the stage in the trainer, the CLI ---------------------------------------------------------------------------
def _teacher_ckpt(tmp_path):
    path = tmp_path / "t.pt"
    torch.manual_seed(0)
    torch.save({"model": create_model("resnet8", 10).state_dict(), "arch": "resnet8", "num_classes": 10}, path)
    return path


def _tiny(tmp_path):
    return ["data.dataset=digits", "data.train_subset=32", "data.test_subset=16", "train.eval_batch_size=16",
            "solver.batch_size=16", "solver.lr=0.05", "model.name=resnet8", "train.progress=false",
            "train.threads=1", "data.num_workers=0", "method=sskd", "teacher.name=resnet8",
            f"teacher.checkpoint={_teacher_ckpt(tmp_path)}", "sskd.pretrain_epochs=1", f"output_dir={tmp_path}"]


def test_resumed_run_skips_the_stage_and_continues_bitwise(tmp_path, monkeypatch):
    calls = []
    original = SSKD.prepare
    monkeypatch.setattr(SSKD, "prepare", lambda self, *a, **k: (calls.append(1), original(self, *a, **k)))
    full, resumed = run_stopped_and_resumed([*_tiny(tmp_path), "solver.epochs=2"], tmp_path)
    assert len(calls) == 2  # the full run's and the stopped run's fresh starts; the resumed run has it in its checkpoint
    a, b = full.distiller.state_dict(), resumed.distiller.state_dict()
    assert a.keys() == b.keys() and any(k.startswith("t_head.") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_two_step_cli_run(tmp_path, capsys, caplog):
    with caplog.at_level(logging.INFO, logger="lakd"):
        code = main(["train", *_tiny(tmp_path), "solver.epochs=1", "solver.max_steps_per_epoch=2",
                     "experiment=smoke"])
    assert code == 0, capsys.readouterr().err[-2000:]
    assert (tmp_path / "smoke" / "summary.json").exists()
    assert "sskd teacher SS head stage: epoch 1/1" in caplog.text
    assert all(re.search(rf"\b{k} \d", caplog.text) for k in ("ce", "kd", "tf", "ss"))  # the epoch's loss terms


# ----- adapted networks -----------------------------------------------------------------------------------------------
def test_on_adapted_torchvision_resnets():
    torch.manual_seed(0)
    s, t = torchvision.models.resnet18(num_classes=10), torchvision.models.resnet18(num_classes=10)
    d = lakd.distiller(s, t, "sskd", image_size=32, options={"sskd": {"pretrain_epochs": 1}})
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([1, 2])
    # one's own loop: the per-sample copies are the data pipeline's; without them, the one-line way out
    with pytest.raises(LakdError, match=r"this batch lacks rot90, rot180, rot270; .*set sskd.views=batch") as info:
        d.train_step({"image": x, "target": y}, lambda loss: loss.backward())
    assert "\n" not in str(info.value)
    d = lakd.distiller(s, t, "sskd", image_size=32, options={"sskd": {"pretrain_epochs": 1, "views": "batch"}})
    before = [p.clone() for p in d.t_head.parameters()]
    d.prepare([{"image": x, "target": y}])
    assert any(not torch.equal(a, p) for a, p in zip(before, d.t_head.parameters()))
    logits, losses = d.train_step({"image": x, "target": y}, lambda loss: loss.backward())
    assert logits.shape == (2, 10) and set(losses) == {"ce", "kd", "tf", "ss"}
    assert all(torch.isfinite(v) for v in losses.values())
    assert d.s_head[0].in_features == 512 and all(p.grad is not None for p in d.s_head.parameters())


def test_refuses_a_network_without_a_pooled_embedding_in_one_line():
    timm = pytest.importorskip("timm")
    # a ViT whose head pools its tokens by attention (timm's global_pool='map'): no grid, no pooled embedding (a
    # class-token or average-pooled ViT has both: tests/test_token_models.py)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=32, patch_size=8,
                            depth=1, global_pool="map")
    with pytest.raises(LakdError, match=r"^method sskd needs feature maps and their pooled embedding .* from the "
                                        r"student, but .*gives logits but no feature maps") as info:
        lakd.distiller(vit, create_model("resnet8", 10), "sskd", image_size=32)
    assert "\n" not in str(info.value)
