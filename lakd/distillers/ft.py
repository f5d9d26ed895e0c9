"""FT, factor transfer (Kim et al., NeurIPS 2018), in RepDistiller's CIFAR form.

A *paraphraser* (an autoencoder on the teacher's last stage output ``t``: three 3x3 convs with LeakyReLU 0.1
down to ``rate`` x the teacher's channels, the factor, then three 3x3 transposed convs back; no BN) is first
trained alone to reconstruct ``t`` (MSE), for ``pretrain_epochs`` (30) at the constant rate ``pretrain_lr`` (0.01,
RepDistiller's for its ResNet and WRN students; ``helper/pretrain.py`` uses the run's lr, 0.05, for the others,
VGG8 among them: the vgg13 -> vgg8 configs set it), through ``prepare``; it is then frozen. A *translator* (three
3x3 convs with BN and LeakyReLU from the student's last stage output to the factor's channels) is trained with
the student. Loss ``ce_weight * CE + feat_weight * FT`` with the factors' distance (the larger map
average-pooled to the smaller one's size):

- ``factor: paper`` (the paper's Eq. 3 with p = 1): ``|| F_T / ||F_T||_2 - F_S / ||F_S||_2 ||_1``,
  each factor flattened over C x H x W, averaged over the batch;
- ``factor: repdistiller`` (default): RepDistiller's ``FactorTransfer``: each factor is first reduced to the channel mean
  of its square (H x W), L2-normalised, and the absolute difference is averaged over positions and batch.

RepDistiller's FT script: CE weight 1, FT weight 200 (``-a 0 -b 200``), with its ``repdistiller`` factor; the
paper uses beta = 1000 on CIFAR with its own distance (the configs follow RepDistiller, whose numbers the
comparison tables quote).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import Distiller, register_distiller
from .stage_utils import pool_to_match


def _conv_stack(channels: list[int], transposed: bool = False, bn: bool = False) -> nn.Sequential:
    layers: list[nn.Module] = []
    for c_in, c_out in zip(channels[:-1], channels[1:]):
        conv = nn.ConvTranspose2d if transposed else nn.Conv2d
        layers.append(conv(c_in, c_out, 3, 1, 1))
        if bn:
            layers.append(nn.BatchNorm2d(c_out))
        layers.append(nn.LeakyReLU(0.1))
    return nn.Sequential(*layers)


class Paraphraser(nn.Module):
    def __init__(self, c_t: int, c_factor: int):
        super().__init__()
        self.encoder = _conv_stack([c_t, c_t, c_factor, c_factor])
        self.decoder = _conv_stack([c_factor, c_factor, c_t, c_t], transposed=True)

    def forward(self, t: torch.Tensor):
        factor = self.encoder(t)
        return factor, self.decoder(factor)


def ft_distance(f_s: torch.Tensor, f_t: torch.Tensor, form: str = "paper") -> torch.Tensor:
    f_s, f_t = pool_to_match(f_s.float(), f_t.float())
    if form == "paper":
        d = F.normalize(f_s.flatten(1), dim=1) - F.normalize(f_t.flatten(1), dim=1)
        return d.abs().sum(1).mean()
    d = F.normalize(f_s.pow(2).mean(1).flatten(1), dim=1) - F.normalize(f_t.pow(2).mean(1).flatten(1), dim=1)
    return d.abs().mean()


@register_distiller("ft")
class FT(Distiller):
    """FT (Kim et al., NeurIPS 2018) distils a pre-trained paraphraser's factors into a student translator.

    The paraphraser, an autoencoder of the teacher's last feature map, is trained by ``prepare``."""

    display_name = "FT"
    report_order = 51
    DEFAULTS = {"ft": {"ce_weight": 1.0, "feat_weight": 200.0, "rate": 0.5, "factor": "repdistiller",
                       "pretrain_epochs": 30, "pretrain_lr": 0.01}}
    #: each setting's kind and range, checked before anything is built (lakd.settings; plain data)
    SETTINGS = {
        "ft.ce_weight": {"kind": "number", "ge": 0},
        "ft.feat_weight": {"kind": "number", "ge": 0},
        "ft.rate": {"kind": "number", "gt": 0, "about": "the paraphraser's channel rate"},
        "ft.factor": {"kind": "choice", "choices": ["paper", "repdistiller"]},
        "ft.pretrain_epochs": {"kind": "int", "ge": 0, "about": "epochs of the paraphraser's pre-training"},
        "ft.pretrain_lr": {"kind": "number", "gt": 0, "about": "the paraphraser's learning rate"},
    }
    #: checks over several settings, or a setting and the run (lakd.settings)
    CHECKS = [
        {"rule": "not_all_zero", "keys": ["ft.ce_weight", "ft.feat_weight"]},
    ]

    def __init__(self, student, teacher, cfg, num_data=0):
        super().__init__(student, teacher, cfg, num_data)
        s = self.section("ft")
        self.ce_weight, self.feat_weight = float(s["ce_weight"]), float(s["feat_weight"])
        rate, self.form = float(s["rate"]), s["factor"]
        self.pretrain_epochs, self.pretrain_lr = int(s["pretrain_epochs"]), float(s["pretrain_lr"])
        c_s = student.feature_info()["stages"][-1].channels
        c_t = teacher.feature_info()["stages"][-1].channels
        c_f = max(1, int(c_t * rate))
        self.paraphraser = Paraphraser(c_t, c_f)
        self.paraphraser.requires_grad_(False)  # trained by prepare() only, then fixed
        self.translator = _conv_stack([c_s, c_s, c_f, c_f], bn=True)

    def prepare(self, train_loader, device=None) -> None:
        """Pre-train the paraphraser as an autoencoder of the teacher's last stage output (module doc)."""
        params = list(self.paraphraser.parameters())
        self.paraphraser.requires_grad_(True)
        try:
            def loss(image, target):
                t = self.teacher_pass(image)
                return F.mse_loss(self.paraphraser(t)[1], t)

            self.run_stage(train_loader, device, params, loss, self.pretrain_epochs, self.pretrain_lr,
                           "paraphraser")
        finally:
            self.paraphraser.requires_grad_(False)

    def teacher_pass(self, image, **batch):
        return self.teacher_forward(image, features=True)[1]["stages"][-1]

    def student_losses(self, image, target, t_last, **batch):
        logits, feats = self.student(image, features=True)
        factor_t = self.paraphraser.encoder(t_last).detach()
        factor_s = self.translator(feats["stages"][-1])
        return logits, {
            "ce": self.ce_weight * F.cross_entropy(logits, target),
            "ft": self.feat_weight * ft_distance(factor_s, factor_t, self.form),
        }
