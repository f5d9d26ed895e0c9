"""CAT-KD, class attention transfer (Guo et al., 2023): the student matches the teacher's class activation
maps, average-pooled to a small resolution, on top of cross-entropy.

Each network's CAMs are its own classifier weights applied as a 1x1 convolution to its last feature map
(``lakd.distillers.losses.class_activation_maps``), so nothing extra is learned. Loss
``ce_weight * CE + beta * MSE(pool_R(CAM_s), pool_R(CAM_t))`` with the CAT-KD repository's CIFAR-100 settings:
R = 2, no normalisation, CE weight 1 and a per-pair ``beta`` (res56->res20 0.7, res110->res32 1.8,
res32x4->res8x4 15, wrn40_2->wrn16_2 12, wrn40_2->wrn40_1 1.5, vgg13->vgg8 4.5).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import LakdError
from .base import Distiller, register_distiller
from .losses import class_attention_loss, model_class_maps


@register_distiller("catkd")
class CATKD(Distiller):
    display_name = "CAT-KD"
    report_order = 8
    bench_default = True
    needs = ("class_maps",)
    DEFAULTS = {"catkd": {"ce_weight": 1.0, "beta": 1.0, "resolution": 2, "normalize": False}}
    #: each setting's kind and range, checked before anything is built (lakd.settings; plain data)
    SETTINGS = {
        "catkd.ce_weight": {"kind": "number", "ge": 0},
        "catkd.beta": {"kind": "number", "ge": 0},
        "catkd.resolution": {"kind": "int", "ge": 1, "about":
            "class activation maps pooled to R x R; the paper uses 2"},
        "catkd.normalize": {"kind": "bool"},
    }
    #: checks over several settings, or a setting and the run (lakd.settings)
    CHECKS = [
        {"rule": "not_all_zero", "keys": ["catkd.ce_weight", "catkd.beta"]},
    ]

    def __init__(self, student, teacher, cfg, num_data=0):
        super().__init__(student, teacher, cfg, num_data)
        s = self.section("catkd")
        self.ce_weight, self.beta = float(s["ce_weight"]), float(s["beta"])
        self.resolution, self.normalize = int(s["resolution"]), bool(s["normalize"])
        if student.feature_info()["num_classes"] != teacher.feature_info()["num_classes"]:
            raise LakdError("CAT-KD needs student and teacher classifiers over the same classes "
                            "(set model.num_classes to the teacher's)")

    @torch.no_grad()
    def teacher_pass(self, image, **batch):
        _, t_feats = self.teacher_forward(image, features=True)
        return model_class_maps(self.teacher, t_feats["last"])

    def student_losses(self, image, target, cam_t, **batch):
        logits, feats = self.student(image, features=True)
        cam_s = model_class_maps(self.student, feats["last"])
        return logits, {
            "ce": self.ce_weight * F.cross_entropy(logits, target),
            "cat": self.beta * class_attention_loss(cam_s, cam_t, self.resolution, self.normalize),
        }
