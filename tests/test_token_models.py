"""Token networks (timm's ViT/DeiT, two-head networks) as feature networks: patch tokens as H x W grids, class and
distillation tokens split off, class maps that add up to the logits (or a one-line refusal), LAKD's local modules
isolated exactly on a ViT, mixed CNN/ViT pairs, and the misleading paths of unused branches and untraceable
top-level forwards. Tiny ViTs (32 px, patch 8, depth 4, width 48): seconds each."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import lakd
from lakd.errors import LakdError
from lakd.models import adapt

timm = pytest.importorskip("timm")
pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = 32


def vit(name="vit_tiny_patch16_224", width=48, **kw):
    torch.manual_seed(kw.pop("seed", 0))
    return timm.create_model(name, pretrained=False, num_classes=10, img_size=SIZE, patch_size=8, depth=4,
                             embed_dim=width, num_heads=2, **kw)


def batch(n=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.randn(n, 3, SIZE, SIZE, generator=g), "target": torch.arange(n) % 10,
            "index": torch.arange(n)}


def step(d, b=None):
    _, losses = d.train_step(b or batch(), lambda loss, **kw: loss.backward(**kw))
    assert all(torch.isfinite(v) for v in losses.values()), losses
    return losses


# ----- a ViT behind the feature interface -------------------------------------------------------------------------
def test_vit_blocks_are_token_grids_with_the_class_token_split_off():
    net = vit().eval()
    a = adapt(net, input_size=SIZE)
    # cut at every transformer block; a plain ViT keeps one 4 x 4 grid, so its stages are four groups of blocks
    assert a.cut_names["blocks"] == [f"blocks.{i}" for i in range(4)] and a.stage_ends == [1, 2, 3, 4]
    info = a.feature_info()
    assert info["blocks"][0] == lakd.models.FeatureShape(48, 4, 4) and info["last"] == info["blocks"][0]
    assert info["embedding_dim"] == 48 and info["num_classes"] == 10
    seen = {}
    for i in range(4):
        net.blocks[i].register_forward_hook(lambda m, inp, out, i=i: seen.__setitem__(i, out))
    net.norm.register_forward_hook(lambda m, inp, out: seen.__setitem__("norm", out))
    x = batch()["image"]
    with torch.no_grad():
        logits, feats = a.eval()(x, features=True)
        ref = net(x)
        pre = net.forward_head(net.forward_features(x), pre_logits=True)
    assert torch.equal(logits, ref)
    for i, (grid, cls) in enumerate(zip(feats["stages"], feats["prefix"])):
        tokens = seen[i]  # B x (1 + 16) x C: the class token, then the patch tokens row by row
        assert grid.shape == (4, 48, 4, 4) and cls.shape == (4, 1, 48)
        assert torch.equal(cls, tokens[:, :1])
        assert torch.equal(grid[:, :, 1, 2], tokens[:, 1 + 1 * 4 + 2])  # row 1, column 2
    assert torch.equal(feats["last"], seen["norm"][:, 1:].transpose(1, 2).reshape(4, 48, 4, 4))
    assert torch.equal(feats["embedding"], pre)  # timm's pre-logits: the class token after the final norm
    # its state dict is the network's, its checkpoint loads back
    plain = vit(seed=3)
    plain.load_state_dict(a.state_dict())
    assert torch.equal(plain.eval()(x), ref)


def test_torchvisions_vit_is_cut_per_encoder_block_into_token_grids():
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    net = VisionTransformer(image_size=SIZE, patch_size=8, num_layers=4, num_heads=2, hidden_dim=32, mlp_dim=64,
                            num_classes=10).eval()
    a = adapt(net, input_size=SIZE).eval()
    assert a.cut_names["blocks"] == [f"encoder.layers.encoder_layer_{i}" for i in range(4)]
    x = batch()["image"]
    with torch.no_grad():
        logits, feats = a(x, features=True)
        assert torch.equal(logits, net(x))
    assert [f.shape for f in feats["stages"]] == [(4, 32, 4, 4)] * 4 and feats["prefix"][0].shape == (4, 1, 32)
    step(lakd.distiller(copy.deepcopy(net), torchvision.models.resnet18(num_classes=10), "at", image_size=SIZE))


def test_class_token_head_has_no_class_maps_and_says_why_in_one_line():
    a = adapt(vit(), input_size=SIZE)
    why = a.missing("class_maps")
    assert "classifies its class token (x[:, 0])" in why and "global_pool: avg" in why and "\n" not in why
    with pytest.raises(LakdError, match=r"method catkd needs class activation maps .* class token") as info:
        lakd.distiller(vit(), vit(width=64), "catkd", image_size=SIZE)
    assert "\n" not in str(info.value)
    with pytest.raises(LakdError, match=r"\(for lakd.att_weight=1.0\).*lakd.att_weight=0"):
        lakd.distiller(vit(), vit(width=64), "lakd", image_size=SIZE)
    # DeiT's distilled network: two tokens, two heads
    why = adapt(vit("deit_tiny_distilled_patch16_224"), input_size=SIZE).missing("class_maps")
    assert "class and distillation tokens (x[:, 0] and x[:, 1])" in why


def test_average_pooled_vit_class_maps_add_up_to_the_logits_through_its_layernorm():
    net = vit(global_pool="avg").eval()  # mean of the patch tokens, then fc_norm (a LayerNorm), then the head
    a = adapt(net, input_size=SIZE).eval()
    assert a.missing("class_maps") is None and not a._split.cam_fast
    x = batch()["image"]
    with torch.no_grad():
        logits, feats = a(x, features=True)
        grid = feats["last"]
        cams = a.class_maps(grid)
        offset = a.class_map_offset(grid)
        # by hand: the LayerNorm at each position with the pooled vector's mean and variance, then the head
        pooled = grid.mean((2, 3))
        mu, var = pooled.mean(1, keepdim=True), pooled.var(1, unbiased=False, keepdim=True)
        ln = net.fc_norm
        v = grid[:, :, 2, 3]
        at = ((v - mu) / torch.sqrt(var + ln.eps) * ln.weight + ln.bias) @ net.head.weight.T + net.head.bias
        zero = ((-mu) / torch.sqrt(var + ln.eps) * ln.weight + ln.bias) @ net.head.weight.T + net.head.bias
    assert torch.allclose(cams[:, :, 2, 3], at - zero, atol=1e-5)
    assert torch.allclose(offset, zero, atol=1e-6)
    assert torch.allclose(cams.mean((2, 3)) + offset, logits, atol=1e-5)
    d = lakd.distiller(vit(global_pool="avg"), vit(global_pool="avg", width=64), "catkd", image_size=SIZE)
    assert set(step(d)) == {"ce", "cat"}


# ----- LAKD on a ViT --------------------------------------------------------------------------------------------
def test_lakd_on_vits_isolates_its_local_modules_exactly(block_parameters):
    d = lakd.distiller(vit("deit_tiny_patch16_224"), vit("vit_small_patch16_224", width=64), "lakd",
                       image_size=SIZE, options={"lakd": {"att_weight": 0}})
    assert d.splits == [1, 2, 3, 4] and d.teacher_points == [1, 2, 3, 4]
    # the connectors map 48 -> 64 channels on the 4 x 4 grids (1x1 conv + BN, no resize)
    assert all(c.proj is not None and c.size is None for c in d.connectors)
    b = batch()
    n = len(d.splits)
    for k in range(n):
        d.zero_grad(set_to_none=True)
        _, losses = d.forward_train(**b)
        own = [v for name, v in losses.items() if name == f"feat{k + 1}" or (k == n - 1 and name == "ce")]
        sum(own).backward()
        for j in range(k + 1):
            start = 0 if j == 0 else d.splits[j - 1]
            params = block_parameters(d.student, start, d.splits[j], stem=j == 0, head=j == n - 1)
            g = [p.grad for p in params]
            if j < k:  # nothing of an earlier module's, not one element
                assert all(x is None or torch.count_nonzero(x) == 0 for x in g), (k, j)
            else:
                assert any(x is not None and torch.count_nonzero(x) > 0 for x in g), (k, j)
    # the local backward gives the joint backward's gradients, every parameter reached
    local = copy.deepcopy(d)
    joint = lakd.distiller(copy.deepcopy(d.student), copy.deepcopy(d.teacher), "lakd", image_size=SIZE,
                           options={"lakd": {"att_weight": 0}, "sdm": {"backward": "joint"}})
    joint.connectors.load_state_dict(local.connectors.state_dict())
    for x in (local, joint):
        x.zero_grad(set_to_none=True)
        step(x, b)
    ga, gb = dict(local.named_trainable_parameters()), dict(joint.named_trainable_parameters())
    assert all(p.grad is not None for p in ga.values())
    for name in ga:
        assert torch.allclose(ga[name].grad, gb[name].grad, atol=1e-6), name


def test_lakd_with_class_attention_on_average_pooled_vits_and_ndam_on_token_grids():
    d = lakd.distiller(vit(global_pool="avg"), vit(global_pool="avg", width=64), "lakd", image_size=SIZE)
    b = batch()
    feats, cam = d.teacher_targets(b["image"])
    assert [f.shape for f, _ in feats] == [(4, 64, 4, 4)] * 4 and cam.shape == (4, 10, 4, 4)
    w = d.attention(None, feats[0][0])
    assert w.shape == (4, 1, 4, 4) and torch.allclose(w.mean((2, 3)), torch.ones(4, 1), atol=1e-5)
    assert set(step(d, b)) == {"feat1", "feat2", "feat3", "feat4", "ce", "att"}


# ----- mixed pairs: how grids and widths meet ----------------------------------------------------------------------
def test_cnn_student_from_a_vit_teacher_and_back():
    r18 = torchvision.models.resnet18(num_classes=10)  # 32 px: stages 8x8, 4x4, 2x2, 1x1
    teacher = vit(global_pool="avg", width=64)  # one 4 x 4 grid
    d = lakd.distiller(copy.deepcopy(r18), teacher, "lakd", image_size=SIZE)
    assert d.splits == [2, 4, 6, 8] and d.teacher_points == [1, 2, 3, 4]
    # LAKD: each student module's map goes through a 1x1 conv to the teacher's width, then is average-pooled
    # (8x8 -> 4x4) or bilinearly upsampled (2x2, 1x1 -> 4x4) to the teacher's grid
    out = [c(torch.zeros(2, ch, s, s)).shape for c, ch, s in zip(d.connectors, (64, 128, 256, 512), (8, 4, 2, 1))]
    assert out == [(2, 64, 4, 4)] * 4
    assert set(step(d)) == {"feat1", "feat2", "feat3", "feat4", "ce", "att"}
    # FitNet's regressor: a smaller student map is upsampled to the teacher's grid before its 1x1 conv
    f = lakd.distiller(copy.deepcopy(r18), vit(width=64), "fitnet", image_size=SIZE,
                       options={"fitnet": {"hint_stage": 4}})
    assert f.regressor.up == (4, 4) and f.regressor(torch.zeros(2, 512, 1, 1)).shape == (2, 64, 4, 4)
    step(f)
    # the other way: a ViT student from a CNN teacher
    for method in ("fitnet", "at", "crd", "reviewkd"):
        d = lakd.distiller(vit(), copy.deepcopy(r18), method, image_size=SIZE, num_data=8,
                           options={"crd": {"nce_k": 4}} if method == "crd" else None)
        step(d)
    d = lakd.distiller(vit(), copy.deepcopy(r18), "lakd", image_size=SIZE, options={"lakd": {"att_weight": 0}})
    assert d.splits == [1, 2, 3, 4] and d.teacher_points == [2, 4, 6, 8]
    step(d)


# ----- two heads, unused branches, untraceable forwards -----------------------------------------------------------
class TwoHead(nn.Module):
    """EfficientFormerV2's head: the logits are the mean of two linear heads on the same pooled map."""

    def __init__(self, aux=False):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2, padding=1),
                                  nn.ReLU(), nn.Conv2d(16, 16, 3, stride=2, padding=1), nn.ReLU())
        self.head = nn.Linear(16, 10)
        self.head_dist = nn.Linear(16, 10)
        self.aux = nn.Sequential(nn.Conv2d(16, 8, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10)) \
            if aux else None

    def forward(self, x):
        h = self.body(x)
        v = h.mean((2, 3))
        out = (self.head(v) + self.head_dist(v)) / 2
        return (out, self.aux(h)) if self.aux is not None else out


class Wrapper(nn.Module):
    """A user's wrapper that keeps only the first output of a network with an auxiliary head."""

    def __init__(self):
        super().__init__()
        self.net = TwoHead(aux=True)

    def forward(self, x):
        return self.net(x)[0]


def test_two_head_class_maps_add_up_to_the_averaged_logits():
    torch.manual_seed(0)
    net = TwoHead().eval()
    a = adapt(net, input_size=SIZE).eval()
    assert a.missing("class_maps") is None and a.classifier is net.head
    x = batch()["image"]
    with torch.no_grad():
        logits, feats = a(x, features=True)
        cams = a.class_maps(feats["last"])
        w = (net.head.weight + net.head_dist.weight) / 2
    assert torch.allclose(cams, torch.einsum("bchw,kc->bkhw", feats["last"], w), atol=1e-6)
    assert torch.allclose(cams.mean((2, 3)) + (net.head.bias + net.head_dist.bias) / 2, logits, atol=1e-6)
    assert [h.shape for h in feats["heads"]] == [(4, 10), (4, 10)]
    assert torch.allclose((feats["heads"][0] + feats["heads"][1]) / 2, logits)
    # SRRL feeds the teacher's classifier: one head of two does not give the teacher's logits
    with pytest.raises(LakdError, match=r"method srrl needs a linear classifier .*\(the mean of two heads\)") as info:
        lakd.distiller(TwoHead(), TwoHead(), "srrl", image_size=SIZE)
    assert "\n" not in str(info.value)


def test_srrl_takes_a_class_token_teacher_whose_head_reads_the_embedding():
    d = lakd.distiller(vit(), vit(width=64), "srrl", image_size=SIZE)
    x = batch()["image"]
    with torch.no_grad():
        logits, feats = d.teacher(x, features=True)
        assert torch.allclose(d.teacher.classifier(feats["embedding"]), logits, atol=1e-6)
    step(d)


def test_an_unused_auxiliary_branch_is_not_pooled_cut_or_used_for_class_maps():
    torch.manual_seed(0)
    w = Wrapper()
    a = adapt(w, input_size=SIZE)
    assert "net.aux.1" not in a.cut_names["blocks"] and a.missing("class_maps") is None
    assert a.classifier is w.net.head
    with pytest.raises(LakdError, match="branch that does not reach the output") as info:
        adapt(Wrapper(), input_size=SIZE, blocks=["net.body.1", "net.aux.0"])
    assert "\n" not in str(info.value)
    adapt(Wrapper(), input_size=SIZE, blocks=["net.body.1", "net.body.5"])  # explicit blocks: no dead pooling
    # KD needs no cut; the auxiliary head never trains, and the check says so and how to fix it
    with pytest.raises(LakdError, match=r"4 trainable parameters get no gradient .*net.aux.0.weight.*freeze them"):
        lakd.distiller(Wrapper(), Wrapper(), "kd", image_size=SIZE)
    s, t = Wrapper(), Wrapper()
    s.net.aux.requires_grad_(False)
    step(lakd.distiller(s, t, "kd", image_size=SIZE))
    cat = lakd.distiller(copy.deepcopy(s), Wrapper(), "catkd", image_size=SIZE)
    x = batch()["image"]
    cat.eval()
    with torch.no_grad():
        logits, feats = cat.student(x, features=True)
        cams = cat.student.class_maps(feats["last"])
    offset = (s.net.head.bias + s.net.head_dist.bias) / 2
    assert torch.allclose(cams.mean((2, 3)) + offset, logits, atol=1e-5)


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        h = self.conv(x)
        if h.mean() > 0:  # data-dependent control flow at the top level: fx cannot trace it
            h = -h
        return self.fc(h.mean((2, 3)))


def test_untraceable_top_level_forward_runs_as_one_call_for_logit_methods():
    with pytest.raises(LakdError, match=r"top-level forward of DataDependent.*leaf_modules=\[DataDependent\] runs "
                                        r"it as one call") as info:
        adapt(DataDependent(), input_size=SIZE)
    assert "\n" not in str(info.value)
    for leaf in (DataDependent, "DataDependent", ""):  # the suggested fix works, as a type, a class name or ''
        a = adapt(DataDependent(), input_size=SIZE, leaf_modules=[leaf])
        assert a.num_blocks == 0 and a.feature_info()["num_classes"] == 10
    torch.manual_seed(0)
    net = DataDependent()
    d = lakd.distiller(net, DataDependent(), "kd", image_size=SIZE, student_options={"leaf_modules": [""]},
                       teacher_options={"leaf_modules": [""]})
    step(d)
    assert list(d.student.state_dict()) == list(net.state_dict())
    x = batch()["image"]
    assert torch.equal(d.student.eval()(x), net.eval()(x))
    with pytest.raises(LakdError, match="runs as one call .* method=kd") as info:
        lakd.distiller(DataDependent(), DataDependent(), "fitnet", image_size=SIZE,
                       student_options={"leaf_modules": [""]}, teacher_options={"leaf_modules": [""]})
    assert "\n" not in str(info.value)


def test_a_network_without_default_cuts_still_trains_with_kd():
    class Flat(nn.Module):  # functional layers only: no module runs before global pooling, nothing to cut at
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(8, 3, 3, 3) * 0.1)
            self.classifier = nn.Linear(8, 10)

        def forward(self, x):
            return self.classifier(F.adaptive_avg_pool2d(F.relu(F.conv2d(x, self.w)), 1).flatten(1))

    a = adapt(Flat(), input_size=SIZE)
    assert a.num_blocks == 0 and "methods that need only the logits" in a.missing("features")
    step(lakd.distiller(Flat(), Flat(), "kd", image_size=SIZE))


def test_lakd_recompute_on_token_grids_gives_the_same_step():
    """sdm.recompute checkpoints each transformer block: the token sequence (and its grid layout) passes through
    torch.utils.checkpoint, dropout draws the same masks, the gradients are those without it."""
    b = batch()
    grads = []
    for recompute in (False, True):
        d = lakd.distiller(vit(global_pool="avg", drop_rate=0.1), vit(global_pool="avg", width=64, seed=1), "lakd",
                           image_size=SIZE, options={"sdm": {"recompute": recompute}})
        torch.manual_seed(5)
        d.zero_grad(set_to_none=True)
        losses = step(d, b)
        assert float(losses["feat1"]) > 0
        grads.append({n: p.grad.clone() for n, p in d.named_trainable_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], atol=1e-6), n


def test_a_vit_checkpoint_loads_at_the_image_size_it_trained_at(tmp_path):
    """A run records the image size (a ViT built for 32 px has a 4 x 4 patch grid and refuses 224 px); lakd eval
    rebuilds the network at that size even when the run's config left data.image_size at its native default."""
    from lakd.models import create_model, load_model

    kwargs = {"img_size": SIZE, "patch_size": 8, "depth": 2, "embed_dim": 48, "num_heads": 2}
    torch.manual_seed(0)
    m = create_model("timm:deit_tiny_distilled_patch16_224", 10, input_size=SIZE, kwargs=kwargs).eval()
    path = tmp_path / "best.pt"
    torch.save({"model": m.state_dict(), "arch": "timm:deit_tiny_distilled_patch16_224", "num_classes": 10,
                "image_size": SIZE, "config": {"model": {"name": "timm:deit_tiny_distilled_patch16_224",
                                                         "kwargs": kwargs}, "data": {"image_size": 0}}}, path)
    loaded, _ = load_model(str(path))
    x = batch()["image"]
    with torch.no_grad():
        assert loaded.input_size == SIZE and torch.equal(loaded(x), m(x))


def test_class_maps_that_do_not_add_up_to_the_logits_are_refused_with_the_difference():
    class MaxHead(nn.Module):  # global max pooling: a mean of per-position maps is not what the head sees
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1))
            self.fc = nn.Linear(8, 10)

        def forward(self, x):
            return self.fc(F.adaptive_max_pool2d(self.body(x), 1).flatten(1))

    torch.manual_seed(0)
    a = adapt(MaxHead(), input_size=SIZE)
    why = a.missing("class_maps")
    assert why.startswith("the class maps of MaxHead do not add up to its logits") and "%" in why
    with pytest.raises(LakdError, match=r"method catkd needs class activation maps .* do not add up") as info:
        lakd.distiller(MaxHead(), MaxHead(), "catkd", image_size=SIZE)
    assert "\n" not in str(info.value)
    step(lakd.distiller(MaxHead(), MaxHead(), "fitnet", image_size=SIZE))  # its maps serve the other methods
