"""SRRL, knowledge distillation via softmax regression representation learning (Yang et al., ICLR 2021): the
student's penultimate feature, through a learnable connector, matches the teacher's (feature matching) and, fed
to the teacher's frozen classifier, gives the teacher's logits (softmax regression).

As the SRRL implementation of the SimKD code base (Chen et al., CVPR 2022, which reports SRRL on CIFAR-100): the
student's pooled embedding (``feats["embedding"]``) passes through a 1x1 convolution (no bias), BatchNorm and
ReLU to the teacher's embedding width; the feature term is ``MSE(r(h_s), h_t)`` and the regression term
``MSE(W_t r(h_s) + b_t, z_t)``, the teacher's classifier ``W_t, b_t`` applied to the mapped student feature against
the teacher's logits ``z_t`` (``srrl.logit_loss: kl`` uses ``T^2 KL(softmax(z_t / T) || softmax(. / T))`` instead,
the paper's cross-entropy form up to a constant). Weights: CE 1, feature 1, regression 1. The gradient of the
regression term passes through the teacher's classifier (whose weights stay frozen) to the connector and the
student. ``srrl.kd_weight`` (default 0) adds Hinton's KD term on the student's own logits at temperature
``srrl.T``: SimKD's script runs SRRL with ``-c 1 -d 1 -b 1`` (``scripts/run_distill.sh``: CE 1, KD 1 at its
``kd_T`` 4, SRRL 1), which the configs carry (``kd_weight: 1``, ``T: 4``).

Some code bases (SimKD, and the authors' own repositories) call this method SRRL, others SRD; in lakd ``srd`` is Miles
and Mikolajczyk's AAAI 2024 method, as in torchdistill (see ``srd.py``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import LakdError
from .base import Distiller, register_distiller
from .ickd import Conv1x1BN
from .kd import kd_loss


@register_distiller("srrl")
class SRRL(Distiller):
    """SRRL (Yang et al., ICLR 2021) distils the teacher's penultimate feature and its logits via its classifier.

    The student's mapped feature must match the teacher's and give the teacher's logits through the teacher's own
    frozen classifier.

    Extra part: ``connector`` (1x1 conv + BatchNorm + ReLU on the pooled embedding).
    """

    display_name = "SRRL"
    report_order = 46
    DEFAULTS = {"srrl": {"ce_weight": 1.0, "feat_weight": 1.0, "logit_weight": 1.0, "logit_loss": "mse", "T": 4.0,
                         "kd_weight": 0.0}}
    #: each setting's kind and range, checked before anything is built (lakd.settings; plain data)
    SETTINGS = {
        "srrl.ce_weight": {"kind": "number", "ge": 0},
        "srrl.feat_weight": {"kind": "number", "ge": 0},
        "srrl.logit_weight": {"kind": "number", "ge": 0},
        "srrl.logit_loss": {"kind": "choice", "choices": ["mse", "kl"]},
        "srrl.T": {"kind": "number", "gt": 0, "about": "the temperature of logit_loss=kl and of kd_weight's KD term"},
        "srrl.kd_weight": {"kind": "number", "ge": 0, "about": "a KD term's weight (0: none)"},
    }
    #: checks over several settings, or a setting and the run (lakd.settings)
    CHECKS = [
        {"rule": "not_all_zero", "keys": ["srrl.ce_weight", "srrl.feat_weight", "srrl.logit_weight", "srrl.kd_weight"]},
        {"rule": "compare", "key": "@smallest_batch", "op": ">=", "than": 2, "about":
            "its connector's BatchNorm on the pooled embedding needs two images per step"},
    ]

    def requirements(self):
        # the teacher's classifier must read the pooled embedding and give the logits (an adapted network may lack one)
        return {"student": (), "teacher": ("classifier",)}

    def __init__(self, student, teacher, cfg, num_data=0):
        super().__init__(student, teacher, cfg, num_data)
        s = self.section("srrl")
        self.ce_weight, self.feat_weight = float(s["ce_weight"]), float(s["feat_weight"])
        self.logit_weight = float(s["logit_weight"])
        self.logit_loss, self.T = s["logit_loss"], float(s["T"])
        self.kd_weight = float(s["kd_weight"])
        d_s, d_t = student.feature_info()["embedding_dim"], teacher.feature_info()["embedding_dim"]
        in_features = getattr(teacher.classifier, "in_features", d_t)
        if in_features != d_t:
            raise LakdError(f"SRRL feeds the teacher's classifier with the {d_t}-wide pooled embedding, but the "
                            f"classifier takes {in_features} inputs; name the linear layer that reads the pooled "
                            f"map with teacher.classifier=<module path>")
        self.connector = Conv1x1BN(d_s, d_t, relu=True)

    def teacher_pass(self, image, **batch):
        logits, feats = self.teacher_forward(image, features=True)
        return feats["embedding"], logits

    def student_losses(self, image, target, t_out, **batch):
        h_t, z_t = t_out
        logits, feats = self.student(image, features=True)
        h_s = self.connector(feats["embedding"][:, :, None, None]).flatten(1)
        z_s = self.teacher.classifier(h_s)  # frozen weights; the gradient reaches h_s
        with torch.autocast(device_type=h_s.device.type, enabled=False):
            feat = F.mse_loss(h_s.float(), h_t.float())
            if self.logit_loss == "mse":
                reg = F.mse_loss(z_s.float(), z_t.float())
            else:
                reg = kd_loss(z_s, z_t, self.T)
        losses = {"ce": self.ce_weight * F.cross_entropy(logits, target),
                  "srrl_feat": self.feat_weight * feat, "srrl_logit": self.logit_weight * reg}
        if self.kd_weight:
            losses["kd"] = self.kd_weight * kd_loss(logits, z_t, self.T)
        return logits, losses
