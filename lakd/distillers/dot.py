"""DOT, the distillation-oriented trainer (Zhao et al., ICCV 2023): separate momenta for the KD and task gradients.

The loss is KD's (``ce_weight * CE + kd_weight * KL * T^2``), but the two parts are back-propagated separately
and SGD keeps one momentum buffer for each: the KD gradient with the larger momentum ``momentum + delta``, the
task (CE) gradient with the smaller ``momentum - delta`` (``momentum`` is ``solver.momentum``; the authors'
``delta`` is 0.075 with 0.9). For a parameter ``w`` with both gradients, per step (the authors' update)::

    v_task <- (m - delta) v_task + (g_ce + wd * w)        v_kd <- (m + delta) v_kd + g_kd
    w <- w - lr * v_task - lr * v_kd

(each buffer starts as its first gradient; weight decay goes with the task gradient; a parameter that gets only
one of the two gradients, such as a connector, uses the mean momentum ``m`` for it and its weight decay).
``DOTSGD`` is that optimizer; the method declares it through ``Distiller.build_optimizer`` and its ``train_step``
calls ``backward`` twice: the KD loss first (the optimizer stashes those gradients), then the CE loss; the
trainer's one ``optimizer.step()`` applies both. It is heavy-ball momentum as in the authors' code:
``solver.nesterov`` does not apply. The stashed gradients are not loss-scaled, so ``train.amp=fp16`` is refused
(bf16 needs no scaler and works); multi-process training is refused too (the stash would not be all-reduced).
"""
from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F

from ..errors import LakdError
from ..runtime import distributed as dist
from .base import Distiller, register_distiller
from .kd import kd_loss


class DOTSGD(torch.optim.Optimizer):
    """SGD with one momentum buffer for the stashed (KD) gradients and one for the current (task) gradients.

    Written here because torch's SGD has one buffer per parameter. Use: ``backward(kd_loss)``,
    ``stash_kd_gradients()``, ``backward(task_loss)``, ``step()``. The buffers are optimizer state
    (``momentum_buffer``, ``momentum_kd_buffer``), saved and restored by ``state_dict``."""

    def __init__(self, params, lr: float, momentum: float, momentum_kd: float, weight_decay: float = 0.0):
        for name, v in (("lr", lr), ("momentum", momentum), ("momentum_kd", momentum_kd),
                        ("weight_decay", weight_decay)):
            if v < 0:
                raise LakdError(f"DOT's {name} must be >= 0, got {v}")
        super().__init__(params, dict(lr=lr, momentum=momentum, momentum_kd=momentum_kd,
                                      weight_decay=weight_decay))
        self._kd_grads: dict[torch.Tensor, torch.Tensor] = {}

    @torch.no_grad()
    def stash_kd_gradients(self) -> None:
        """Move the current gradients aside as the KD gradients (``.grad`` is emptied for the task loss)."""
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._kd_grads[p] = p.grad
                    p.grad = None

    @staticmethod
    def _momentum(state: dict, key: str, d: torch.Tensor, m: float) -> torch.Tensor:
        buf = state.get(key)
        if buf is None:
            buf = state[key] = torch.clone(d).detach()
        else:
            buf.mul_(m).add_(d)
        return buf

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        kd = self._kd_grads
        for group in self.param_groups:
            lr, wd = group["lr"], group["weight_decay"]
            m_task, m_kd = group["momentum"], group["momentum_kd"]
            m_mean = (m_task + m_kd) / 2.0
            for p in group["params"]:
                g_kd = kd.get(p)
                if p.grad is not None:  # the task gradient
                    d = p.grad.add(p, alpha=wd) if wd else p.grad
                    buf = self._momentum(self.state[p], "momentum_buffer", d, m_task if g_kd is not None else m_mean)
                    p.add_(buf, alpha=-lr)
                if g_kd is not None:
                    if p.grad is None and wd:
                        g_kd = g_kd.add(p, alpha=wd)
                    buf = self._momentum(self.state[p], "momentum_kd_buffer", g_kd,
                                         m_kd if p.grad is not None else m_mean)
                    p.add_(buf, alpha=-lr)
        self._kd_grads = {}
        return loss


@register_distiller("dot")
class DOT(Distiller):
    """DOT (Zhao et al. ICCV 2023) distils as KD with separate SGD momenta for the KD and the task gradients.

    Settings (``dot``): ``ce_weight``, ``kd_weight``, ``T``, ``delta`` (momentum gap). It replaces the optimizer
    (``build_optimizer``): KD gradient momentum ``solver.momentum + delta``, task ``solver.momentum - delta``."""

    display_name = "DOT"
    report_order = 24
    DEFAULTS = {"dot": {"ce_weight": 0.1, "kd_weight": 0.9, "T": 4.0, "delta": 0.075}}
    #: each setting's kind and range, checked before anything is built (lakd.settings; plain data)
    SETTINGS = {
        "dot.ce_weight": {"kind": "number", "ge": 0},
        "dot.kd_weight": {"kind": "number", "ge": 0},
        "dot.T": {"kind": "number", "gt": 0, "about": "the temperature"},
        "dot.delta": {"kind": "number", "ge": 0, "about": "the gap between the two momenta; the authors': 0.075"},
    }
    #: checks over several settings, or a setting and the run (lakd.settings)
    CHECKS = [
        {"rule": "not_all_zero", "keys": ["dot.ce_weight", "dot.kd_weight"]},
    ]

    def __init__(self, student, teacher, cfg, num_data=0):
        super().__init__(student, teacher, cfg, num_data)
        s = self.section("dot")
        self.ce_weight, self.kd_weight, self.T = float(s["ce_weight"]), float(s["kd_weight"]), float(s["T"])
        self.delta = float(s["delta"])
        if (cfg.get("train") or {}).get("amp") == "fp16":
            raise LakdError("dot does not support train.amp=fp16 (its stashed KD gradients are not loss-scaled); "
                            "use train.amp=bf16 or none")
        self._optimizer = None

    def build_optimizer(self, params, solver_cfg: dict) -> torch.optim.Optimizer:
        if dist.is_enabled():
            raise LakdError("dot runs in one process only (its stashed KD gradients are not all-reduced); "
                            "train it without torchrun")
        m = float(solver_cfg.get("momentum", 0.9))
        if m - self.delta < 0 or m + self.delta >= 1:
            raise LakdError(f"dot.delta={self.delta} with solver.momentum={m} gives momenta {m - self.delta:g} and "
                            f"{m + self.delta:g}; both must lie in [0, 1) (the authors': 0.9 and 0.075)")
        opt = DOTSGD(params, lr=float(solver_cfg.get("lr", 0.05)), momentum=m - self.delta,
                     momentum_kd=m + self.delta, weight_decay=float(solver_cfg.get("weight_decay", 0.0)))
        self._optimizer = weakref.ref(opt)
        return opt

    def student_losses(self, image, target, t_logits, **batch):
        logits = self.student(image)
        return logits, {
            "ce": self.ce_weight * F.cross_entropy(logits, target),
            "kd": self.kd_weight * kd_loss(logits, t_logits, self.T),
        }

    def dry_step(self, batch, backward):
        # the reachability check runs before the optimizer exists: the same two backward passes, nothing stashed
        logits, losses = self.forward_train(**batch)
        backward(losses["kd"], retain_graph=True)
        backward(losses["ce"])
        return logits.detach(), {k: v.detach() for k, v in losses.items()}

    def train_step(self, batch, backward):
        opt = self._optimizer() if self._optimizer is not None else None
        if opt is None:
            raise LakdError("dot trains with its own optimizer: build it with "
                            "distiller.build_optimizer(distiller.trainable_parameters(), solver_cfg) (lakd.build "
                            "does) and step that one")
        logits, losses = self.forward_train(**batch)
        try:  # the KD loss first, keeping the graph for the CE loss's pass
            backward(losses["kd"], retain_graph=True)
        except TypeError as e:
            raise LakdError("dot back-propagates twice through one forward: its backward callable must take "
                            "retain_graph, e.g. backward=lambda loss, **kw: loss.backward(**kw)") from e
        opt.stash_kd_gradients()
        backward(losses["ce"])
        return logits.detach(), {k: v.detach() for k, v in losses.items()}
