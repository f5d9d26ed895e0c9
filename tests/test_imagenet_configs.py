"""Every shipped ImageNet distillation config (configs/imagenet/<method>/*.yaml, not teachers/ or scratch/) loads,
builds its distiller on torchvision's resnet34 -> resnet18 (1000 classes) and runs a training step on a small batch
(2 images of 64 x 64) at its first and at its last epoch: finite losses, and every trainable parameter of the
student gets a finite gradient.
Pre-training stages (``prepare``: FSP, FT, SSKD, ...) are not run."""
from __future__ import annotations

import copy
import glob
import os

import pytest
import torch

from lakd.config import load_config
from lakd.distillers import build_distiller
from lakd.models import create_model

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(p for p in glob.glob(os.path.join(ROOT, "configs", "imagenet", "*", "*.yaml"))
                 if os.path.basename(os.path.dirname(p)) not in ("teachers", "scratch"))


@pytest.fixture(scope="module")
def nets():
    """resnet34 and resnet18 with 1000 classes, built once (adapting them traces the graph); each test copies."""
    torch.manual_seed(0)
    return create_model("resnet34", 1000), create_model("resnet18", 1000)


def test_the_configs_are_found():
    dirs = {os.path.basename(os.path.dirname(p)) for p in CONFIGS}
    assert {"fsp", "ft", "pad_l2", "rkd", "sskd", "sp", "ickd", "kd", "lakd"} <= dirs
    assert all(os.path.basename(p) == "resnet34_resnet18.yaml" for p in CONFIGS)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: os.path.basename(os.path.dirname(p)))
def test_config_steps_on_resnet34_resnet18(nets, path):
    cfg = load_config(path, ["data.image_size=64"])
    method = os.path.basename(os.path.dirname(path))
    assert cfg["data"]["dataset"] == "imagenet" and cfg["experiment"] == f"imagenet_{method}_resnet34_resnet18"
    assert (cfg["teacher"]["name"], cfg["model"]["name"]) == ("resnet34", "resnet18")
    assert cfg["teacher"]["checkpoint"] == "pretrained/resnet34-b627a593.pth"
    t, s = copy.deepcopy(nets[0]), copy.deepcopy(nets[1])
    torch.manual_seed(0)
    d = build_distiller(cfg, s, t, num_data=16_385)  # the fewest images CRD's 16384 negatives fit (ImageNet: 1.28M)
    d.train()
    x, y = torch.randn(2, 3, 64, 64), torch.tensor([3, 7])
    params = [(n, p) for n, p in d.student.named_parameters() if p.requires_grad]
    assert params
    epochs = d.total_epochs
    for epoch in (0, epochs - 1):  # the first and the last epoch: a method's later stage (PAD-L2's) runs too
        d.set_epoch(epoch, epochs)
        d.zero_grad(set_to_none=True)
        logits, losses = d.forward_train(x, y, index=torch.tensor([0, 1]), views=d.random_views(x) or None)
        assert logits.shape == (2, 1000)
        assert losses and all(torch.isfinite(v) for v in losses.values()), (epoch, losses)
        sum(losses.values()).backward()
        missing = [n for n, p in params if p.grad is None]
        assert not missing, (epoch, missing)
        assert all(torch.isfinite(p.grad).all() for _, p in params), epoch
        assert any(p.grad.abs().sum() > 0 for _, p in params), epoch
