"""OFA-KD (``method=ofa``): the adaptive target enhancement loss against its definition computed by hand, the
projectors as the authors build them (CNN branch: SepConv blocks, ViT branch: patch merging + timm transformer
blocks + class token), their initialisation, the total loss, and mixed CNN/ViT pairs in both directions. Tiny
networks at 32 px (64 px where a patch merge runs)."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import lakd
from lakd.distillers.ofa import PatchMerging, SepConv, TokenProjector, TransformerBlock, ofa_loss
from lakd.errors import LakdError

timm = pytest.importorskip("timm")
pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = 32


def vit(name="vit_tiny_patch16_224", size=SIZE, patch=8, width=48, seed=0, **kw):
    torch.manual_seed(seed)
    return timm.create_model(name, pretrained=False, num_classes=10, img_size=size, patch_size=patch, depth=4,
                             embed_dim=width, num_heads=2, **kw)


def batch(n=4, size=SIZE, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g), torch.randint(0, 10, (n,), generator=g)


@pytest.mark.parametrize("eps,T", [(1.0, 1.0), (1.5, 1.0), (0.8, 2.0)])
def test_ofa_loss_is_its_definition(eps, T):
    g = torch.Generator().manual_seed(0)
    zs, zt = torch.randn(5, 7, generator=g) * 3, torch.randn(5, 7, generator=g) * 3
    y = torch.tensor([0, 3, 6, 2, 2])
    got = ofa_loss(zs, zt, F.one_hot(y, 7).float(), eps, T)
    # by hand, in float64: sum over classes of -w_c log p_s(c), w = (p_t + 1)^eps - 1 on the label, p_t^eps elsewhere
    s, t = zs.double().numpy() / T, zt.double().numpy() / T
    ps = np.exp(s - s.max(1, keepdims=True))
    ps /= ps.sum(1, keepdims=True)
    pt = np.exp(t - t.max(1, keepdims=True))
    pt /= pt.sum(1, keepdims=True)
    total = 0.0
    for i in range(5):
        for c in range(7):
            w = (pt[i, c] + 1) ** eps - 1 if c == y[i] else pt[i, c] ** eps
            total += -w * np.log(ps[i, c])
    assert abs(float(got) - total / 5) < 1e-5 * max(1.0, abs(total / 5))
    if eps == 1.0:  # the teacher's soft labels plus nothing: cross-entropy with them
        ref = -(F.softmax(zt / T, 1) * F.log_softmax(zs / T, 1)).sum(1).mean()
        assert torch.allclose(got, ref, atol=1e-6)


def test_cnn_student_branches_and_the_total_loss():
    r18 = torchvision.models.resnet18(num_classes=10)  # 32 px: stages 8x8 (64), 4x4 (128), 2x2 (256), 1x1 (512)
    d = lakd.distiller(r18, vit(width=64), "ofa", image_size=SIZE, options={"ofa": {"eps": [1.5]}})
    assert d.branches == ["cnn"] * 4 and d.stages == [1, 2, 3, 4] and d.points == [2, 4, 6, 8]
    p1, p4 = d.projector[0], d.projector[3]
    # stage 1 of 4: three SepConv blocks 64 -> 128 -> 256 -> max(512, 64); stage 4: a 1x1 conv to 512
    seps = [m for m in p1 if isinstance(m, SepConv)]
    assert [(s.op[0].in_channels, s.op[5].out_channels) for s in seps] == [(64, 128), (128, 256), (256, 512)]
    assert isinstance(p4[0], nn.Conv2d) and p4[0].kernel_size == (1, 1) and p4[0].out_channels == 512
    assert p1[-1].out_features == 10 and p1(torch.zeros(2, 64, 8, 8)).shape == (2, 10)
    # the authors' initialisation: Linear std 0.02 (truncated), zero bias; BatchNorm 1 / 0
    lin = p1[-1]
    assert torch.count_nonzero(lin.bias) == 0 and 0.01 < float(lin.weight.detach().std()) < 0.03
    assert bool((seps[0].op[2].weight == 1).all()) and bool((seps[0].op[2].bias == 0).all())
    x, y = batch()
    d.train()
    logits, losses = d.forward_train(x, y)
    with torch.no_grad():
        t = d.teacher(x)
    # the total: CE + OFA on the logits + OFA on each stage's branch, all against the same teacher logits
    _, feats = d.student(x, features=True)
    mask = F.one_hot(y, 10).float()
    branch = sum(ofa_loss(proj(f), t, mask, 1.5) for proj, f in zip(d.projector, feats["stages"]))
    assert torch.allclose(losses["ce"], F.cross_entropy(logits, y))
    assert torch.allclose(losses["kd"], ofa_loss(logits, t, mask, 1.5))
    assert torch.allclose(losses["ofa"], branch, rtol=1e-5)
    sum(losses.values()).backward()
    assert all(p.grad is not None for p in d.projector.parameters())


def test_vit_student_branch_merges_patches_and_reads_the_class_token():
    student = vit(size=64, patch=4, width=48)  # a 16 x 16 grid: one patch merge to 8 x 8 (floor(log2(16 / 7)) = 1)
    d = lakd.distiller(student, torchvision.models.resnet18(num_classes=10), "ofa", image_size=64,
                       options={"ofa": {"points": [1, 2, 3, 4]}})
    assert d.branches == ["vit"] * 4
    proj = d.projector[0]
    assert isinstance(proj, TokenProjector) and proj.prefix == 1 and len(proj.merge) == 1
    assert len(proj.blocks) == 3 and len(d.projector[3].blocks) == 1  # max(4 - stage, 1) blocks
    assert isinstance(proj.merge[0].act, nn.GELU)
    # the branch's input is the block's raw token sequence, class token first
    x, y = batch(size=64)
    seen = {}
    student.blocks[0].register_forward_hook(lambda m, i, o: seen.__setitem__("b0", o))
    d.eval()
    with torch.no_grad():
        student(x)  # the plain network (the adapter runs its modules, not its Block's forward)
        _, feats = d.stage_features(x)
    assert torch.equal(feats[0], seen["b0"]) and feats[0].shape == (4, 1 + 256, 48)
    # the branch by hand: merge the patch tokens, put the class token back, the blocks, the class token's logits
    with torch.no_grad():
        tokens = feats[0]
        h = torch.cat([tokens[:, :1], proj.merge(tokens[:, 1:])], dim=1)
        assert torch.allclose(proj(tokens), proj.fc(proj.blocks(h)[:, 0]), atol=1e-6)
    d.train()
    _, losses = d.forward_train(x, y)
    sum(losses.values()).backward()
    assert all(p.grad is not None for p in d.projector.parameters())


def test_patch_merging_and_transformer_block_match_their_references():
    # Swin's / the authors' order of the 2 x 2 neighbours: (0,0), (1,0), (0,1), (1,1)
    torch.manual_seed(0)
    pm = PatchMerging((4, 4), 3, 5, act=False)
    x = torch.randn(2, 16, 3)
    grid = x.view(2, 4, 4, 3)
    cat = torch.cat([grid[:, 0, 0], grid[:, 1, 0], grid[:, 0, 1], grid[:, 1, 1]], dim=-1)
    assert torch.allclose(pm(x)[:, 0], pm.reduction(pm.norm(cat)), atol=1e-6)
    # the transformer block is timm's Block as OFA builds it (timm 0.6.5's defaults: nn.LayerNorm, no qkv bias)
    from timm.models.vision_transformer import Block

    ref = Block(48, num_heads=4, norm_layer=nn.LayerNorm)
    mine = TransformerBlock(48, 4)
    mine.load_state_dict(ref.state_dict())
    t = torch.randn(2, 9, 48)
    assert torch.allclose(mine(t), ref(t), atol=1e-5)


def test_distilled_and_swin_students_and_settings():
    x, y = batch()
    d = lakd.distiller(vit("deit_tiny_distilled_patch16_224"), vit(seed=1), "ofa", image_size=SIZE)
    assert d.projector[0].prefix == 2  # class and distillation tokens; the class token is classified
    d.train()
    _, losses = d.forward_train(x, y)
    assert all(torch.isfinite(v) for v in losses.values())
    torch.manual_seed(0)
    swin = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, num_classes=10, img_size=SIZE,
                             window_size=2, depths=(1, 1, 1, 1), embed_dim=16, num_heads=(1, 1, 1, 1))
    d = lakd.distiller(swin, copy.deepcopy(vit()), "ofa", image_size=SIZE)
    assert d.branches == ["vit"] * 4 and d.projector[0].prefix == 0  # Swin's maps read row by row, no class token
    d.train()
    _, losses = d.forward_train(x, y)
    assert all(torch.isfinite(v) for v in losses.values())
    for opts, match in (({"eps": [1.0, 2.0]}, r"ofa.eps must hold one value or one per stage plus one"),
                        ({"stages": [0]}, r"ofa.stages .* must be a non-empty list of whole numbers >= 1"),
                        ({"branch": "mlp"}, r"ofa.branch .* must be one of auto, cnn, vit, got 'mlp'")):
        with pytest.raises(LakdError, match=match) as info:
            lakd.distiller(vit(), vit(seed=1), "ofa", image_size=SIZE, options={"ofa": opts})
        assert "\n" not in str(info.value)
