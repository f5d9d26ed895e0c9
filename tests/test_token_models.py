"""Networks without a pooled feature map (timm's ViT, a flattened-map classifier): logit-only methods train them,
feature methods refuse them with one line that names what works."""
from __future__ import annotations

import pytest
import torch

import lakd
from lakd.errors import LakdError

SIZE = 32


def _vit():
    timm = pytest.importorskip("timm")
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=SIZE, patch_size=8,
                             depth=2)


def test_vit_student_with_kd_one_step():
    torch.manual_seed(0)
    s, t = _vit(), _vit()
    d = lakd.distiller(s, t, "kd", image_size=SIZE)
    b = {"image": torch.randn(2, 3, SIZE, SIZE), "target": torch.tensor([0, 1]), "index": torch.arange(2)}
    _, losses = d.train_step(b, lambda loss: loss.backward())
    assert set(losses) == {"ce", "kd"} and all(torch.isfinite(v) for v in losses.values())
    assert [n for n, p in d.student.named_parameters() if p.grad is None] == []
    assert list(d.student.state_dict()) == list(s.state_dict())
    s.eval()
    d.student.eval()
    with torch.no_grad():
        assert torch.equal(d.student(b["image"]), s(b["image"]))
    assert d.student.feature_info()["num_classes"] == 10
    assert d.student.missing("features") and d.student.missing("class_maps")


@pytest.mark.parametrize("method", ["fitnet", "catkd"])
def test_feature_methods_refuse_a_vit_in_one_line(method):
    with pytest.raises(LakdError, match=r"no global pooling of a feature map .* needs only the logits") as info:
        lakd.distiller(_vit(), _vit(), method, image_size=SIZE)
    assert "\n" not in str(info.value)


def test_dkd_trains_a_vit_and_a_feature_method_refuses_it_at_construction_or_its_first_step():
    torch.manual_seed(0)
    b = {"image": torch.randn(2, 3, SIZE, SIZE), "target": torch.tensor([0, 1]), "index": torch.arange(2)}
    d = lakd.distiller(_vit(), _vit(), "dkd", image_size=SIZE)
    _, losses = d.train_step(b, lambda loss: loss.backward())
    assert all(torch.isfinite(v) for v in losses.values())
    # AT declares no need: it is refused where it first asks for maps, the construction-time reachability check's
    # dry step (or, with the check off, its first training step)
    with pytest.raises(LakdError, match="no global pooling of a feature map") as info:
        lakd.distiller(_vit(), _vit(), "at", image_size=SIZE)
    assert "\n" not in str(info.value)
    at = lakd.distiller(_vit(), _vit(), "at", image_size=SIZE, options={"train": {"check_reachability": False}})
    with pytest.raises(LakdError, match="no global pooling of a feature map") as info:
        at.train_step(b, lambda loss: loss.backward())
    assert "\n" not in str(info.value)
