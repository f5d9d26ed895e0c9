"""Any nn.Module behind the feature interface: equality with the zoo, exact LAKD gradient isolation on
torchvision / timm / user networks (a skip across a cut included), every method on an adapted pair, checkpoints,
names, cut listing and the one-line errors. CPU, 32 px, batches of 4."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import lakd
from lakd.distillers import DISTILLERS
from lakd.errors import LakdError
from lakd.models import adapt, create_model, cut_candidates
from lakd.models.base import FeatureShape as FS

SIZE = 32


def batch(n=4, classes=10, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.randn(n, 3, SIZE, SIZE, generator=g), "target": torch.randint(0, classes, (n,), generator=g),
            "index": torch.arange(n)}


class SkipNet(nn.Module):
    """A user network whose stem output skips over block ``a`` into block ``b``'s sum (a skip across a cut).
    ``bn_a`` adds a BatchNorm to ``a`` and ``dropout`` a Dropout to ``b`` (tests/test_recompute.py: recomputation
    must leave BatchNorm statistics alone and draw the same dropout mask)."""

    def __init__(self, num_classes=10, width=8, bn_a=False, dropout=0.0):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.a = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), *([nn.BatchNorm2d(width)] if bn_a else []),
                               nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width),
                               *([nn.Dropout(dropout)] if dropout else []))
        self.c = nn.Sequential(nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.ReLU())
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        h0 = self.stem(x)
        h1 = self.a(h0)
        h2 = F.relu(self.b(h1) + h0)  # h0 crosses the cut after `a`
        h3 = self.c(h2)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(h3, 1), 1))


class ModeNet(nn.Module):
    """A network whose traced graph depends on ``self.training`` (as torchvision's GoogLeNet or a hand-written
    stochastic depth does): the adapter keeps one split per mode."""

    def __init__(self, num_classes=10, width=8):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU())
        self.a = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.ReLU())
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        h = self.a(self.stem(x))
        if self.training:
            h = 0.5 * h + 0.25
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.b(h), 1), 1))


def assert_isolated(d, b, block_parameters):
    """Each local module's losses reach its own parameters and not one element of an earlier module's."""

    def module_params(d, k):
        start = 0 if k == 0 else d.splits[k - 1]
        return block_parameters(d.student, start, d.splits[k], stem=k == 0, head=k == len(d.splits) - 1) + \
            list(d.connectors[k].parameters())

    n = len(d.splits)
    assert n >= 2
    for k in range(n):
        d.zero_grad(set_to_none=True)
        _, losses = d.forward_train(**b)
        own = [v for name, v in losses.items() if name == f"feat{k + 1}" or (k == n - 1 and name in ("ce", "att"))]
        sum(own).backward()
        for j in range(k + 1):
            g = [p.grad for p in module_params(d, j)]
            if j < k:
                assert all(x is None or torch.count_nonzero(x) == 0 for x in g), (k, j)
            else:
                assert any(x is not None and torch.count_nonzero(x) > 0 for x in g), (k, j)


# ----- equality with the zoo -------------------------------------------------------------------------------
def test_adapted_torchvision_resnet18_equals_zoo_resnet18():
    torch.manual_seed(0)
    tv_s, tv_t = torchvision.models.resnet18(num_classes=10), torchvision.models.resnet18(num_classes=10)
    zoo_s, zoo_t = create_model("resnet18", 10), create_model("resnet18", 10)
    zoo_s.load_state_dict(tv_s.state_dict())
    zoo_t.load_state_dict(tv_t.state_dict())
    a_s, a_t = adapt(tv_s, input_size=SIZE), adapt(tv_t, input_size=SIZE)
    assert a_s.cut_names["stem"] == "maxpool" and a_s.num_blocks == 8 and a_s.stage_ends == zoo_s.stage_ends
    b = batch()
    a_s.eval()
    zoo_s.eval()
    assert torch.equal(a_s(b["image"]), zoo_s(b["image"]))
    assert a_s.feature_info() == zoo_s.feature_info(SIZE)
    opts = {"lakd": {"att_weight": 5.0}}
    torch.manual_seed(1)
    d_zoo = lakd.distiller(zoo_s, zoo_t, "lakd", image_size=SIZE, options=opts)
    torch.manual_seed(1)
    d_ad = lakd.distiller(a_s, a_t, "lakd", image_size=SIZE, options=opts)
    assert d_ad.splits == d_zoo.splits and d_ad.teacher_points == d_zoo.teacher_points
    out = {}
    for name, d in (("zoo", d_zoo), ("adapted", d_ad)):
        d.zero_grad(set_to_none=True)
        logits, losses = d.train_step(b, lambda loss: loss.backward())
        out[name] = (logits, losses, {n: p.grad.clone() for n, p in d.named_trainable_parameters()})
    (lz, losz, gz), (la, losa, ga) = out["zoo"], out["adapted"]
    assert torch.allclose(lz, la, atol=1e-6)
    assert losz.keys() == losa.keys() and len(losz) == 6
    for k in losz:
        assert torch.allclose(losz[k], losa[k], rtol=1e-5, atol=1e-7), k
    assert gz.keys() == ga.keys()
    for n in gz:
        assert torch.allclose(gz[n], ga[n], rtol=1e-4, atol=1e-6), n


def two_steps(d):
    """Two SGD steps of a distiller on fixed batches; logits of the right shape and finite losses each time."""
    # a method with its own optimizer (DOT) builds it, as docs/api.md tells users of their own loop
    opt = (d.build_optimizer(d.trainable_parameters(), {"lr": 0.01, "momentum": 0.9, "weight_decay": 0.0})
           or torch.optim.SGD(d.trainable_parameters(), lr=0.01, momentum=0.9))
    for step in range(2):
        opt.zero_grad(set_to_none=True)
        b = batch(seed=step)
        if d.views(d.cfg):  # a method trained on extra views (CRLD's strong view): random stand-ins
            b["views"] = d.random_views(b["image"])
        logits, losses = d.train_step(b, lambda loss, **kw: loss.backward(**kw))
        opt.step()
        assert logits.shape == (4, 10) and all(torch.isfinite(v) for v in losses.values())


# ----- exact gradient isolation between LAKD modules ----------------------------------------------------------
def test_isolation_on_adapted_mobilenet_v3_small(block_parameters):
    torch.manual_seed(0)
    s = torchvision.models.mobilenet_v3_small(num_classes=10)
    t = torchvision.models.mobilenet_v3_small(num_classes=10)
    d = lakd.distiller(s, t, "lakd", image_size=SIZE)
    assert d.student.cut_names["stem"] == "features.0" and len(d.splits) == 4
    assert not d.student._split.cam_fast  # CAMs go through the hidden Linear + Hardswish per position
    assert_isolated(d, batch(), block_parameters)


def test_isolation_on_adapted_timm_model(block_parameters):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    s = timm.create_model("resnet18", pretrained=False, num_classes=10)
    t = timm.create_model("resnet18", pretrained=False, num_classes=10)
    d = lakd.distiller(s, t, "lakd", image_size=SIZE)
    # cut after every residual block inside timm's feature stages, as torchvision ResNets are (stem: maxpool);
    # LAKD's local modules are still the four stages
    assert d.student.cut_names == {"stem": "maxpool", "blocks": [f"layer{i}.{j}" for i in range(1, 5) for j in (0, 1)],
                                   "classifier": None}
    assert d.splits == [2, 4, 6, 8] and d.student.stage_ends == [2, 4, 6, 8]
    assert_isolated(d, batch(), block_parameters)


def test_isolation_with_a_skip_across_a_cut_and_local_equals_joint(block_parameters):
    torch.manual_seed(0)
    d = lakd.distiller(SkipNet(), SkipNet(width=12), "lakd", image_size=SIZE,
                       student_options={"blocks": ["a", "b", "c"]}, teacher_options={"blocks": ["a", "b", "c"]},
                       options={"sdm": {"splits": [1, 3], "teacher_points": [1, 3]}})
    # the stem output is carried past the cut after `a` into `b`
    carried = d.student._split.pieces_spec[2][0]
    assert len(carried) == 2
    b = batch()
    assert_isolated(d, b, block_parameters)
    joint = copy.deepcopy(d)
    joint.local_backward = False
    for m in (d, joint):
        m.zero_grad(set_to_none=True)
        m.train_step(b, lambda loss: loss.backward())
    ga, gb = dict(d.named_trainable_parameters()), dict(joint.named_trainable_parameters())
    for n in ga:
        assert torch.allclose(ga[n].grad, gb[n].grad, atol=1e-6), n
    # without the detach the last module's loss reaches the stem through the skip
    nd = lakd.distiller(SkipNet(), SkipNet(width=12), "lakd", image_size=SIZE,
                        student_options={"blocks": ["a", "b", "c"]}, teacher_options={"blocks": ["a", "b", "c"]},
                        options={"sdm": {"splits": [1, 3], "teacher_points": [1, 3], "detach": False}})
    _, losses = nd.forward_train(**b)
    losses["ce"].backward()
    assert torch.count_nonzero(nd.student.stem[0].weight.grad) > 0


# ----- every method on an adapted pair, checkpoints ---------------------------------------------------------------
@pytest.fixture(scope="module")
def pair():
    """Adapted once (tracing is the slow part); each test trains deep copies."""
    torch.manual_seed(0)
    return (adapt(torchvision.models.mobilenet_v3_small(num_classes=10), input_size=SIZE),
            adapt(torchvision.models.resnet18(num_classes=10), input_size=SIZE))


@pytest.mark.parametrize("method", DISTILLERS.names())
def test_every_method_two_steps_on_an_adapted_pair(pair, method):
    s, t = copy.deepcopy(pair[0]), copy.deepcopy(pair[1])
    if method == "deit":  # a distillation token needs a distilled student (tests/test_method_deit.py)
        with pytest.raises(LakdError, match="has one classifier head"):
            lakd.distiller(s, t, method, image_size=SIZE)
        return
    if method == "fsp":  # FSP needs equal channels in both nets (it refuses this pair): a copy of the student
        t = copy.deepcopy(pair[0])
    d = lakd.distiller(s, t, method, image_size=SIZE, num_data=8,
                       options={"crd": {"nce_k": 4}} if method == "crd" else None)
    before = {k: v.clone() for k, v in s.state_dict().items()}
    two_steps(d)
    # the network's own modules were trained in place; its checkpoint loads into a plain torchvision model
    assert any(not torch.equal(before[k], v) for k, v in s._root.state_dict().items())
    assert list(d.student.state_dict()) == list(before)
    plain = torchvision.models.mobilenet_v3_small(num_classes=10)
    plain.load_state_dict(d.student.state_dict(), strict=True)
    x = batch()["image"]
    d.eval()
    plain.eval()
    assert torch.equal(plain(x), d(x))


def test_names_and_checkpoint_files(tmp_path):
    torch.manual_seed(0)
    plain = torchvision.models.resnet18(num_classes=10)
    path = tmp_path / "resnet18.pth"
    torch.save(plain.state_dict(), path)
    m = create_model("torchvision:resnet18", 10, checkpoint=str(path), input_size=SIZE)
    m.eval()
    plain.eval()
    x = batch()["image"]
    assert torch.equal(m(x), plain(x))
    timm = pytest.importorskip("timm")
    assert timm is not None
    t = create_model("timm:resnet18", 10, input_size=SIZE, blocks=["layer2", "layer4"])
    assert t.num_blocks == 2 and t.stage_ends == [1, 2]
    u = create_model("module:tests.test_adapter:SkipNet", 7, kwargs={"width": 4}, blocks=["a", "c"])
    assert u.feature_info()["num_classes"] == 7 and u.feature_info()["blocks"][1].channels == 8


def test_cut_candidates_list_modules_with_shapes():
    rows = dict(cut_candidates(torchvision.models.resnet18(num_classes=10), input_size=SIZE))
    assert rows["layer1.0"] == (1, 64, 8, 8) and rows["layer4"] == (1, 512, 1, 1) and rows["fc"] == (1, 10)


# ----- B x H x W x C networks (Swin-style) --------------------------------------------------------------------------
class TokenNet(nn.Module):
    """A Swin-shaped user network: a patch embedding to B x H x W x C, blocks of LayerNorm + MLP on the last dim,
    a 2x2 patch merge, a final norm, a mean over (H, W) and a Linear head (``hidden``: a hidden Linear between
    pooling and classifier, pooled with keepdim)."""

    def __init__(self, dim=8, num_classes=10, hidden=False):
        super().__init__()
        self.hidden_head = hidden
        self.embed = nn.Conv2d(3, dim, 4, stride=4)
        self.s1 = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.merge = nn.Linear(4 * dim, 2 * dim)
        self.s2 = nn.Sequential(nn.LayerNorm(2 * dim), nn.Linear(2 * dim, 2 * dim))
        self.norm = nn.LayerNorm(2 * dim)
        self.hidden = nn.Linear(2 * dim, 12) if hidden else None
        self.fc = nn.Linear(12 if hidden else 2 * dim, num_classes)

    def forward(self, x):
        x = self.embed(x).permute(0, 2, 3, 1)  # B x H x W x C from here on
        x = x + self.s1(x)
        b, h, w, c = x.shape
        x = x.reshape(b, h // 2, 2, w // 2, 2, c).permute(0, 1, 3, 4, 2, 5).reshape(b, h // 2, w // 2, 4 * c)
        x = self.merge(x)
        x = x + self.s2(x)
        x = self.norm(x)
        if self.hidden_head:
            return self.fc(F.gelu(self.hidden(x.mean(dim=(1, 2), keepdim=True).flatten(1))))
        return self.fc(x.mean((1, 2)))


def test_nhwc_network_features_are_handed_out_as_nchw_maps():
    torch.manual_seed(0)
    net = TokenNet()
    a = adapt(net, input_size=SIZE, blocks=["s1", "s2"])
    info = a.feature_info()
    assert info["stem"] == FS(3, SIZE, SIZE)  # the input image stays B x C x H x W
    assert info["blocks"] == [FS(8, 8, 8), FS(16, 4, 4)] and info["last"] == FS(16, 4, 4) and a.stage_ends == [1, 2]
    seen = {}
    for name in ("s1", "s2", "norm"):
        getattr(net, name).register_forward_hook(lambda m, i, o, name=name: seen.__setitem__(name, o))
    x = batch()["image"]
    a.eval()
    net.eval()
    with torch.no_grad():
        logits, feats = a(x, features=True)
        ref = net(x)
    assert torch.equal(logits, ref)
    (b1, b2), last = feats["stages"], feats["last"]
    # a cut named by a module path is that module's output (here before the residual sum), permuted
    assert torch.equal(b1, seen["s1"].permute(0, 3, 1, 2)) and torch.equal(b2, seen["s2"].permute(0, 3, 1, 2))
    assert torch.equal(last, seen["norm"].permute(0, 3, 1, 2)) and b2.shape == (4, 16, 4, 4)
    # class activation maps: the classifier at every position of the (permuted) map; their mean is the logits
    cams = a.class_maps(last)
    assert cams.shape == (4, 10, 4, 4)
    assert torch.allclose(cams.mean((2, 3)) + net.fc.bias, ref, atol=1e-5)
    # with a hidden Linear + GELU after a keepdim pooling, the head runs at each position with the GELU's gain
    # frozen at the pooled vector (gelu(z) / z there): the maps are linear in the position's features and their
    # mean plus the head's offset is the logits
    torch.manual_seed(0)
    hnet = TokenNet(hidden=True).eval()
    ha = adapt(hnet, input_size=SIZE, blocks=["s1", "s2"]).eval()
    with torch.no_grad():
        hlogits, hf = ha(x, features=True)
        hc = ha.class_maps(hf["last"])
        z = hnet.hidden(hf["last"].mean((2, 3)))
        gain = F.gelu(z) / z
        v = hf["last"][:, :, 1, 2]  # one position, by hand
        assert torch.allclose(hc[:, :, 1, 2], (gain * (v @ hnet.hidden.weight.T)) @ hnet.fc.weight.T, atol=1e-5)
        offset = (gain * hnet.hidden.bias) @ hnet.fc.weight.T + hnet.fc.bias
        assert torch.allclose(ha.class_map_offset(hf["last"]), offset, atol=1e-6)
        assert torch.allclose(hc.mean((2, 3)) + offset, hlogits, atol=1e-5)


@pytest.mark.parametrize("method", ["lakd", "at", "catkd", "fitnet", "crd"])
def test_nhwc_pair_trains_and_lakd_isolates(method, block_parameters):
    torch.manual_seed(0)
    opts = {"student_options": {"blocks": ["s1", "s2"]}, "teacher_options": {"blocks": ["s1", "s2"]}}
    if method == "lakd":
        opts["options"] = {"sdm": {"splits": [1, 2], "teacher_points": [1, 2]}}
    if method == "crd":
        opts["options"], opts["num_data"] = {"crd": {"nce_k": 4}}, 8
    d = lakd.distiller(TokenNet(), TokenNet(dim=12), method, image_size=SIZE, **opts)
    if method == "lakd":
        assert_isolated(d, batch(), block_parameters)
    before = copy.deepcopy(d.student.state_dict())
    two_steps(d)
    assert any(not torch.equal(before[k], v) for k, v in d.student.state_dict().items())
    if method == "lakd":  # per-block recomputation carries the layout through the checkpoint: same gradients
        grads = []
        for recompute in (False, True):
            torch.manual_seed(0)
            o = copy.deepcopy(opts)
            o["options"]["sdm"]["recompute"] = recompute
            r = lakd.distiller(TokenNet(), TokenNet(dim=12), "lakd", image_size=SIZE, **o)
            r.train_step(batch(), lambda loss: loss.backward())
            grads.append({n: p.grad for n, p in r.named_trainable_parameters()})
        assert all(torch.equal(grads[0][n], grads[1][n]) for n in grads[0])
    if method == "lakd":  # OFD's margin needs a BatchNorm before each teacher stage's output: named refusal
        with pytest.raises(LakdError, match="OFD needs a BatchNorm .*; TokenNet has none at block 1"):
            lakd.distiller(TokenNet(), TokenNet(dim=12), "ofd", image_size=SIZE, **opts)


def test_timm_swin_is_cut_at_its_stages():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    m = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, num_classes=10, embed_dim=8,
                          depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1))
    a = adapt(m, input_size=224)
    # one block per stage here (depths 1): the patch merging of stages 1-3 and the block are cuts of their own
    assert a.cut_names["blocks"] == ["layers.0", "layers.1.downsample", "layers.1.blocks", "layers.2.downsample",
                                     "layers.2.blocks", "layers.3.downsample", "layers.3.blocks"]
    assert a.stage_ends == [1, 3, 5, 7]
    info = a.feature_info()
    assert info["stages"] == [FS(8, 56, 56), FS(16, 28, 28), FS(32, 14, 14), FS(64, 7, 7)]
    assert info["blocks"][1] == FS(16, 28, 28)  # the patch merging alone: half the size, twice the channels
    assert info["last"] == FS(64, 7, 7)
    x = torch.randn(1, 3, 224, 224)
    a.eval()
    m.eval()
    with torch.no_grad():
        logits, feats = a(x, features=True)
        assert torch.equal(logits, m(x))
        assert torch.allclose(feats["last"], m.forward_features(x).permute(0, 3, 1, 2), atol=1e-6)


# ----- one-line errors ----------------------------------------------------------------------------------------------
class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.gate = Gate()
        self.fc = nn.Linear(4, 10)

    def forward(self, x):
        return self.fc(F.adaptive_avg_pool2d(self.gate(self.conv(x)), 1).flatten(1))


class Gate(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: fx cannot trace it
            return x
        return -x


class ConvHead(nn.Module):
    """No nn.Linear after pooling (a 1x1 conv classifier, as SqueezeNet's)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2), nn.ReLU())
        self.cls = nn.Conv2d(8, 10, 1)

    def forward(self, x):
        return F.adaptive_avg_pool2d(self.cls(self.body(x)), 1).flatten(1)


def test_a_network_whose_graph_depends_on_the_mode():
    torch.manual_seed(0)
    net = ModeNet()
    a = adapt(net, input_size=SIZE, blocks=["a", "b"])
    x = batch()["image"]
    for mode in (True, False):
        a.train(mode)
        net.train(mode)
        with torch.no_grad():
            assert torch.equal(a(x), net(x)), mode
    assert not torch.equal(a.train()(x), a.eval()(x))
    # one piece per mode, both handed out (train.compile compiles each); one when the modes' graphs agree
    assert len(a.block_modules(1)) == 2 and len(a.stem_modules()) == 2
    assert len(adapt(SkipNet(), input_size=SIZE, blocks=["a", "b", "c"]).block_modules(0)) == 1


def test_errors_are_one_line_and_name_the_fix():
    with pytest.raises(LakdError, match=r"cannot trace Branchy .*x.sum\(\) > 0.* module 'gate' \(Gate\).*leaf"):
        adapt(Branchy(), input_size=SIZE)
    m = adapt(Branchy(), input_size=SIZE, leaf_modules=["Gate"], blocks=["gate"])  # the suggested fix works
    assert m.num_blocks == 1
    with pytest.raises(LakdError, match=r"no cut point 'layer5'.*did you mean.*layer"):
        adapt(torchvision.models.resnet18(), input_size=SIZE, blocks=["layer1", "layer5"])
    with pytest.raises(LakdError, match="out of order"):
        adapt(torchvision.models.resnet18(), input_size=SIZE, blocks=["layer2", "layer1"])
    with pytest.raises(LakdError, match="after the last feature map"):
        adapt(torchvision.models.resnet18(), input_size=SIZE, blocks=["layer1", "fc"])
    with pytest.raises(LakdError, match=r"method catkd needs class activation maps .* no nn.Linear after global "
                                        r"pooling; name its classifier with model.classifier"):
        lakd.distiller(ConvHead(), ConvHead(), "catkd", image_size=SIZE, student_options={"blocks": ["body.1", "body.3"]},
                       teacher_options={"blocks": ["body.1", "body.3"]})
    d = lakd.distiller(ConvHead(), ConvHead(), "kd", image_size=SIZE, student_options={"blocks": ["body.3"]},
                       teacher_options={"blocks": ["body.3"]})  # methods without CAMs run
    assert d.student.num_blocks == 1
    with pytest.raises(LakdError, match="do not pair up; fix: .* sdm.teacher_points="):
        lakd.distiller(SkipNet(), torchvision.models.resnet18(num_classes=10), "lakd", image_size=SIZE,
                       student_options={"blocks": ["a", "b"]})
    for e in ("torchvision:resnet_18", "timm:not_a_model", "module:tests.test_adapter:Nope", "module:nopkg_x:f"):
        with pytest.raises(LakdError) as info:
            create_model(e, 10)
        assert "\n" not in str(info.value)


# ----- the private nn.Module dictionaries the adapter shares with the network (lakd/models/adapter/pieces.py) -------
def test_private_module_dicts_the_adapter_relies_on():
    """The adapter shares the network's children and top-level tensors through nn.Module's private dictionaries
    and follows .to() through nn.Module._apply: if torch renames or reshapes them, this fails loudly."""
    probe = nn.Module()
    for attr in ("_modules", "_parameters", "_buffers"):
        assert type(probe.__dict__[attr]) is dict, attr
    assert isinstance(probe.__dict__["_non_persistent_buffers_set"], set)
    assert callable(nn.Module._apply)

    class Top(nn.Module):  # a top-level parameter and buffer, and a child named like a FeatureNet attribute
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(1))
            self.register_buffer("shift", torch.zeros(1))
            self.body = nn.Conv2d(3, 4, 3)
            self.classifier = nn.Linear(4, 10)

        def forward(self, x):
            h = self.body(x) * self.scale + self.shift
            return self.classifier(F.adaptive_avg_pool2d(h, 1).flatten(1))

    net = Top()
    a = adapt(net, input_size=SIZE, blocks=["body"])
    assert list(a.state_dict()) == list(net.state_dict()) and a.classifier is net.classifier
    a.to(torch.float64)  # _apply: the converted buffer reaches the network and the pieces
    assert net.shift.dtype == torch.float64 and net.scale.dtype == torch.float64
    x = torch.randn(2, 3, SIZE, SIZE, dtype=torch.float64)
    a.eval()
    net.eval()
    with torch.no_grad():
        assert torch.equal(a(x), net(x))
        c = copy.deepcopy(a)
        assert torch.equal(c(x), net(x)) and c.body is not a.body


# ----- default cuts never strand a branch -------------------------------------------------------------------------
class LongSkip(nn.Module):
    """``x3 = block3(block2(block1(x0)) + down(x0))``: the stem's output skips two blocks into a third."""

    def __init__(self, num_classes=10, w=8):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, w, 3, padding=1), nn.ReLU())
        self.block1 = nn.Sequential(nn.Conv2d(w, w, 3, padding=1), nn.ReLU())
        self.block2 = nn.Sequential(nn.Conv2d(w, 2 * w, 3, stride=2, padding=1), nn.ReLU())
        self.down = nn.Conv2d(w, 2 * w, 1, stride=2)
        self.block3 = nn.Sequential(nn.Conv2d(2 * w, 4 * w, 3, stride=2, padding=1), nn.ReLU())
        self.fc = nn.Linear(4 * w, num_classes)

    def forward(self, x):
        x0 = self.stem(x)
        x3 = self.block3(self.block2(self.block1(x0)) + self.down(x0))
        return self.fc(F.adaptive_avg_pool2d(x3, 1).flatten(1))


def test_default_cuts_of_a_long_skip_network_train_every_parameter():
    torch.manual_seed(0)
    a = adapt(LongSkip(), input_size=SIZE)
    # block1, block2 and down lie on the two paths that join at the sum: the first cut is the sum
    assert a.cut_names["stem"] == "stem" and a.cut_names["blocks"] == ["add", "block3"]
    d = lakd.distiller(LongSkip(), LongSkip(w=12), "lakd", image_size=SIZE)
    d.train_step(batch(), lambda loss: loss.backward())
    assert [n for n, p in d.student.named_parameters() if p.grad is None or not torch.count_nonzero(p.grad)] == []
    rows = [path for path, _ in cut_candidates(LongSkip(), input_size=SIZE)]
    assert "add" in rows and not {"block1", "block2", "down"} & set(rows)
    assert {"block1", "block2", "down"} <= {p for p, _ in cut_candidates(LongSkip(), input_size=SIZE, every=True)}


# ----- the adapter survey's fast subset (benchmarks/adapter_survey.py runs every torchvision / timm classifier) ------
def _survey():
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "adapter_survey.py"
    spec = importlib.util.spec_from_file_location("adapter_survey", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("name", ["module:test_adapter:LongSkip", "module:test_inplace:InplaceNet",
                                  "module:test_adapter:SkipNet", "torchvision:mobilenet_v3_small",
                                  "torchvision:mnasnet0_5"])  # MNASNet: its state-dict version survives
def test_survey_subset_works(name):
    row = _survey().survey_one(name, [SIZE], max_params=100)
    assert row["status"] == "works", row
    assert row["kd"] == "ok" and row["lakd"] == "ok" and row["state_dict_round_trip"] and row["logits_equal"]
