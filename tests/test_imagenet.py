"""The ImageNet path on tiny data: torchvision ResNets on an image folder (LAKD, scratch, KD), LAKD's
connectors at another image size, and torchvision checkpoint layouts."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lakd.config import load_config
from lakd.distillers.lakd import Connector
from lakd.engine.trainer import Trainer
from lakd.models import FeatureShape, create_model, load_weights

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


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
