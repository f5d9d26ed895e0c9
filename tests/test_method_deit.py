"""DeiT's distillation token (``method=deit``): the loss equals timm's ``TokenDistillationTask`` and DeiT's
``DistillationLoss`` (hard and soft) on the same networks and tensors, each head gets its own loss's gradient, the
evaluation output is the mean of the two heads, and a one-head student is refused in one line. Tiny DeiTs
(32 px, patch 8, depth 2, width 48)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import lakd
from lakd.errors import LakdError

timm = pytest.importorskip("timm")
pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = 32


def deit(name="deit_tiny_distilled_patch16_224", seed=0, width=48):
    torch.manual_seed(seed)
    return timm.create_model(name, pretrained=False, num_classes=10, img_size=SIZE, patch_size=8, depth=2,
                             embed_dim=width, num_heads=2)


def batch(n=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, SIZE, SIZE, generator=g), torch.randint(0, 10, (n,), generator=g)


def deit_reference_loss(outputs, outputs_kd, teacher_outputs, labels, kind, alpha, tau):
    """DeiT's ``DistillationLoss.forward`` (facebookresearch/deit ``losses.py``), its arithmetic as written there,
    with a plain cross-entropy as the base criterion."""
    base_loss = F.cross_entropy(outputs, labels)
    if kind == "soft":
        distillation_loss = F.kl_div(F.log_softmax(outputs_kd / tau, dim=1), F.log_softmax(teacher_outputs / tau, dim=1),
                                     reduction="sum", log_target=True) * (tau * tau) / outputs_kd.numel()
    else:
        distillation_loss = F.cross_entropy(outputs_kd, teacher_outputs.argmax(dim=1))
    return base_loss * (1 - alpha) + distillation_loss * alpha


@pytest.mark.parametrize("kind", ["hard", "soft"])
def test_deit_loss_equals_deits_distillation_loss(kind):
    student, teacher = deit(), deit("deit_tiny_patch16_224", seed=1, width=64)
    x, y = batch()
    alpha, tau = 0.3, 3.0
    d = lakd.distiller(copy.deepcopy(student), copy.deepcopy(teacher), "deit", image_size=SIZE,
                       options={"deit": {"type": kind, "ce_weight": 1 - alpha, "distill_weight": alpha, "T": tau}})
    d.train()
    logits, losses = d.forward_train(x, y)
    # the same networks, run as DeiT's training loop runs them: the student in distilled training mode returns the
    # class head's and the distillation head's logits
    student.set_distilled_training(True)
    student.train()
    teacher.eval()
    outputs, outputs_kd = student(x)
    with torch.no_grad():
        t = teacher(x)
    ref = deit_reference_loss(outputs, outputs_kd, t, y, kind, alpha, tau)
    assert torch.allclose(logits, outputs, atol=1e-6)  # the class head's logits (what DeiT's loop scores)
    assert torch.allclose(sum(losses.values()), ref, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kind", ["hard", "soft"])
def test_deit_loss_equals_timms_token_distillation(kind):
    from timm.task import TokenDistillationTask

    student, teacher = deit(), deit("deit_tiny_patch16_224", seed=1, width=64)
    x, y = batch()
    d = lakd.distiller(copy.deepcopy(student), copy.deepcopy(teacher), "deit", image_size=SIZE,
                       options={"deit": {"type": kind, "ce_weight": 0.4, "distill_weight": 0.9, "T": 2.0,
                                         "kl_reduction": "batchmean"}})
    d.train()
    _, losses = d.forward_train(x, y)
    task = TokenDistillationTask(student, teacher, criterion=torch.nn.CrossEntropyLoss(), distill_type=kind,
                                 task_loss_weight=0.4, distill_loss_weight=0.9, temperature=2.0, verbose=False)
    task.train()
    out = task(x, y)
    assert torch.allclose(losses["ce"], 0.4 * out["task_loss"], rtol=1e-5, atol=1e-7)
    assert torch.allclose(losses["distill"], 0.9 * out["distill_loss"], rtol=1e-5, atol=1e-7)
    assert torch.allclose(sum(losses.values()), out["loss"], rtol=1e-5, atol=1e-7)


def test_each_head_learns_from_its_own_loss_and_evaluation_averages_them():
    net = deit()
    d = lakd.distiller(net, deit("deit_tiny_patch16_224", seed=1), "deit", image_size=SIZE)
    x, y = batch()
    grads = {}
    for name in ("ce", "distill"):
        d.zero_grad(set_to_none=True)
        _, losses = d.forward_train(x, y)
        losses[name].backward()
        grads[name] = {n: p.grad for n, p in net.named_parameters()}
    assert grads["ce"]["head.weight"] is not None and grads["ce"]["head_dist.weight"] is None
    assert grads["distill"]["head_dist.weight"] is not None and grads["distill"]["head.weight"] is None
    assert torch.count_nonzero(grads["ce"]["blocks.0.attn.qkv.weight"]) > 0
    assert torch.count_nonzero(grads["distill"]["blocks.0.attn.qkv.weight"]) > 0
    d.eval()
    with torch.no_grad():
        tokens = net.forward_features(x)
        mean = (net.head(tokens[:, 0]) + net.head_dist(tokens[:, 1])) / 2
        assert torch.allclose(d(x), mean, atol=1e-6) and torch.equal(d(x), net(x))


def test_a_student_without_a_distillation_head_is_refused_in_one_line():
    with pytest.raises(LakdError, match=r"method deit needs a class head and a distillation head .* from the "
                                        r"student, but .* has one classifier head .*deit_tiny_distilled") as info:
        lakd.distiller(deit("deit_tiny_patch16_224"), deit("deit_tiny_patch16_224", seed=1), "deit", image_size=SIZE)
    assert "\n" not in str(info.value)
    with pytest.raises(LakdError, match=r"has one classifier head"):
        lakd.distiller("resnet8", "resnet14", "deit", num_classes=10, image_size=32)
    with pytest.raises(LakdError, match=r"deit.type .* must be one of hard, soft, got 'medium'"):
        lakd.distiller(deit(), deit("deit_tiny_patch16_224", seed=1), "deit", image_size=SIZE,
                       options={"deit": {"type": "medium"}})
