"""Folding a frozen teacher's BatchNorms into its convolutions (lakd/models/fold.py, ``train.fold_teacher_bn``)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from lakd.config import load_config
from lakd.engine.trainer import Trainer
from lakd.errors import LakdError
from lakd.models import adapt, create_model
from lakd.models.fold import fold_batchnorm

pytestmark = pytest.mark.usefixtures("one_thread")

_BN = nn.modules.batchnorm._BatchNorm


def _frozen(model: nn.Module, seed: int = 0) -> nn.Module:
    """Eval mode, frozen, with BatchNorm statistics and affine parameters far from the identity."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, _BN):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(n, generator=g) * 0.4 - 0.2)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def _unwrap(v):
    return v if isinstance(v, torch.Tensor) else v.values[0]


def _assert_same_function(ref, folded, x):
    preact = ref.missing("preact") is None
    with torch.no_grad():
        a, b = ref(x, features=True, preact=preact), folded(x, features=True, preact=preact)
    assert torch.allclose(a[0], b[0], rtol=1e-4, atol=1e-4 * a[0].abs().max().item())
    for key in ("stages", "stages_preact"):
        for u, v in zip(a[1].get(key, []), b[1].get(key, []), strict=True):
            u, v = _unwrap(u), _unwrap(v)
            assert torch.allclose(u, v, rtol=1e-4, atol=1e-4 * u.abs().max().item()), key


@pytest.mark.parametrize("arch, folded, left", [
    ("resnet20", 21, 0), ("vgg8", 5, 0), ("mobilenetv2", 53, 0), ("shufflev2", 56, 0),
    ("wrn_16_2", 6, 7),  # pre-activation blocks: a BatchNorm before a convolution has nothing to fold into
])
def test_zoo_teachers_fold_to_the_same_function(arch, folded, left):
    ref = _frozen(create_model(arch, 10))
    model = copy.deepcopy(ref)
    assert fold_batchnorm(model, torch.zeros(2, 3, 32, 32)) == folded
    assert sum(isinstance(m, _BN) for m in model.modules()) == left
    assert not any(p.requires_grad for p in model.parameters())
    _assert_same_function(ref, model, torch.randn(4, 3, 32, 32))


def test_adapted_torchvision_teacher_folds_in_its_traced_pieces():
    torchvision = pytest.importorskip("torchvision")
    ref = _frozen(adapt(torchvision.models.resnet18(num_classes=10), input_size=64))
    model = copy.deepcopy(ref)
    assert fold_batchnorm(model, torch.zeros(2, 3, 64, 64)) == 20
    assert sum(isinstance(m, _BN) for m in model.modules()) == 0
    _assert_same_function(ref, model, torch.randn(3, 3, 64, 64))


class _Tricky(nn.Module):
    """Three conv -> BN pairs, of which only the first may fold: the second convolution's output is used twice,
    the third's is rewritten in place before its BatchNorm."""

    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c2, self.b2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c3, self.b3 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        a = torch.relu(self.b1(self.c1(x)))
        y = self.c2(a)
        z = torch.relu(self.b2(y) + y)
        w = self.c3(z)
        w.mul_(2.0)
        w = torch.relu(self.b3(w))
        return self.fc(w.mean((2, 3)))


def test_only_pairs_that_compute_the_same_fold():
    ref = _frozen(adapt(_Tricky(), stem="relu", blocks=["relu_1", "relu_2"], input_size=16))
    model = copy.deepcopy(ref)
    assert fold_batchnorm(model, torch.zeros(2, 3, 16, 16)) == 1
    assert isinstance(model.b1, nn.Identity) and isinstance(model.b2, nn.BatchNorm2d)
    assert isinstance(model.b3, nn.BatchNorm2d)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(ref(x), model(x), rtol=1e-4, atol=1e-5)


def test_a_convolution_returned_as_a_feature_is_not_folded():
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten(), nn.Linear(8, 10))
    model = _frozen(adapt(net, blocks=["0"], input_size=16))  # the conv's output is the first block's feature
    assert fold_batchnorm(model, torch.zeros(2, 3, 16, 16)) == 0


def test_a_trainable_network_is_refused():
    with pytest.raises(LakdError, match="frozen"):
        fold_batchnorm(create_model("resnet8", 10).eval(), torch.zeros(2, 3, 32, 32))


@pytest.mark.parametrize("method", ["kd", "ofd", "lakd"])
def test_training_with_a_folded_teacher_matches_the_unfolded_one(digits_overrides, method):
    runs = {}
    for fold in (True, False):
        cfg = load_config(None, digits_overrides(method, ["solver.max_steps_per_epoch=2", "sdm.splits=[1,2,3]",
                                                          f"train.fold_teacher_bn={str(fold).lower()}",
                                                          f"experiment={method}_{fold}"]))
        tr = Trainer(cfg, quiet=True)
        runs[fold] = (tr, tr.fit())
    (a, _), (b, _) = runs[True], runs[False]
    assert sum(isinstance(m, _BN) for m in a.distiller.teacher.modules()) == 0
    assert sum(isinstance(m, _BN) for m in b.distiller.teacher.modules()) == 9
    la, lb = a.history[0]["losses"], b.history[0]["losses"]
    assert la.keys() == lb.keys()
    for k in la:
        assert la[k] == pytest.approx(lb[k], rel=1e-4, abs=1e-5), k
    for (n, p), q in zip(a.distiller.student.named_parameters(), b.distiller.student.parameters()):
        assert torch.allclose(p, q, atol=1e-5), n
