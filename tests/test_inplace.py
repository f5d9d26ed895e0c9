"""In-place ops at or after a cut: LAKD's local backward runs, teacher features are the values at the cut (never
rewritten by a later in-place op), and the student's weights and state_dict stay the user's network's."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import lakd
from lakd.models import adapt

SIZE = 32


class InplaceNet(nn.Module):
    """Block ``a`` ends with a BatchNorm (the cut); ``b`` starts with an in-place ReLU on it, and the head applies
    ``F.relu(x, inplace=True)`` to the last cut's output, as torchvision's DenseNet does."""

    def __init__(self, num_classes=10, width=8):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU())
        self.a = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width))
        self.b = nn.Sequential(nn.ReLU(inplace=True), nn.Conv2d(width, 2 * width, 3, stride=2, padding=1),
                               nn.BatchNorm2d(2 * width))
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        h = self.b(self.a(self.stem(x)))
        h = F.relu(h, inplace=True)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(h, 1), 1))


def _batch(n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.randn(n, 3, SIZE, SIZE, generator=g), "target": torch.randint(0, 10, (n,), generator=g),
            "index": torch.arange(n)}


def _one_step(d, b):
    d.train()
    d.zero_grad(set_to_none=True)
    _, losses = d.train_step(b, lambda loss: loss.backward())
    assert all(torch.isfinite(v) for v in losses.values())
    return losses


def test_inplace_activation_on_a_cut_as_student_and_teacher():
    torch.manual_seed(0)
    opts = {"student_options": {"blocks": ["a", "b"]}, "teacher_options": {"blocks": ["a", "b"]},
            "options": {"sdm": {"splits": [1, 2], "teacher_points": [1, 2]}}}
    s, t = InplaceNet(), InplaceNet(width=12)
    d = lakd.distiller(s, t, "lakd", image_size=SIZE, **opts)
    _one_step(d, _batch(4))
    assert all(p.grad is not None for p in d.student.parameters())
    assert list(d.student.state_dict()) == list(InplaceNet().state_dict())
    # the teacher's features are the cut values (BatchNorm outputs, negative somewhere), not the later ReLUs'
    seen = {}
    t.a[1].register_forward_hook(lambda m, i, o: seen.__setitem__("a", o.clone()))  # pieces call the leaves
    t.b[2].register_forward_hook(lambda m, i, o: seen.__setitem__("b", o.clone()))
    with torch.no_grad():
        _, feats = d.teacher(_batch(4)["image"], features=True)
    assert torch.equal(feats["stages"][0], seen["a"]) and torch.equal(feats["stages"][1], seen["b"])
    assert feats["stages"][1].min() < 0 and feats["last"].min() == 0  # the pooled map is the ReLU's output


def test_densenet121_lakd_step_and_teacher_targets_at_the_cut():
    torch.manual_seed(0)
    s = torchvision.models.densenet121(num_classes=10)
    t = torchvision.models.densenet121(num_classes=10)
    d = lakd.distiller(s, t, "lakd", image_size=SIZE)
    losses = _one_step(d, _batch(2))
    assert "ce" in losses
    seen = {}
    t.features.norm5.register_forward_hook(lambda m, i, o: seen.__setitem__("norm5", o.clone()))
    with torch.no_grad():
        _, feats = d.teacher(_batch(2)["image"], features=True)
    assert d.teacher.cut_names["blocks"][-1] == "features.norm5"
    assert torch.equal(feats["stages"][-1], seen["norm5"]) and feats["stages"][-1].min() < 0


@pytest.mark.parametrize("net", [InplaceNet])
def test_adapted_inplace_network_computes_what_the_network_does(net):
    torch.manual_seed(0)
    m = net().eval()
    a = adapt(m, input_size=SIZE, blocks=["a", "b"]).eval()
    x = _batch(2)["image"]
    with torch.no_grad():
        assert torch.equal(a(x), m(x))
