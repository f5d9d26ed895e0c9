"""Small helpers shared by the feature methods (VID, FT, AB, FSP, ReviewKD, SSKD, PAD-L2, SRD): map pooling and
which of a network's modules are its head (``head_modules``); not a method. (Their settings are checked from their
declarations: ``Distiller.SETTINGS``, ``lakd.settings``.)"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def pool_to_match(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The larger of two maps average-pooled to the smaller one's size (RepDistiller's and mdistiller's rule)."""
    if a.shape[-2:] == b.shape[-2:]:
        return a, b
    if a.shape[-2] * a.shape[-1] > b.shape[-2] * b.shape[-1]:
        return F.adaptive_avg_pool2d(a, b.shape[-2:]), b
    return a, F.adaptive_avg_pool2d(b, a.shape[-2:])


def head_modules(net: nn.Module) -> list[nn.Module]:
    """The modules of ``net`` (a ``FeatureNet``) that only its head runs, between the last block and the logits
    (``head_forward``: the classifier and what ``pre_pool`` runs, e.g. WRN's final BatchNorm ``bn1``): the modules
    with parameters or buffers of their own that one forward (a zero image of ``net.input_size``, eval mode, no
    gradient) calls after the last block and never before it. The rest (stem and blocks) is RepDistiller's
    ``get_feat_modules``: its initialisation stages (AB, FSP) train only those and keep the head in eval mode."""
    owners = [m for m in net.modules()
              if next(m.parameters(recurse=False), None) is not None or next(m.buffers(recurse=False), None) is not None]
    phase, calls = ["body"], {}

    def record(module, args):
        calls.setdefault(id(module), set()).add(phase[0])

    hooks = [m.register_forward_pre_hook(record) for m in owners]
    first = next(net.parameters())
    size = int(getattr(net, "input_size", 32))
    was_training = net.training
    net.eval()
    try:
        with torch.no_grad():
            h = net.run_blocks(net.stem_forward(torch.zeros(1, 3, size, size, device=first.device,
                                                            dtype=first.dtype)), 0, net.num_blocks)
            phase[0] = "head"
            net.head_forward(h)
    finally:
        for hook in hooks:
            hook.remove()
        net.train(was_training)
    return [m for m in owners if calls.get(id(m)) == {"head"}]
