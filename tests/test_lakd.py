"""LAKD: gradient isolation, local == joint backward, NDAM, class attention, EK, no-detach, a tiny run."""
from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F

from lakd.config import load_config
from lakd.distillers import build_distiller
from lakd.distillers.lakd import ndam_map
from lakd.distillers.losses import class_activation_maps, class_attention_loss
from lakd.engine.metrics import extracurricular_knowledge
from lakd.errors import LakdError
from lakd.models import create_model


def make(splits=(1, 2, 3), student="resnet8", teacher="resnet14", extra=(), seed=0):
    torch.manual_seed(seed)
    cfg = load_config(None, ["method=lakd", f"teacher.name={teacher}", f"model.name={student}",
                             f"sdm.splits=[{','.join(map(str, splits))}]", *extra])
    s, t = create_model(student, 10), create_model(teacher, 10)
    return build_distiller(cfg, s, t).train()


def batch(n=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.randn(n, 3, 32, 32, generator=g), "target": torch.randint(0, 10, (n,), generator=g)}


def module_params(d, k, block_parameters):
    """Parameters owned by local module k (0-based): its blocks (+stem/head) and its connector."""
    start = 0 if k == 0 else d.splits[k - 1]
    last = k == len(d.splits) - 1
    ps = block_parameters(d.student, start, d.splits[k], stem=k == 0, head=last)
    return ps + list(d.connectors[k].parameters())


def grads_of(params):
    return [None if p.grad is None else p.grad.clone() for p in params]


@pytest.mark.parametrize("splits", [(1, 2, 3), (2, 3)])
def test_gradient_isolation_is_exact(splits, block_parameters):
    d = make(splits, teacher="resnet14" if len(splits) == 3 else "resnet8",
             extra=() if len(splits) == 3 else ["sdm.teacher_points=[2,3]"])
    b = batch()
    n = len(d.splits)
    for k in range(n):
        d.zero_grad(set_to_none=True)
        _, losses = d.forward_train(**b)
        own = [v for name, v in losses.items() if name == f"feat{k + 1}" or (k == n - 1 and name in ("ce", "att"))]
        sum(own).backward()
        for j in range(n):
            g = grads_of(module_params(d, j, block_parameters))
            if j < k:
                # earlier modules: not a single gradient element from module k's loss
                assert all(x is None or torch.count_nonzero(x) == 0 for x in g), (k, j)
            if j == k:
                assert any(x is not None and torch.count_nonzero(x) > 0 for x in g), (k, j)


def test_local_backward_equals_joint_backward():
    d = make((1, 2, 3))
    d_joint = copy.deepcopy(d)
    d_joint.local_backward = False
    b = batch()
    for model in (d, d_joint):
        model.zero_grad(set_to_none=True)
        model.train_step(b, lambda loss: loss.backward())
    pa, pb = dict(d.named_trainable_parameters()), dict(d_joint.named_trainable_parameters())
    assert pa.keys() == pb.keys()
    worst = 0.0
    for name in pa:
        ga, gb = pa[name].grad, pb[name].grad
        assert (ga is None) == (gb is None), name
        if ga is not None:
            worst = max(worst, (ga - gb).abs().max().item())
    assert worst <= 1e-6
    # and the losses agree
    _, la = d.forward_train(**b)
    _, lb = d_joint.forward_train(**b)
    for k in la:
        assert torch.allclose(la[k], lb[k], atol=1e-6)


def test_no_detach_lets_gradients_cross_modules(block_parameters):
    d = make((1, 2, 3), extra=["sdm.detach=false"])
    assert not d.local_backward
    d.zero_grad(set_to_none=True)
    _, losses = d.forward_train(**batch())
    losses["ce"].backward()  # the last module's loss ...
    g = grads_of(module_params(d, 0, block_parameters))
    assert any(x is not None and torch.count_nonzero(x) > 0 for x in g)  # ... reaches module 1


def test_ndam_map_on_hand_made_tensor():
    f = torch.zeros(1, 2, 2, 2)
    f[0, 0] = torch.tensor([[1.0, -2.0], [0.0, 3.0]])
    f[0, 1] = torch.tensor([[-1.0, 0.0], [4.0, -1.0]])
    # |F| channel mean: [[1, 1], [2, 2]]; channel max: [[1, 2], [4, 3]]
    a = 1.0 * torch.tensor([[1.0, 1.0], [2.0, 2.0]]) + 2.0 * torch.tensor([[1.0, 2.0], [4.0, 3.0]])
    expected = a / a.mean()
    got = ndam_map(f, 1.0, 2.0, use_abs=True)
    assert got.shape == (1, 1, 2, 2)
    assert torch.allclose(got[0, 0], expected, atol=1e-6)
    assert torch.allclose(got.mean(), torch.tensor(1.0))
    # without abs: mean [[0, -1], [2, 1]], max [[1, 0], [4, 3]] -> a = [[2,-1],[10,7]] -> shifted by +1
    raw = torch.tensor([[2.0, -1.0], [10.0, 7.0]]) + 1.0
    assert torch.allclose(ndam_map(f, 1.0, 2.0, use_abs=False)[0, 0], raw / raw.mean(), atol=1e-6)


def test_feature_loss_is_ndam_weighted_mse():
    d = make((1, 2, 3), student="resnet8", teacher="resnet8")
    s = torch.randn(2, 16, 32, 32)
    t = torch.randn(2, 16, 32, 32)
    w = ndam_map(t, 1.0, 2.0, True)
    assert torch.allclose(d.feature_loss(0, s, t), (w * (s - t) ** 2).mean(), atol=1e-6)
    d.ndam["enabled"] = False
    assert torch.allclose(d.feature_loss(0, s, t), F.mse_loss(s, t), atol=1e-6)


def _teacher_by_hand(t, image, points):
    """The teacher's block outputs and pre-activations at ``points`` (1-based), block by block."""
    with torch.no_grad():
        h, outs = t.stem_forward(image), {}
        for i in range(t.num_blocks):
            h, pre = t.block_forward(i, h, preact=True)
            outs[i + 1] = (h, pre)
    return [outs[p] for p in points]


@pytest.mark.parametrize("points", [[2, 4, 6], [4, 1, 6]])  # [4, 1, 6]: a point passed on the way is kept
def test_ndam_teacher_preact_source(points):
    """ndam.source=teacher_preact: the map comes from the teacher block's signed pre-activation at each point,
    so abs changes the loss; with the default source (post-ReLU) abs is a no-op, bitwise."""
    extra = [f"sdm.teacher_points=[{','.join(map(str, points))}]"]
    d = make((1, 2, 3), extra=extra + ["ndam.source=teacher_preact"])
    b = batch()
    targets, _ = d.teacher_targets(b["image"])
    hand = _teacher_by_hand(d.teacher, b["image"], points)
    for (feat, pre), (h_feat, h_pre) in zip(targets, hand):
        assert torch.equal(feat, h_feat) and torch.equal(pre, h_pre)
        assert (pre < 0).any() and (feat >= 0).all()
    s = torch.randn(6, 16, 32, 32)  # a module-1 output of resnet8
    w = ndam_map(hand[0][1], 1.0, 2.0, True)
    phi = d.connectors[0](s, hand[0][0].shape[-2:])
    assert torch.allclose(d.feature_loss(0, s, *hand[0]), (w * (phi - hand[0][0]) ** 2).mean(), atol=1e-6)

    def losses(source, use_abs):
        m = make((1, 2, 3), extra=extra + [f"ndam.source={source}", f"ndam.abs={use_abs}"])
        _, out = m.forward_train(**b)
        return out

    post_on, post_off = losses("teacher", "true"), losses("teacher", "false")
    assert all(torch.equal(post_on[k], post_off[k]) for k in post_on)  # |F| = F after a ReLU
    pre_on, pre_off = losses("teacher_preact", "true"), losses("teacher_preact", "false")
    assert not torch.allclose(pre_on["feat1"], pre_off["feat1"])
    assert not torch.allclose(pre_on["feat1"], post_on["feat1"])
    # the local backward (teacher interleaved with the modules) gives the joint backward's gradients
    d_joint = copy.deepcopy(d)
    d_joint.local_backward = False
    for model in (d, d_joint):
        model.zero_grad(set_to_none=True)
        model.train_step(b, lambda loss: loss.backward())
    for (name, pa), (_, pb) in zip(d.named_trainable_parameters(), d_joint.named_trainable_parameters()):
        assert (pa.grad is None) == (pb.grad is None), name
        if pa.grad is not None:
            assert torch.allclose(pa.grad, pb.grad, atol=1e-6), name


def test_ndam_source_errors():
    with pytest.raises(LakdError, match="ndam.source must be one of teacher, teacher_preact, student, got 'teachr'"):
        make((1, 2, 3), extra=["ndam.source=teachr"])
    with pytest.raises(LakdError, match=r"method lakd needs pre-activation stage outputs from the teacher \(for "
                       r"ndam.source=teacher_preact\), but MobileNetV2 has no pre-activation .*\(or change ndam.source\)$"):
        make((1, 2, 3), teacher="mobilenetv2", extra=["ndam.source=teacher_preact", "sdm.teacher_points=[4,8,17]"])


def test_class_attention_loss_hand_computation():
    fmap = torch.arange(16, dtype=torch.float32).view(1, 1, 4, 4)  # one channel
    fc = torch.nn.Linear(1, 2)
    with torch.no_grad():
        fc.weight.copy_(torch.tensor([[1.0], [-2.0]]))
        fc.bias.fill_(100.0)  # excluded from CAMs
    cam = class_activation_maps(fmap, fc)
    assert torch.equal(cam[0, 0], fmap[0, 0]) and torch.equal(cam[0, 1], -2 * fmap[0, 0])
    # 2x2 average pooling of 0..15 laid out 4x4: [[2.5, 4.5], [10.5, 12.5]]
    pooled = torch.tensor([[2.5, 4.5], [10.5, 12.5]])
    zero = torch.zeros_like(cam)
    expected = ((pooled**2).sum() + ((2 * pooled) ** 2).sum()) / 8
    assert torch.allclose(class_attention_loss(cam, zero, resolution=2), expected)
    # normalised: each class map has unit L2 norm over space -> squared error with zeros is 1 per class
    assert torch.allclose(class_attention_loss(cam, zero, resolution=2, normalize=True), torch.tensor(2 / 8))


@pytest.mark.parametrize("hw,size", [((8, 8), 2), ((8, 8), 4), ((4, 8), 2), ((7, 7), 2), ((6, 9), 4)])
def test_area_pool_is_adaptive_average_pooling(hw, size):
    """CAT-KD's pooling goes through avg_pool2d when the size divides the map (a CUDA backward without
    atomics): bitwise the adaptive pool's values and gradients on a CPU; other sizes fall back to it."""
    from lakd.distillers.losses import area_pool

    g = torch.Generator().manual_seed(hash(hw) % 1000)
    x = torch.randn(4, 10, *hw, generator=g, requires_grad=True)
    a, b = area_pool(x, size), torch.nn.functional.adaptive_avg_pool2d(x, size)
    up = torch.randn(a.shape, generator=g)
    (ga,), (gb,) = torch.autograd.grad(a, x, up), torch.autograd.grad(b, x, up)
    assert a.shape == (4, 10, size, size) and torch.equal(a, b) and torch.equal(ga, gb)


def test_extracurricular_knowledge_on_a_table():
    teacher = [True, True, False, False, False, True, False]
    student = [True, False, True, False, True, True, False]
    # teacher wrong at 2, 3, 4, 6; student right at 2 and 4 of those -> 2/4
    assert extracurricular_knowledge(student, teacher) == pytest.approx(50.0)
    assert extracurricular_knowledge([True], [True]) is None


def test_bad_split_points_are_clear_errors():
    with pytest.raises(LakdError, match="sdm.splits"):
        make((1, 2, 4))  # resnet8 has 3 blocks
    with pytest.raises(LakdError, match="sdm.splits"):
        make((2, 1, 3))
    with pytest.raises(LakdError, match="teacher_points"):
        make((3,), teacher="resnet14")  # 1 module vs 3 teacher stages


def test_connector_when_shapes_differ():
    # resnet8x4 (64/128/256 channels) from resnet14 (16/32/64): 1x1 conv + BN connectors
    d = make((1, 2, 3), student="resnet8x4", teacher="resnet14")
    assert all(c.proj is not None for c in d.connectors)
    logits, losses = d.forward_train(**batch())
    assert logits.shape == (6, 10) and all(torch.isfinite(v) for v in losses.values())


def test_tiny_lakd_run_learns(tmp_path):
    from lakd.engine.trainer import Trainer

    common = ["data.dataset=digits", "data.train_subset=640", "solver.batch_size=64", "solver.lr=0.1",
              "solver.schedule=cosine", "train.progress=false", "train.threads=2", f"output_dir={tmp_path}"]
    t_cfg = load_config(None, common + ["method=scratch", "model.name=resnet8", "solver.epochs=3",
                                        "experiment=teacher"])
    Trainer(t_cfg, quiet=True).fit()
    cfg = load_config(None, common + ["method=lakd", "model.name=resnet8", "teacher.name=resnet8",
                                      f"teacher.checkpoint={tmp_path}/teacher/best.pt", "solver.epochs=3",
                                      "experiment=lakd", "sdm.splits=[1,2,3]"])
    summary = Trainer(cfg, quiet=True).fit()
    lines = [json.loads(x) for x in open(tmp_path / "lakd" / "metrics.jsonl")]
    assert lines[-1]["train_loss"] < lines[0]["train_loss"]
    assert summary["final_top1"] > 30.0  # chance is 10%
    assert summary["final_ek"] is not None
    assert set(lines[0]["losses"]) == {"feat1", "feat2", "feat3", "ce", "att"}


@pytest.mark.parametrize("weighted", [True, False])
def test_weighted_mse_equals_the_autograd_composition(weighted):
    """The hand-written feature loss (memory: nothing saved beyond s, t, w) equals mean(w * (s - t)^2) built
    from autograd ops, value and gradient."""
    from lakd.distillers.lakd import weighted_mse

    g = torch.Generator().manual_seed(0)
    s1 = torch.randn(4, 8, 6, 6, generator=g, requires_grad=True)
    s2 = s1.detach().clone().requires_grad_(True)
    t = torch.randn(4, 8, 6, 6, generator=g)
    w = torch.rand(4, 1, 6, 6, generator=g) if weighted else None
    ref = ((s1 - t).pow(2) * (w if weighted else 1.0)).mean()
    got = weighted_mse(s2, t, w)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-7)
    ref.backward()
    got.backward()
    torch.testing.assert_close(s2.grad, s1.grad, rtol=1e-6, atol=1e-8)
