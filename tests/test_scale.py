"""Scale switches and the ImageNet path: mixed precision (bf16/fp16, loss scaling through LAKD's local
backwards), channels_last, torch.compile, torchvision ResNets on a tiny image folder, ``lakd bench`` and the
saved-tensor memory meter."""
from __future__ import annotations

import contextlib
import copy
import io
import json
import os

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lakd.analysis.cost import SavedTensorMeter, measure_memory
from lakd.cli.main import main as cli_main
from lakd.config import load_config
from lakd.distillers import build_distiller
from lakd.distillers.lakd import Connector, ndam_map
from lakd.engine.step import training_step
from lakd.engine.trainer import Trainer
from lakd.models import FeatureShape, create_model, load_weights
from lakd.runtime.device import AMP_DTYPES

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make_distiller(method, student="resnet8", teacher="resnet14", extra=(), seed=0, num_classes=10):
    torch.manual_seed(seed)
    over = [f"method={method}", f"model.name={student}", *extra]
    if method != "scratch":
        over.append(f"teacher.name={teacher}")
    cfg = load_config(None, over)
    s = create_model(student, num_classes)
    t = create_model(teacher, num_classes) if method != "scratch" else None
    return build_distiller(cfg, s, t, num_data=64).train()


def image_batch(n=8, size=32, num_classes=10, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.randn(n, 3, size, size, generator=g),
            "target": torch.randint(0, num_classes, (n,), generator=g), "index": torch.arange(n)}


def flat(tensors):
    return torch.cat([t.reshape(-1).float() for t in tensors])


class RecordingSGD(torch.optim.SGD):
    """SGD that remembers the gradients it was asked to step with (after GradScaler's unscale)."""

    def __init__(self, params, **kw):
        super().__init__(params, **kw)
        self.seen: list[list[torch.Tensor]] = []

    def step(self, closure=None):
        self.seen.append([p.grad.detach().clone() for g in self.param_groups for p in g["params"]])
        return super().step(closure)


def digits_overrides(tmp_path, method="lakd", extra=()):
    over = ["data.dataset=digits", "data.test_subset=32", "train.eval_batch_size=32", "solver.batch_size=16",
            "solver.max_steps_per_epoch=2", "solver.epochs=1", "solver.lr=0.05", "train.progress=false",
            "train.threads=1", f"output_dir={tmp_path}", f"method={method}", "model.name=resnet8"]
    if method != "scratch":
        over.append("teacher.name=resnet8")
    return over + list(extra)


# --------------------------------------------------------------------------------------------------------
# mixed precision
# --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("amp", ["bf16", "fp16"])
@pytest.mark.parametrize("method", ["scratch", "kd", "catkd", "lakd"])
def test_amp_steps_run_in_low_precision_and_update(method, amp):
    d = make_distiller(method)
    dtype = AMP_DTYPES[amp]
    params = d.trainable_parameters()
    before = [p.detach().clone() for p in params]
    opt = torch.optim.SGD(params, lr=0.05, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0, enabled=amp == "fp16")
    for step in range(2):
        logits, losses = training_step(d, opt, scaler, image_batch(seed=step), params, dtype)
        assert logits.dtype == dtype  # autocast was on: the classifier ran in the low precision
        assert not logits.requires_grad and all(not v.requires_grad for v in losses.values())
        assert all(torch.isfinite(v).all() for v in losses.values()), losses
    if amp == "fp16":
        assert scaler.get_scale() == 256.0  # no overflow, so no skipped step and no back-off
    assert all(p.dtype == torch.float32 for p in params)  # master weights stay fp32
    moved = [float((p.detach() - b).abs().max()) for p, b in zip(params, before)]
    assert min(moved) > 0.0  # every trainable tensor of every method got a gradient step


def test_fp16_loss_scale_is_applied_once_to_every_local_module():
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
    firsts = {0: d16.student.stem_modules()[0].weight, 2: d16.student.classifier.weight}
    for k, p in firsts.items():
        p.register_post_accumulate_grad_hook(lambda q, k=k: raw.__setitem__(k, q.grad.clone()))
    _, losses = training_step(d16, opt, scaler, batch, params, torch.float16)
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


def test_fp16_overflow_in_one_module_skips_the_whole_step():
    d = make_distiller("lakd", extra=["sdm.splits=[1,2,3]"])
    params = d.trainable_parameters()
    before = [p.detach().clone() for p in params]
    opt = RecordingSGD(params, lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=10**6)
    stem = d.student.stem_modules()[0].weight  # module 1 only; modules 2 and 3 get finite gradients
    handle = stem.register_hook(lambda g: g * float("inf"))
    _, losses = training_step(d, opt, scaler, image_batch(), params, torch.float16)
    assert all(torch.isfinite(v) for v in losses.values())
    last = d.student.classifier.weight
    assert torch.isfinite(last.grad).all() and last.grad.abs().sum() > 0
    assert opt.seen == []  # optimizer.step was not called
    assert all(torch.equal(p.detach(), b) for p, b in zip(params, before))
    assert scaler.get_scale() == 512.0 and opt.state_dict()["state"] == {}
    handle.remove()
    training_step(d, opt, scaler, image_batch(), params, torch.float16)  # the next clean step goes through
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
def test_trainer_amp_switch(tmp_path, amp):
    cfg = load_config(None, digits_overrides(tmp_path, extra=[f"train.amp={amp}", "sdm.splits=[1,2,3]"]))
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


# --------------------------------------------------------------------------------------------------------
# channels_last and torch.compile
# --------------------------------------------------------------------------------------------------------
def _one_step_run(tmp_path, name, extra):
    cfg = load_config(None, digits_overrides(tmp_path, extra=["solver.max_steps_per_epoch=1", "sdm.splits=[1,2,3]",
                                                              f"experiment={name}", *extra]))
    tr = Trainer(cfg, quiet=True)
    return tr, tr.fit()


def test_channels_last_matches_contiguous(tmp_path):
    tr_cl, _ = _one_step_run(tmp_path, "cl", ["train.channels_last=true"])
    tr_c, _ = _one_step_run(tmp_path, "contig", [])
    convs = [p for n, p in tr_cl.distiller.named_parameters() if p.ndim == 4 and p.shape[-1] == 3]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
                         for p in convs)  # still after the optimizer step
    teacher_conv = next(p for p in tr_cl.distiller.teacher.parameters() if p.ndim == 4 and p.shape[-1] == 3)
    assert teacher_conv.is_contiguous(memory_format=torch.channels_last)
    img = next(iter(tr_cl.data.train))["image"]
    assert img.is_contiguous(memory_format=torch.channels_last) and not img.is_contiguous()
    assert next(iter(tr_c.data.train))["image"].is_contiguous()
    a, b = tr_cl.history[0], tr_c.history[0]
    assert a["losses"].keys() == b["losses"].keys()
    for k in a["losses"]:
        assert a["losses"][k] == pytest.approx(b["losses"][k], rel=1e-5, abs=1e-6), k
    assert a["test_loss"] == pytest.approx(b["test_loss"], rel=1e-4)
    for (n, p), q in zip(tr_cl.distiller.student.named_parameters(), tr_c.distiller.student.parameters()):
        assert torch.allclose(p, q, atol=1e-5), n


def test_compile_switch_runs_lakd_like_eager(tmp_path, monkeypatch):
    """``train.compile`` compiles every block in place; run it through dynamo + AOTAutograd (the
    ``aot_eager`` backend, seconds) and check the local-backward step gives the eager losses. The inductor
    (C++ codegen) variant is ``test_compile_inductor`` below."""
    import torch._dynamo

    calls = []
    original = nn.Module.compile

    def compile_aot(self, *args, **kwargs):
        calls.append(type(self).__name__)
        kwargs.setdefault("backend", "aot_eager")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(nn.Module, "compile", compile_aot)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    try:
        tr, _ = _one_step_run(tmp_path, "compiled", ["train.compile=true", "solver.max_steps_per_epoch=2"])
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    finally:
        torch._dynamo.reset()
    assert graphs >= 3  # the blocks really went through dynamo (not silently eager)
    # resnet8 student and teacher: 3 blocks each
    assert len(calls) == 6
    assert all(getattr(m, "_compiled_call_impl", None) is not None
               for i in range(3) for m in tr.distiller.student.block_modules(i))
    monkeypatch.undo()
    eager, _ = _one_step_run(tmp_path, "eager", ["solver.max_steps_per_epoch=2"])
    for k, v in eager.history[0]["losses"].items():
        assert tr.history[0]["losses"][k] == pytest.approx(v, rel=1e-4, abs=1e-5), k


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("LAKD_TEST_INDUCTOR"),
                    reason="inductor compiles C++ for every block: ~70 s on 2 cores with a cold cache; "
                           "set LAKD_TEST_INDUCTOR=1 to run")
def test_compile_inductor(tmp_path):
    import torch._dynamo

    torch._dynamo.reset()
    try:
        tr, summary = _one_step_run(tmp_path, "inductor", ["train.compile=true", "solver.max_steps_per_epoch=2"])
    finally:
        torch._dynamo.reset()
    assert all(np.isfinite(v) for v in tr.history[0]["losses"].values()) and summary["final_top1"] is not None


# --------------------------------------------------------------------------------------------------------
# ImageNet path (torchvision ResNets, image folders) on tiny data
# --------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_imagenet(tmp_path_factory):
    """3 classes x 6 images of 72x72 in train/ and val/, and a 3-class resnet34 teacher saved as torchvision
    does (a bare state dict) with BN statistics calibrated on random inputs (so activations stay O(1))."""
    from PIL import Image

    root = tmp_path_factory.mktemp("imagenet")
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in range(3):
            os.makedirs(root / split / f"n0{c}", exist_ok=True)
            for i in range(6):
                base = np.zeros((72, 72, 3))
                base[..., c] = 160.0  # each class has its own dominant colour
                img = np.clip(base + rng.normal(0, 40, (72, 72, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(root / split / f"n0{c}" / f"{split}_{i}.png")
    torch.manual_seed(0)
    teacher = create_model("resnet34", 3)
    for m in teacher.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None  # cumulative average
    teacher.train()
    with torch.no_grad():
        for _ in range(3):
            teacher(torch.randn(8, 3, 64, 64))
    ckpt = root / "resnet34-tiny.pth"
    torch.save(teacher.state_dict(), ckpt)
    return root, ckpt


def imagenet_cfg(path, root, ckpt, out, extra=()):
    over = [f"data.root={root}", "data.image_size=64", "data.num_workers=0", "solver.epochs=1",
            "solver.batch_size=6", "train.eval_batch_size=6", f"output_dir={out}", "train.progress=false",
            "train.threads=1"]
    if ckpt is not None:
        over.append(f"teacher.checkpoint={ckpt}")
    return load_config(os.path.join(CONFIGS, "imagenet", *path), over + list(extra))


def _fit_and_check(cfg, loss_keys):
    tr = Trainer(cfg, quiet=True)
    assert tr.data.num_train == 18 and tr.data.num_classes == 3 and tr.data.image_size == 64
    assert len(tr.data.train) == 3
    before = {k: v.clone() for k, v in tr.distiller.student.state_dict().items()}
    summary = tr.fit()
    files = set(os.listdir(tr.run_dir))
    assert {"config.yaml", "metrics.jsonl", "summary.json", "last.pt", "best.pt", "tb"} <= files
    rec = [json.loads(x) for x in open(os.path.join(tr.run_dir, "metrics.jsonl"))]
    assert len(rec) == 1 and set(rec[0]["losses"]) == loss_keys
    assert all(np.isfinite(v) for v in rec[0]["losses"].values())
    assert summary["dataset"] == "imagenet" and summary["student"] == "resnet18"
    assert 0.0 <= summary["final_top1"] <= 100.0 and summary["final_top5"] == 100.0  # 3 classes: top-5 is all
    after = tr.distiller.student.state_dict()
    assert any(not torch.equal(after[k], before[k]) for k in before if k.endswith("weight"))
    ck = torch.load(os.path.join(tr.run_dir, "last.pt"), weights_only=True)
    assert ck["arch"] == "resnet18" and ck["num_classes"] == 3 and list(ck["mean"]) == [0.485, 0.456, 0.406]
    return tr, summary


@pytest.mark.parametrize("extra", [[], ["train.amp=bf16", "train.channels_last=true"]], ids=["fp32", "bf16_cl"])
def test_imagenet_lakd_resnet34_resnet18(tiny_imagenet, tmp_path, extra):
    root, ckpt = tiny_imagenet
    cfg = imagenet_cfg(("lakd", "resnet34_resnet18.yaml"), root, ckpt, tmp_path, extra)
    tr, summary = _fit_and_check(cfg, {"feat1", "feat2", "feat3", "feat4", "ce", "att"})
    d = tr.distiller
    assert d.splits == [1, 2, 4, 8] and d.teacher_points == [3, 7, 13, 16]  # resnet34's stage ends
    # resnet18 block 1 (64ch) -> teacher stage 1 (64ch): identity; block 2 (64ch, stride 4) -> stage 2
    # (128ch, stride 8) and block 4 (128ch) -> stage 3 (256ch): 1x1 conv + BN + resize; block 8 -> stage 4: identity
    assert [c.proj is not None for c in d.connectors] == [False, True, True, False]
    assert [c.proj[0].out_channels for c in d.connectors if c.proj is not None] == [128, 256]
    assert summary["teacher"] == "resnet34" and summary["teacher_top1"] is not None
    assert summary["final_ek"] is None or 0.0 <= summary["final_ek"] <= 100.0


def test_imagenet_scratch_and_kd(tiny_imagenet, tmp_path):
    root, ckpt = tiny_imagenet
    _fit_and_check(imagenet_cfg(("scratch", "resnet18.yaml"), root, None, tmp_path), {"ce"})
    _fit_and_check(imagenet_cfg(("scratch", "resnet18.yaml"), root, ckpt, tmp_path,
                                ["method=kd", "teacher.name=resnet34", "experiment=kd"]), {"ce", "kd"})


def test_lakd_connector_resizes_to_the_runtime_teacher_size():
    # built for 224-px inputs (56 -> 28), used at 64 px where the maps are 16x16 and 8x8
    c = Connector(FeatureShape(64, 56, 56), FeatureShape(128, 28, 28))
    assert c.size == (28, 28)
    x = torch.randn(2, 64, 16, 16)
    y = c.eval()(x, (8, 8))
    ref = F.avg_pool2d(c.proj(x), 2)
    assert y.shape == (2, 128, 8, 8) and torch.allclose(y, ref, atol=1e-6)
    up = Connector(FeatureShape(8, 4, 4), FeatureShape(8, 8, 8))(torch.ones(1, 8, 2, 2), (4, 4))
    assert up.shape == (1, 8, 4, 4) and torch.allclose(up, torch.ones_like(up))
    same = Connector(FeatureShape(8, 8, 8), FeatureShape(8, 8, 8))
    z = torch.randn(1, 8, 5, 5)
    assert same(z, (5, 5)) is z


@pytest.mark.parametrize("layout", ["bare", "state_dict", "module_prefix", "state_dict_module_prefix"])
def test_torchvision_layout_checkpoints_load(tmp_path, layout):
    torch.manual_seed(3)
    src = create_model("resnet34", 3)
    sd = src.state_dict()
    assert "layer3.5.conv2.weight" in sd and "fc.weight" in sd  # torchvision's own key names
    obj = {"bare": sd, "state_dict": {"state_dict": sd, "epoch": 90},
           "module_prefix": {f"module.{k}": v for k, v in sd.items()},
           "state_dict_module_prefix": {"state_dict": {f"module.{k}": v for k, v in sd.items()}}}[layout]
    path = tmp_path / "r34.pth"
    torch.save(obj, path)
    dst = create_model("resnet34", 3, checkpoint=str(path))
    for k, v in dst.state_dict().items():
        assert torch.equal(v, sd[k]), k


def test_torchvision_checkpoint_without_num_batches_tracked(tmp_path):
    sd = {k: v for k, v in create_model("resnet34", 3).state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(sd, tmp_path / "old.pth")
    m = create_model("resnet34", 3)
    load_weights(m, str(tmp_path / "old.pth"), arch="resnet34")
    assert torch.equal(m.fc.weight, sd["fc.weight"])


# --------------------------------------------------------------------------------------------------------
# lakd bench and the memory meter
# --------------------------------------------------------------------------------------------------------
ALL_METHODS = ["scratch", "kd", "fitnet", "at", "rkd", "crd", "ofd", "catkd", "dkd", "lakd", "lakd_joint"]


@pytest.mark.parametrize("what,key", [("speed", "images_per_s"), ("memory", "peak_bytes")])
def test_bench_json_for_every_method(what, key):
    args = ["bench", what, "--student", "resnet8", "--teacher", "resnet14", "--batch-size", "8",
            "--num-classes", "10", "--device", "cpu", "--methods", ",".join(ALL_METHODS), "--json"]
    if what == "speed":
        args += ["--steps", "1", "--warmup", "1"]
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = cli_main(args)
    assert rc == 0
    out = json.loads(buf.getvalue())
    assert out["batch_size"] == 8 and out["device"].startswith("cpu")
    assert list(out["results"]) == ALL_METHODS
    for m, r in out["results"].items():
        assert set(r) == {key, "ratio_to_scratch"}, m
        assert r[key] > 0
        assert r["ratio_to_scratch"] == pytest.approx(r[key] / out["results"]["scratch"][key])
    assert out["results"]["scratch"]["ratio_to_scratch"] == 1.0
    if what == "memory":
        res = out["results"]
        assert res["lakd"]["peak_bytes"] < res["scratch"]["peak_bytes"] < res["lakd_joint"]["peak_bytes"]


def test_local_backward_lowers_the_saved_tensor_peak():
    out = measure_memory("resnet56", "resnet20", ["scratch", "lakd", "lakd_joint"], batch_size=16,
                         num_classes=100, device="cpu")
    r = {m: v["peak_bytes"] for m, v in out["results"].items()}
    assert r["lakd"] < 0.8 * r["scratch"], r
    assert r["lakd_joint"] >= 0.95 * r["scratch"], r


def test_saved_tensor_meter_by_hand_and_release():
    meter = SavedTensorMeter()
    a = torch.randn(10, requires_grad=True)
    b = torch.randn(10, requires_grad=True)
    with meter.hooks():
        c = a * b  # saves a and b: 2 x 40 bytes
        assert meter.current == 80
        d = c.exp()  # saves its result: 40 bytes
        e = (d * a).sum()  # saves d (already counted) and a (already counted: same storage)
    assert meter.current == 120 and meter.peak == 120
    e.backward()
    assert meter.current == 0 and meter.live == {} and meter.peak == 120
    # a whole LAKD step (local backward) releases everything too
    d = make_distiller("lakd", extra=["sdm.splits=[1,2,3]"])
    params = d.trainable_parameters()
    opt = torch.optim.SGD(params, lr=0.01)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    meter = SavedTensorMeter()
    with meter.hooks():
        training_step(d, opt, scaler, image_batch(), params)
    assert meter.peak > 0 and meter.current == 0 and meter.live == {}
