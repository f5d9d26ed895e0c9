"""The model zoo: mdistiller state-dict layouts, the shared teacher's accuracy, the feature interface of every
model, checkpoint errors and name suggestions."""
from __future__ import annotations

import os
import pickle
import re
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lakd.errors import LakdError
from lakd.models import FAMILY, create_model, list_models, load_model_from_checkpoint

# this machine's teacher and data (not part of the product): $LAKD_SHARED, set by .ci/run when present
SHARED = Path(os.environ.get("LAKD_SHARED") or "LAKD_SHARED-is-not-set")
TEACHER = SHARED / "teachers" / "cifar10_resnet56.pth"
TEST_BATCH = SHARED / "data" / "cifar-10-batches-py" / "test_batch"


@pytest.fixture(autouse=True)
def _one_thread(request):
    """Tests on tiny batches gain nothing from intra-op threads, and idle-spinning threads cost a lot of CPU
    on a busy machine; only the (slow) teacher evaluation keeps torch's default thread count."""
    if request.node.get_closest_marker("slow"):
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ----------------------------------------------------------------------------------------------------------
# Expected state dicts, written from mdistiller's architecture definitions (mdistiller/models/cifar/*.py),
# independently of lakd's model code: {key: shape}, in registration order.
# ----------------------------------------------------------------------------------------------------------
def _conv(sd, name, cout, cin, k, groups=1, bias=False):
    sd[f"{name}.weight"] = (cout, cin // groups, k, k)
    if bias:
        sd[f"{name}.bias"] = (cout,)


def _bn(sd, name, c):
    for p in ("weight", "bias", "running_mean", "running_var"):
        sd[f"{name}.{p}"] = (c,)
    sd[f"{name}.num_batches_tracked"] = ()


def _linear(sd, name, cout, cin):
    sd[f"{name}.weight"] = (cout, cin)
    sd[f"{name}.bias"] = (cout,)


def expected_resnet(depth, filters, nc):
    """mdistiller ResNet(depth, num_filters, 'basicblock'): 3x3 stem, 3 layers of n basic blocks."""
    n = (depth - 2) // 6
    sd: dict = {}
    _conv(sd, "conv1", filters[0], 3, 3)
    _bn(sd, "bn1", filters[0])
    inplanes = filters[0]
    for layer, (planes, stride) in enumerate(zip(filters[1:], (1, 2, 2)), start=1):
        for i in range(n):
            p = f"layer{layer}.{i}"
            cin = inplanes if i == 0 else planes
            _conv(sd, f"{p}.conv1", planes, cin, 3)
            _bn(sd, f"{p}.bn1", planes)
            _conv(sd, f"{p}.conv2", planes, planes, 3)
            _bn(sd, f"{p}.bn2", planes)
            if i == 0 and (stride != 1 or inplanes != planes):
                _conv(sd, f"{p}.downsample.0", planes, inplanes, 1)
                _bn(sd, f"{p}.downsample.1", planes)
        inplanes = planes
    _linear(sd, "fc", nc, filters[3])
    return sd


def expected_wrn(depth, k, nc):
    """mdistiller WideResNet: conv1, block{1,2,3}.layer.<i> pre-activation blocks, bn1, fc."""
    n = (depth - 4) // 6
    ch = [16, 16 * k, 32 * k, 64 * k]
    sd: dict = {}
    _conv(sd, "conv1", ch[0], 3, 3)
    for b in range(1, 4):
        for i in range(n):
            p = f"block{b}.layer.{i}"
            cin = ch[b - 1] if i == 0 else ch[b]
            _bn(sd, f"{p}.bn1", cin)
            _conv(sd, f"{p}.conv1", ch[b], cin, 3)
            _bn(sd, f"{p}.bn2", ch[b])
            _conv(sd, f"{p}.conv2", ch[b], ch[b], 3)
            if cin != ch[b]:
                _conv(sd, f"{p}.convShortcut", ch[b], cin, 1)
    _bn(sd, "bn1", ch[3])
    _linear(sd, "fc", nc, ch[3])
    return sd


def expected_vgg(cfg, nc):
    """mdistiller VGG(batch_norm=True): block<b> = [conv(bias), BN, ReLU]* without the last ReLU."""
    sd: dict = {}
    cin = 3
    for b, convs in enumerate(cfg):
        for j, v in enumerate(convs):
            _conv(sd, f"block{b}.{3 * j}", v, cin, 3, bias=True)
            _bn(sd, f"block{b}.{3 * j + 1}", v)
            cin = v
    _linear(sd, "classifier", nc, 512)
    return sd


def expected_mobile_half(nc):
    """mdistiller mobile_half = MobileNetV2(T=6, width_mult=0.5)."""
    sd: dict = {}
    w = 0.5
    cin = int(32 * w)
    _conv(sd, "conv1.0", cin, 3, 3)
    _bn(sd, "conv1.1", cin)
    for g, (t, c, n, _s) in enumerate([[1, 16, 1, 1], [6, 24, 2, 1], [6, 32, 3, 2], [6, 64, 4, 2],
                                       [6, 96, 3, 1], [6, 160, 3, 2], [6, 320, 1, 1]]):
        cout = int(c * w)
        for j in range(n):
            p, hid = f"blocks.{g}.{j}.conv", cin * t
            _conv(sd, f"{p}.0", hid, cin, 1)
            _bn(sd, f"{p}.1", hid)
            _conv(sd, f"{p}.3", hid, hid, 3, groups=hid)
            _bn(sd, f"{p}.4", hid)
            _conv(sd, f"{p}.6", cout, hid, 1)
            _bn(sd, f"{p}.7", cout)
            cin = cout
    _conv(sd, "conv2.0", 1280, cin, 1)
    _bn(sd, "conv2.1", 1280)
    _linear(sd, "classifier.0", nc, 1280)
    return sd


def expected_shufflev1(nc):
    """mdistiller ShuffleV1: out_planes 240/480/960, blocks 4/8/4, groups 3."""
    sd: dict = {}
    _conv(sd, "conv1", 24, 3, 1)
    _bn(sd, "bn1", 24)
    cin = 24
    for layer, (planes, n) in enumerate(zip((240, 480, 960), (4, 8, 4)), start=1):
        for i in range(n):
            p = f"layer{layer}.{i}"
            out = planes - cin if i == 0 else planes
            mid = out // 4
            _conv(sd, f"{p}.conv1", mid, cin, 1, groups=1 if cin == 24 else 3)
            _bn(sd, f"{p}.bn1", mid)
            _conv(sd, f"{p}.conv2", mid, mid, 3, groups=mid)
            _bn(sd, f"{p}.bn2", mid)
            _conv(sd, f"{p}.conv3", out, mid, 1, groups=3)
            _bn(sd, f"{p}.bn3", out)
            cin = planes
    _linear(sd, "linear", nc, 960)
    return sd


def expected_shufflev2(nc):
    """mdistiller ShuffleV2 (net_size 1): out_channels 116/232/464/1024, basic blocks 3/7/3."""
    sd: dict = {}
    _conv(sd, "conv1", 24, 3, 1)
    _bn(sd, "bn1", 24)
    cin = 24
    for layer, (c, n) in enumerate(zip((116, 232, 464), (3, 7, 3)), start=1):
        p, mid = f"layer{layer}.0", c // 2
        _conv(sd, f"{p}.conv1", cin, cin, 3, groups=cin)
        _bn(sd, f"{p}.bn1", cin)
        _conv(sd, f"{p}.conv2", mid, cin, 1)
        _bn(sd, f"{p}.bn2", mid)
        _conv(sd, f"{p}.conv3", mid, cin, 1)
        _bn(sd, f"{p}.bn3", mid)
        _conv(sd, f"{p}.conv4", mid, mid, 3, groups=mid)
        _bn(sd, f"{p}.bn4", mid)
        _conv(sd, f"{p}.conv5", mid, mid, 1)
        _bn(sd, f"{p}.bn5", mid)
        for i in range(1, n + 1):
            p, h = f"layer{layer}.{i}", c // 2
            _conv(sd, f"{p}.conv1", h, h, 1)
            _bn(sd, f"{p}.bn1", h)
            _conv(sd, f"{p}.conv2", h, h, 3, groups=h)
            _bn(sd, f"{p}.bn2", h)
            _conv(sd, f"{p}.conv3", h, h, 1)
            _bn(sd, f"{p}.bn3", h)
        cin = c
    _conv(sd, "conv2", 1024, 464, 1)
    _bn(sd, "bn2", 1024)
    _linear(sd, "linear", nc, 1024)
    return sd


VGG13_CFG = [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]]

# name -> (expected state dict at 100 classes, entry count worked out by hand)
LAYOUTS = {
    # 6 (stem) + 3 blocks x (12 + 6 downsample) + 2 (fc)
    "resnet8x4": (lambda: expected_resnet(8, [32, 64, 128, 256], 100), 62),
    # 6 + 3 x 18 + 12 x 12 + 2
    "resnet32x4": (lambda: expected_resnet(32, [32, 64, 128, 256], 100), 206),
    # 1 + 18 blocks x 12 + 3 shortcuts + 5 (bn1) + 2
    "wrn_40_2": (lambda: expected_wrn(40, 2, 100), 227),
    # 10 convs x (2 + 5) + 2
    "vgg13": (lambda: expected_vgg(VGG13_CFG, 100), 72),
    # 6 + 17 units x 18 + 6 (conv2) + 2
    "mobilenetv2": (lambda: expected_mobile_half(100), 320),
    # 6 + 16 units x 18 + 2
    "shufflev1": (lambda: expected_shufflev1(100), 296),
    # 6 + 3 down units x 30 + 13 units x 18 + 6 (conv2, bn2) + 2
    "shufflev2": (lambda: expected_shufflev2(100), 338),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_state_dict_layout_matches_mdistiller(name):
    make_expected, count = LAYOUTS[name]
    expected = make_expected()
    got = {k: tuple(v.shape) for k, v in create_model(name, 100).state_dict().items()}
    assert len(expected) == count
    assert len(got) == count
    missing = sorted(set(expected) - set(got))
    extra = sorted(set(got) - set(expected))
    assert not missing and not extra, (missing[:5], extra[:5])
    wrong = {k: (got[k], expected[k]) for k in expected if got[k] != expected[k]}
    assert not wrong
    assert list(got) == list(expected)  # same registration order as mdistiller too


def test_resnet56_layout_has_344_entries():
    assert len(expected_resnet(56, [16, 16, 32, 64], 100)) == 344
    got = {k: tuple(v.shape) for k, v in create_model("resnet56", 100).state_dict().items()}
    assert got == expected_resnet(56, [16, 16, 32, 64], 100)


def test_known_parameter_counts():
    # CRD / RepDistiller report 0.81M (MobileNetV2), 0.95M (ShuffleNetV1), 1.36M (ShuffleNetV2) at 100 classes
    known = {"mobilenetv2": 0.81, "shufflev1": 0.95, "shufflev2": 1.36, "resnet8x4": 1.23, "wrn_40_2": 2.26}
    for name, millions in known.items():
        n = sum(p.numel() for p in create_model(name, 100).parameters())
        assert round(n / 1e6, 2) == millions, (name, n)


# ----------------------------------------------------------------------------------------------------------
# The shared CIFAR-10 teacher
# ----------------------------------------------------------------------------------------------------------
def _load_test_batch():
    with open(TEST_BATCH, "rb") as f:
        d = pickle.load(f, encoding="latin1")
    x = torch.from_numpy(np.asarray(d["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)).float().div_(255)
    mean = torch.tensor((0.4914, 0.4822, 0.4465)).view(1, 3, 1, 1)
    std = torch.tensor((0.2470, 0.2435, 0.2616)).view(1, 3, 1, 1)
    return (x - mean) / std, torch.tensor(d["labels"], dtype=torch.int64)


@pytest.mark.slow
def test_shared_teacher_loads_and_reaches_its_stated_accuracy():
    if not TEACHER.exists() or not TEST_BATCH.exists():
        pytest.skip("no teacher or CIFAR-10 test batch under $LAKD_SHARED")
    ckpt = torch.load(TEACHER, map_location="cpu", weights_only=True)
    model = create_model("resnet56", 10, checkpoint=str(TEACHER)).eval()
    own = model.state_dict()
    assert set(ckpt["model"]) == set(own) and len(own) == 344
    assert all(torch.equal(own[k], v) for k, v in ckpt["model"].items())

    x, y = _load_test_batch()
    assert x.shape == (10000, 3, 32, 32)
    # channels-last runs oneDNN's convolutions, 2-3x faster on a CPU than the default layout
    model = model.to(memory_format=torch.channels_last)
    x = x.contiguous(memory_format=torch.channels_last)
    correct = 0
    t0 = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(x), 500):
            correct += (model(x[i:i + 500]).argmax(1) == y[i:i + 500]).sum().item()
    elapsed = time.perf_counter() - t0
    acc = 100.0 * correct / len(x)
    assert abs(acc - 85.71) <= 0.1, acc
    print(f"resnet56 teacher: {acc:.2f}% in {elapsed:.1f}s")


# ----------------------------------------------------------------------------------------------------------
# The feature interface, for every model of the zoo
# ----------------------------------------------------------------------------------------------------------
def _randomize_bn(model: nn.Module, gen: torch.Generator):
    """Non-trivial BN statistics and affine parameters, so eval-mode features are not just the init's."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.running_mean.copy_(0.1 * torch.randn(c, generator=gen))
            m.running_var.copy_(0.5 + torch.rand(c, generator=gen))
            m.weight.data.copy_(0.5 + torch.rand(c, generator=gen))
            m.bias.data.copy_(0.1 * torch.randn(c, generator=gen))


def _check_preact(name, model, post, pre, k):
    if name.startswith(("resnet", "vgg", "shufflev1")):
        assert torch.allclose(F.relu(pre), post, atol=1e-6)
    elif name == "shufflev2":
        # as in mdistiller, the pre-activation is taken before the unit's channel shuffle (2 groups)
        n, c, h, w = pre.shape
        shuffled = F.relu(pre).reshape(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)
        assert torch.allclose(shuffled, post, atol=1e-6)
    elif name == "mobilenetv2":
        # linear bottlenecks: the unit's output has no activation, so there is no pre-activation to give
        assert pre is None and not model.has_preact
        with pytest.raises(LakdError, match="no pre-activation"):
            model.block_forward(model.stage_ends[k] - 1, torch.zeros(1, 1), preact=True)
    elif name.startswith("wrn"):
        # mdistiller's convention: the BN that reads the stage output next
        e = model.stage_ends[k]
        bn = model._blocks[e].bn1 if e < model.num_blocks else model.bn1
        assert torch.allclose(pre, bn(post), atol=1e-6)
    else:
        raise AssertionError(f"no pre-activation rule for {name}")


@pytest.mark.parametrize("name", list_models())
def test_feature_interface(name, block_parameters):
    with torch.no_grad():
        _check_feature_interface(name, block_parameters)


def _check_feature_interface(name, block_parameters):
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    imagenet = FAMILY[name] == "imagenet"
    size = 64 if imagenet else 32
    model = create_model(name, 7)
    _randomize_bn(model, gen)
    model.eval()
    x = torch.randn(2, 3, size, size, generator=gen)

    logits = model(x)
    assert logits.shape == (2, 7)
    if not model.has_preact:  # MobileNetV2: no pre-activation, and asking for one is a clear error
        with pytest.raises(LakdError, match="no pre-activation"):
            model(x, features=True, preact=True)
    out, feats = model(x, features=True, preact=model.has_preact, blocks=True)
    assert torch.allclose(out, logits, atol=1e-5, rtol=1e-5)

    n, ends = model.num_blocks, model.stage_ends
    assert ends == sorted(set(ends)) and ends[-1] == n and ends[0] >= 1
    assert len(feats["blocks"]) == n
    assert len(feats["stages"]) == len(ends) == len(feats.get("stages_preact", ends))
    for k, e in enumerate(ends):
        assert feats["stages"][k] is feats["blocks"][e - 1]
        if model.has_preact:
            assert feats["stages_preact"][k].shape == feats["stages"][k].shape
        _check_preact(name, model, feats["stages"][k], feats["stages_preact"][k] if model.has_preact else None, k)

    # the head: pooled embedding of the last map, then the classifier
    assert isinstance(model.classifier, nn.Linear) and model.classifier.out_features == 7
    assert torch.allclose(feats["embedding"], feats["last"].mean((2, 3)), atol=1e-5)
    assert torch.allclose(model.classifier(feats["embedding"]), logits, atol=1e-5, rtol=1e-5)

    # shapes reported by feature_info
    info = model.feature_info(size) if imagenet else model.feature_info()
    shape = lambda t: (t.shape[1], t.shape[2], t.shape[3])  # noqa: E731
    astuple = lambda s: (s.channels, s.height, s.width)  # noqa: E731
    assert astuple(info["stem"]) == shape(feats["stem"])
    assert [astuple(s) for s in info["blocks"]] == [shape(b) for b in feats["blocks"]]
    assert [astuple(s) for s in info["stages"]] == [shape(s) for s in feats["stages"]]
    assert astuple(info["last"]) == shape(feats["last"])
    assert info["embedding_dim"] == feats["embedding"].shape[1]
    assert info["num_classes"] == 7
    assert not model.training  # feature_info leaves the mode alone

    # running the pieces by hand, whole and cut in two (as SDM does)
    h0 = model.stem_forward(x)
    assert torch.allclose(model.head_forward(model.run_blocks(h0, 0, n)), logits, atol=1e-5, rtol=1e-5)
    cut = ends[0]
    h = model.run_blocks(model.run_blocks(h0, 0, cut), cut, n)
    assert torch.allclose(model.head_forward(h), logits, atol=1e-5, rtol=1e-5)

    # block_parameters partitions the parameters: stem, each block and head, no overlap, nothing left out
    groups = [block_parameters(model, 0, 0, stem=True)] + [block_parameters(model, i, i + 1) for i in range(n)]
    groups.append(block_parameters(model, n, n, head=True))
    ids = [id(p) for g in groups for p in g]
    all_ids = {id(p) for p in model.parameters()}
    assert len(ids) == len(set(ids)) == len(all_ids)
    assert set(ids) == all_ids
    assert all(len(g) > 0 for g in groups[1:])  # every block owns parameters
    whole = block_parameters(model, 0, n, stem=True, head=True)
    assert {id(p) for p in whole} == all_ids


def test_features_in_train_mode_match_plain_forward():
    model = create_model("shufflev2", 10).train()
    x = torch.randn(4, 3, 32, 32)
    torch.manual_seed(0)
    a = model(x)
    b, _ = model(x, features=True, preact=True)
    assert torch.allclose(a, b, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------
# Checkpoint errors and accepted layouts
# ----------------------------------------------------------------------------------------------------------
def _error(fn) -> str:
    with pytest.raises(LakdError) as ei:
        fn()
    msg = str(ei.value)
    assert "\n" not in msg and msg
    return msg


def test_missing_checkpoint(tmp_path):
    path = tmp_path / "nope.pth"
    msg = _error(lambda: create_model("resnet20", 10, checkpoint=str(path)))
    assert "does not exist" in msg and "nope.pth" in msg


def test_truncated_checkpoint(tmp_path):
    path = tmp_path / "cut.pth"
    sd = create_model("resnet20", 10).state_dict()
    torch.save({"model": sd, "arch": "resnet20", "num_classes": 10}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    msg = _error(lambda: create_model("resnet20", 10, checkpoint=str(path)))
    assert "corrupt or truncated" in msg and "cut.pth" in msg


def test_checkpoint_of_another_architecture(tmp_path):
    sd = create_model("resnet20", 10).state_dict()
    tagged, bare = tmp_path / "r20.pth", tmp_path / "r20_bare.pth"
    torch.save({"model": sd, "arch": "resnet20", "num_classes": 10}, tagged)
    torch.save(sd, bare)
    msg = _error(lambda: create_model("resnet32", 10, checkpoint=str(tagged)))
    assert "resnet20" in msg and "resnet32" in msg
    msg = _error(lambda: create_model("resnet32", 10, checkpoint=str(bare)))
    # resnet32 has 2 more blocks per stage: 6 x 10 = 60 missing weights (6 x 12 = 72 with the BN counters,
    # which load_weights fills in because torchvision files lack them)
    assert "does not fit resnet32" in msg and "60 missing" in msg and "different architecture" in msg  # BN counters are filled in, not reported


def test_checkpoint_with_other_number_of_classes(tmp_path):
    path = tmp_path / "c100.pth"
    sd = create_model("resnet8", 100).state_dict()
    torch.save({"model": sd, "arch": "resnet8", "num_classes": 100}, path)
    msg = _error(lambda: create_model("resnet8", 10, checkpoint=str(path)))
    assert "100 classes" in msg and "has 10" in msg and "fc." in msg


def test_checkpoint_that_is_not_a_state_dict(tmp_path):
    path = tmp_path / "list.pth"
    torch.save([torch.zeros(2)], path)
    assert "holds a list" in _error(lambda: create_model("resnet8", 10, checkpoint=str(path)))
    path = tmp_path / "meta.pth"
    torch.save({"epoch": 3, "lr": 0.1}, path)
    assert "no model weights" in _error(lambda: create_model("resnet8", 10, checkpoint=str(path)))
    assert "is a folder" in _error(lambda: create_model("resnet8", 10, checkpoint=str(tmp_path)))


@pytest.mark.parametrize("layout", ["ddp", "bare", "model", "net"])
def test_accepted_checkpoint_layouts(tmp_path, layout):
    torch.manual_seed(0)
    src = create_model("resnet8", 10)
    sd = src.state_dict()
    obj = {
        "ddp": {"state_dict": {f"module.{k}": v for k, v in sd.items()}},
        "bare": dict(sd),
        "model": {"model": sd, "epoch": 240},
        "net": {"net": sd, "acc": 70.0},  # RepDistiller's teacher files
    }[layout]
    path = tmp_path / f"{layout}.pth"
    torch.save(obj, path)
    torch.manual_seed(1)
    dst = create_model("resnet8", 10, checkpoint=str(path))
    got = dst.state_dict()
    assert all(torch.equal(got[k], v) for k, v in sd.items())


def test_load_model_from_checkpoint(tmp_path):
    src = create_model("shufflev1", 100)
    path = tmp_path / "s.pth"
    torch.save({"model": src.state_dict(), "arch": "shufflev1", "num_classes": 100}, path)
    model, ckpt = load_model_from_checkpoint(str(path))
    assert not model.training and ckpt["arch"] == "shufflev1"
    assert model.classifier.out_features == 100
    x = torch.randn(1, 3, 32, 32)
    assert torch.allclose(model(x), src.eval()(x), atol=1e-6)
    torch.save({"model": src.state_dict()}, path)
    assert "does not record its architecture" in _error(lambda: load_model_from_checkpoint(str(path)))


# ----------------------------------------------------------------------------------------------------------
# Names
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("typo, meant", [("resnet2O", "resnet20"), ("resnt56", "resnet56"),
                                         ("shufflenetv2", "shufflev2"), ("mobilenet_v2", "mobilenetv2")])
def test_unknown_model_name_suggests_the_close_one(typo, meant):
    msg = _error(lambda: create_model(typo, 10))
    assert repr(typo) in msg
    m = re.search(r"did you mean: ([^?]*)\?", msg)
    assert m and meant in m.group(1).split(", "), msg


def test_names_are_case_insensitive_and_listed():
    names = list_models()
    for n in ("mobilenetv2", "shufflev1", "shufflev2", "resnet56", "resnet8x4", "wrn_40_2", "vgg13",
              "resnet18"):
        assert n in names
    assert FAMILY["mobilenetv2"] == FAMILY["shufflev1"] == FAMILY["shufflev2"] == "cifar"
    assert type(create_model("ShuffleV1", 10)) is type(create_model("shufflev1", 10))
    assert isinstance(create_model("MobileNetV2", 10).classifier, nn.Linear)


def test_checkpoint_with_python_objects_names_them_and_loads_only_when_trusted(tmp_path, monkeypatch):
    """torchdistill stores an argparse.Namespace next to the weights: weights_only refuses it; the error names
    the refused object and the opt-in, and the opt-in covers only the files it lists."""
    import argparse

    sd = create_model("resnet8", 10).state_dict()
    path = tmp_path / "torchdistill.pt"
    torch.save({"model": sd, "args": argparse.Namespace(lr=0.1)}, path)
    monkeypatch.delenv("LAKD_TRUST_CHECKPOINTS", raising=False)
    with pytest.raises(LakdError) as e:
        create_model("resnet8", 10, checkpoint=str(path))
    msg = str(e.value)
    assert "argparse.Namespace" in msg and f"LAKD_TRUST_CHECKPOINTS={path}" in msg and "corrupt" not in msg
    assert "\n" not in msg
    monkeypatch.setenv("LAKD_TRUST_CHECKPOINTS", str(tmp_path / "other.pt"))
    with pytest.raises(LakdError, match="argparse.Namespace"):
        create_model("resnet8", 10, checkpoint=str(path))
    monkeypatch.setenv("LAKD_TRUST_CHECKPOINTS", f"/nowhere:{tmp_path}")  # a folder above the file
    model = create_model("resnet8", 10, checkpoint=str(path))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in sd.items())


def test_untrusted_code_in_a_checkpoint_never_runs(tmp_path, monkeypatch):
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / "evil.pt"
    torch.save({"model": {}, "x": Evil()}, path)
    monkeypatch.delenv("LAKD_TRUST_CHECKPOINTS", raising=False)
    with pytest.raises(LakdError, match="refuses: io.open"):
        create_model("resnet8", 10, checkpoint=str(path))
    assert not marker.exists()
