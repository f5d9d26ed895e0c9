"""Training without a teacher (the baseline, and how teachers are trained)."""
from __future__ import annotations

import torch.nn.functional as F

from .base import Distiller, register_distiller


@register_distiller("scratch")
class Scratch(Distiller):
    display_name = "Student"
    report_order = 0
    bench_default = True
    cost_reference = True
    needs_teacher = False

    def student_losses(self, image, target, teacher_out=None, **batch):
        logits = self.student(image)
        return logits, {"ce": F.cross_entropy(logits, target)}
