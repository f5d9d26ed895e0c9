"""The one small interface every distillation method implements (after mdistiller's ``Distiller``).

A distiller owns the student, the frozen teacher and any extra learnable parts (connectors, embeddings,
memory banks). The trainer only calls:

- ``train_step(batch, backward)``: one training step's forward and backward passes. The default runs
  ``forward_train`` (``teacher_pass`` first, then ``student_losses``: every method runs the teacher before the
  student) and calls ``backward(sum of losses)`` once; a method that needs several backward passes
  (LAKD's local modules) overrides it and calls ``backward`` per loss. ``backward`` applies AMP loss scaling,
  so no method deals with it.
- ``forward(image)``: the student's logits (evaluation; the teacher and extra parts are not used).
- ``trainable_parameters()``, ``extra_state_dict()`` / ``load_extra_state_dict()``, ``set_epoch()``.
- ``prepare(train_loader, device)``: a method's own stage before distillation (FT's paraphraser pre-training,
  AB's and FSP's initialisation of the student), called once before the first epoch of a fresh run; a resumed
  run skips it (its result is in the checkpoint: the student's weights and ``extra_state_dict``). The default
  does nothing.
- ``build_optimizer(params, solver_cfg)``: a method that changes the optimizer (DOT) returns it; default ``None``
  (the engine's SGD).
- ``trainable_groups()``: the parameters each backward pass of a step trains (one group by default; LAKD one
  per local module). Multi-process runs wrap each group in ``DistributedDataParallel`` (``lakd.engine.step``)
  and the method runs that pass's forward through ``call_group``, so that DDP sees the forward of the
  backward it reduces.

What reports, benchmarks and analyses need to know about a method is declared here, on the method class
(``display_name``, ``report_order``, ``variants``, ``analysis_points``), so no code outside this package
names a method or keeps a list of them. So is what it needs from the data beyond the batch image: ``views(cfg)``,
the extra per-sample views (SSKD's rotated copies, MLKD's strong view) the engine asks the data pipeline for.
"""
from __future__ import annotations

import fnmatch
import logging
import random
from collections.abc import Callable

import torch
import torch.nn as nn

from ..errors import LakdError
from ..models.base import FeatureNet, _buffers_kept
from ..registry import DISTILLERS
from ..runtime import distributed as dist
from ..settings import check_settings, run_facts
from .stage_utils import head_modules

log = logging.getLogger(__name__)


def register_distiller(name: str):
    def deco(cls):
        cls.name = name
        return DISTILLERS.register(name)(cls)

    return deco


class Distiller(nn.Module):
    name = "base"
    #: config sections this method owns, with their defaults, e.g. {"kd": {"T": 4.0}}
    DEFAULTS: dict = {}
    #: each setting's kind and range, as plain data: ``"section.key"`` -> a spec such as
    #: ``{"kind": "number", "gt": 0, "about": "the temperature"}`` (``lakd.settings`` reads and checks them)
    SETTINGS: dict = {}
    #: checks over several settings, or a setting and a fact of the run, as plain data (``lakd.settings``), e.g.
    #: ``{"rule": "not_all_zero", "keys": ["kd.ce_weight", "kd.kd_weight"]}``
    CHECKS: list = []
    needs_teacher = True
    #: how papers and tables write the method (default: its registered name)
    display_name = ""
    #: row position in result tables (the paper's Table 1 order); methods without one come last but before
    #: the proposed method
    report_order = 9_999
    #: named variants for benchmarks: name -> config overrides, e.g. {"lakd_joint": ["sdm.backward=joint"]}
    variants: dict[str, list[str]] = {}
    #: part of ``lakd bench``'s default method list (the paper's Table 4)
    bench_default = False
    #: which of ``variants`` join that default list with it (None: all; KD's ``kd_ls`` does not)
    bench_variants: tuple[str, ...] | None = None
    #: the reference the benchmarks divide by (``ratio_to_scratch``): training without distillation
    cost_reference = False

    #: what the method needs from the student and teacher beyond logits and features, checked at construction
    #: (``FeatureNet.missing``): ``"class_maps"`` (a classifier for class activation maps), ``"preact"``
    #: (pre-activation stage outputs). Needs that depend on the run's settings: ``requirements``.
    needs: tuple[str, ...] = ()

    #: trainable parameters a training step may legitimately leave without a gradient (``fnmatch`` patterns on
    #: ``named_trainable_parameters`` names, e.g. ``"t_connector.*"`` for a part trained only in a pre-stage):
    #: the reachability check (``check_reachability``) does not report them
    unreached_ok: tuple[str, ...] = ()

    @classmethod
    def views(cls, cfg: dict) -> dict[str, dict]:
        """The extra views of every training image a run of this method with config ``cfg`` needs from the data
        pipeline, as plain data: ``{name: spec}`` (``lakd.data.views`` says what a spec holds: own or shared crop
        and flip, quarter turns, RandAugment, Cutout). The engine passes them to the data builder, which makes them
        per sample (in the DataLoader workers, or batched on the device); every training batch then carries
        ``batch["views"][name]``, shaped and normalised like ``batch["image"]``. Default: none."""
        return {}

    def random_views(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        """Random stand-ins ``{name: tensor like image}`` for the views this run declares (``views``): for a step
        without data (the reachability check, cost benchmarks). Empty for methods without views."""
        return {name: torch.randn_like(image) for name in self.views(self.cfg)}

    def batch_view(self, name: str, image: torch.Tensor, views: dict | None, or_else: str = "") -> torch.Tensor:
        """The training batch's view ``name`` (``batch["views"][name]``, which the data pipeline makes per sample as
        ``views`` declares), in ``image``'s memory format; a one-line error where the batch lacks it or it does not
        match the batch (``or_else``: what else the user can do, e.g. a setting that needs no view)."""
        view = (views or {}).get(name)
        if view is None:
            spec = self.views(self.cfg).get(name, {})
            made = ", ".join(k if v is True else f"{k} {v}" for k, v in spec.items()) or "as declared"
            raise LakdError(f"{self.name} trains on a {name} view of every image ({made}) that the data pipeline "
                            f"makes (batch['views'][{name!r}]), but this batch has none; train through lakd (lakd "
                            f"train, lakd.build), or pass batch['views'] = {{{name!r}: images}} yourself"
                            + (f", or {or_else}" if or_else else ""))
        if view.shape != image.shape:
            raise LakdError(f"{self.name}: the {name} view {tuple(view.shape)} does not match the batch "
                            f"{tuple(image.shape)}; it must hold a view of each of the batch's images")
        if not image.is_contiguous() and image.is_contiguous(memory_format=torch.channels_last):
            view = view.contiguous(memory_format=torch.channels_last)
        return view

    @classmethod
    def uses_teacher(cls, cfg: dict) -> bool:
        """Whether a run of this method with config ``cfg`` (a run config, or a dict of some of its sections)
        distils from a teacher: ``needs_teacher``, unless one of the method's settings decides it (Tf-KD's
        ``tfkd.mode: self``)."""
        return cls.needs_teacher

    def requirements(self) -> dict[str, tuple]:
        """What this run needs from each model, checked at construction (before the method reads its settings):
        ``{"student": (...), "teacher": (...)}``, each entry a need of ``needs`` or ``(need, key, value)`` when
        the setting ``key=value`` asks for it (the error then names the setting and the key to change). Default:
        ``needs`` from both models."""
        return {"student": tuple(self.needs), "teacher": tuple(self.needs)}

    @classmethod
    def analysis_points(cls, cfg: dict) -> str:
        """Which of a trained student's block outputs analyses show by default (a ``parse_points`` spec:
        ``stages``, ``blocks`` or 1-based block indices such as ``1,4,9``), given its run config."""
        return "stages"

    def __init__(self, student: FeatureNet, teacher: FeatureNet | None, cfg: dict, num_data: int = 0):
        super().__init__()
        # the declared settings (SETTINGS, CHECKS), for distillers built without lakd.config.load_config; of the
        # run's facts only the training set's size: the batches of one's own loop are not the config's
        facts = {k: v for k, v in run_facts(cfg, num_data or None).items() if k == "@train_size"}
        check_settings(cfg, self.SETTINGS, self.CHECKS, self.DEFAULTS, facts, self.name)
        self.student = student
        self.teacher = teacher
        self.cfg = cfg
        self.epoch = 0
        self.total_epochs = int(cfg.get("solver", {}).get("epochs", 1))
        models = {"student": student, "teacher": teacher if self.needs_teacher else None}
        for role, needs in self.requirements().items():
            for need in needs if models[role] is not None else ():
                need, key, value = (need, None, None) if isinstance(need, str) else need
                why = models[role].missing(need) if hasattr(models[role], "missing") else None
                if why:
                    raise LakdError(f"method {self.name} needs {_NEEDS.get(need, need)} from the {role}"
                                    + (f" (for {key}={value})" if key else "") + f", but {why}"
                                    + (f" (or change {key})" if key else ""))
        if teacher is not None:
            for p in teacher.parameters():
                p.requires_grad_(False)
            teacher.eval()

    # ----- reachability: every trainable parameter gets a gradient from some loss ----------------------
    def unreached_parameters(self, image_size: int | None = None, num_classes: int | None = None,
                             batch_size: int = 2) -> list[str]:
        """Names of the trainable parameters (``named_trainable_parameters``, less ``unreached_ok``) that no loss
        of one training step reaches, found by one dry ``train_step`` on a random batch (``batch_size`` images of
        ``image_size``, default the student's) whose ``backward`` asks autograd which parameters each loss
        reaches (``torch.autograd.grad``: no ``.grad`` is written, no gradient hook fires). The step runs in
        training mode and leaves no trace: every buffer (BatchNorm statistics, CRD's memory banks and draw
        count), the RNG states and the train/eval mode are restored."""
        named = [(n, p) for n, p in self.named_trainable_parameters()
                 if not any(fnmatch.fnmatchcase(n, pat) for pat in self.unreached_ok)]
        if not named:
            return []
        params = [p for _, p in named]
        reached = [False] * len(params)

        def backward(loss: torch.Tensor, retain_graph: bool = False) -> None:
            if not loss.requires_grad:
                return
            grads = torch.autograd.grad(loss, params, allow_unused=True, retain_graph=retain_graph)
            for i, g in enumerate(grads):
                reached[i] = reached[i] or g is not None

        modes = [(m, m.training) for m in self.modules()]
        rng = (random.getstate(), torch.random.get_rng_state(),
               torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None)
        first = params[0]
        size = int(image_size or getattr(self.student, "input_size", 32))
        classes = int(num_classes or self.student.feature_info()["num_classes"])
        try:
            image = torch.randn(batch_size, 3, size, size, device=first.device)
            batch = {"image": image, "target": torch.arange(batch_size, device=first.device) % classes,
                     "index": torch.arange(batch_size, device=first.device)}
            views = self.random_views(image)
            if views:
                batch["views"] = views
            with _buffers_kept([self]), torch.enable_grad():
                self.train()
                self.dry_step(batch, backward)
        finally:
            for m, mode in modes:
                m.training = mode
            random.setstate(rng[0])
            torch.random.set_rng_state(rng[1])
            if rng[2] is not None:
                torch.cuda.set_rng_state_all(rng[2])
        return [n for (n, _), r in zip(named, reached) if not r]

    def check_reachability(self, image_size: int | None = None, num_classes: int | None = None) -> None:
        """Refuse (``LakdError``) a distiller that would leave trainable parameters at their initialisation for
        the whole run: those ``unreached_parameters`` names, a few of them and their count, and the fix."""
        missed = self.unreached_parameters(image_size, num_classes)
        if not missed:
            return
        shown = ", ".join(n.removeprefix("student.") for n in missed[:4]) + (", ..." if len(missed) > 4 else "")
        cuts = getattr(self.student, "cut_names", None)
        fix = (f"cut the student only where every path of the network passes (model.blocks, now "
               f"{list(cuts['blocks'])}; `lakd models --blocks NAME` lists the candidates), "
               if cuts and any(n.startswith("student.") for n in missed) else "")
        raise LakdError(f"method {self.name}: {len(missed)} trainable parameters get no gradient from any loss and "
                        f"would never train ({shown}); {fix}freeze them (requires_grad=False), or skip this check "
                        f"with train.check_reachability=false")

    # ----- config helpers ----------------------------------------------------------------------
    def section(self, name: str) -> dict:
        """This method's config section, defaults filled in."""
        out = dict(self.DEFAULTS.get(name, {}))
        out.update(self.cfg.get(name) or {})
        return out

    # ----- what a method implements -----------------------------------------------------------------
    def teacher_pass(self, image: torch.Tensor, **batch):
        """What this method needs from the teacher (no gradient): by default its logits. A method that needs
        features overrides this and returns only those it uses (a CAM, one hint map), so the teacher's other
        outputs are freed before the student runs. ``None`` without a teacher."""
        return None if self.teacher is None else self.teacher_forward(image)

    def student_losses(self, image: torch.Tensor, target: torch.Tensor, teacher_out, **batch):
        """The student's forward and the losses, given ``teacher_pass``'s result.
        Returns ``(student_logits, {loss_name: scalar tensor})``."""
        raise NotImplementedError

    def forward_train(self, image: torch.Tensor, target: torch.Tensor, **batch):
        """The teacher first, then the student (for every method, here and nowhere else): the teacher's forward
        temporaries are freed before the student's saved activations exist, so they never add to the step's
        peak memory (student first costs about +17% peak for KD at the allocator). Returns
        ``(student_logits, {loss_name: scalar tensor})``."""
        teacher_out = self.teacher_pass(image, **batch)
        return self.student_losses(image, target, teacher_out, **batch)

    def dry_step(self, batch: dict, backward: Callable[..., None]):
        """The step the reachability check runs (``unreached_parameters``): ``train_step`` by default. A method
        whose ``train_step`` needs more than the model (DOT steps the optimizer it built) overrides it with the
        same forward and backward passes."""
        return self.train_step(batch, backward)

    def train_step(self, batch: dict, backward: Callable[[torch.Tensor], None]):
        """One step's forward and backward. Returns ``(detached logits, {loss_name: detached tensor})``."""
        logits, losses = self.call_group(0, self.forward_train, **batch)
        backward(sum(losses.values()))
        return logits.detach(), {k: v.detach() for k, v in losses.items()}

    def prepare(self, train_loader, device: torch.device | str | None = None) -> None:
        """The method's stage before distillation, run once on a fresh run (default: none).

        The trainer calls it before the first epoch (never on resume). Users of ``lakd.distiller`` call
        ``d.prepare(loader)`` themselves before their own loop; ``loader`` yields ``{"image", "target"}`` dicts
        or ``(image, target, ...)`` tuples, moved to ``device`` (default: the distiller's). The stage's length and
        learning rate are settings of the method (e.g. ``ft.pretrain_epochs``); it trains with its own SGD
        optimizer (the run's ``solver.momentum`` and ``solver.weight_decay``), in fp32."""

    def feature_parameters(self) -> list[nn.Parameter]:
        """The student's trainable parameters without its head (RepDistiller's ``get_feat_modules``: the stem and
        the blocks): what an initialisation stage on features trains. The head (``stage_utils.head_modules``: the
        classifier and what runs between the last block and it, e.g. WRN's final BatchNorm) is left out, as in
        RepDistiller, whose stage keeps it frozen in eval mode (``run_stage``'s ``eval_modules``); under torchrun a
        parameter without a gradient would still be decayed."""
        head = {id(p) for m in head_modules(self.student) for p in m.parameters(recurse=False)}
        return [p for p in self.student.parameters() if p.requires_grad and id(p) not in head]

    def run_stage(self, train_loader, device, params: list, loss_fn: Callable, epochs: int, lr: float,
                  what: str, milestones: tuple[int, ...] = (), gamma: float = 0.1,
                  eval_modules: tuple[nn.Module, ...] | list[nn.Module] = ()) -> None:
        """A pre-training stage shared by the methods that have one: ``epochs`` passes over ``train_loader``
        minimising ``loss_fn(image, target)`` (``loss_fn(image, target, views=...)`` for a method with ``views``)
        over ``params`` with SGD at the rate ``lr`` (RepDistiller's ``init``: constant), times ``gamma`` at each of
        ``milestones`` (0-based epochs from which it applies, as a ``MultiStepLR`` stepped once per epoch),
        gradients averaged over processes under torchrun. Everything runs in training mode but ``eval_modules``
        (e.g. the student's head, which RepDistiller's stage keeps in eval mode: its BatchNorm statistics stay as
        they are). Logs one line per epoch."""
        if epochs <= 0 or not params:
            return
        device = torch.device(device) if device is not None else next(self.student.parameters()).device
        sol = self.cfg.get("solver", {}) or {}
        opt = torch.optim.SGD(params, lr=lr, momentum=float(sol.get("momentum", 0.9)),
                              weight_decay=float(sol.get("weight_decay", 5e-4)))
        # under torchrun the stage's gradients are averaged by a DistributedDataParallel around its parameters
        step = StepGroup(loss_fn, params)
        if dist.is_enabled():
            step = dist.data_parallel(step, device)
        modes = [(m, m.training) for m in self.modules()]
        self.train()
        for m in eval_modules:
            m.eval()
        try:
            self._stage_epochs(train_loader, device, opt, step, epochs, lr, what, milestones, gamma)
        finally:
            for m, mode in modes:
                m.training = mode

    def _stage_epochs(self, train_loader, device, opt, step, epochs, lr, what, milestones, gamma) -> None:
        for epoch in range(epochs):
            if hasattr(train_loader, "set_epoch"):
                train_loader.set_epoch(epoch)
            for group in opt.param_groups:
                group["lr"] = lr * gamma ** sum(epoch >= m for m in milestones)
            total, count = 0.0, 0
            for batch in train_loader:
                image, target = (batch["image"], batch["target"]) if isinstance(batch, dict) else batch[:2]
                image, target = image.to(device), target.to(device)
                extra = {}  # a method with views (``views``) gets the batch's: ``loss_fn(image, target, views=...)``
                if isinstance(batch, dict) and self.views(self.cfg):
                    extra["views"] = {k: v.to(device) for k, v in (batch.get("views") or {}).items()}
                opt.zero_grad(set_to_none=True)
                loss = step(image, target, **extra)
                loss.backward()
                opt.step()
                total, count = total + float(loss.detach()) * image.shape[0], count + image.shape[0]
            if count == 0:
                raise LakdError(f"the {what} stage of {self.name} got no batch from the training loader")
            log.info("%s %s stage: epoch %d/%d loss %.4f", self.name, what, epoch + 1, epochs, total / count)

    def build_optimizer(self, params, solver_cfg: dict) -> torch.optim.Optimizer | None:
        """The optimizer of ``params`` for a method that changes it (DOT's two momenta), given ``cfg["solver"]``
        (the lr is set per step in its param groups); ``None`` (the default): the engine's SGD."""
        return None

    # ----- shared machinery -----------------------------------------------------------------------------
    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.student(image)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()  # the teacher always runs in eval mode (BN statistics frozen)
        return self

    @torch.no_grad()
    def teacher_forward(self, image: torch.Tensor, **kw):
        return self.teacher(image, **kw)

    def set_epoch(self, epoch: int, total_epochs: int) -> None:
        self.epoch, self.total_epochs = epoch, total_epochs

    def named_trainable_parameters(self):
        return [(n, p) for n, p in self.named_parameters() if not n.startswith("teacher.") and p.requires_grad]

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for _, p in self.named_trainable_parameters()]

    # ----- the units of a step's backward passes (multi-process: one DistributedDataParallel each) -----------
    def trainable_groups(self) -> list[StepGroup]:
        """One ``StepGroup`` per backward pass of ``train_step``, in the order the passes run; every trainable
        parameter that receives a gradient belongs to exactly one. Default: one group, ``forward_train`` over
        all trainable parameters (student and extra parts). A method with several backward passes overrides
        this (LAKD: one per local module) and calls ``call_group(i, fn, ...)`` for pass ``i``'s forward."""
        return [StepGroup(self.forward_train, self.trainable_parameters())]

    def call_group(self, i: int, fn: Callable, *args, **kwargs):
        """Run ``fn(*args, **kwargs)``, the forward of backward pass ``i``: directly, or through the wrapper of
        group ``i`` that ``use_group_wrappers`` installed (a DistributedDataParallel, whose forward must run for
        its gradient reduction to fire in the backward that follows)."""
        wrappers = self.__dict__.get("_group_wrappers")
        return fn(*args, **kwargs) if wrappers is None else wrappers[i](*args, **kwargs)

    def use_group_wrappers(self, wrappers: list[nn.Module] | None) -> None:
        """Route ``call_group(i, ...)`` through ``wrappers[i]`` (whose forward runs group ``i``'s function);
        None: run the functions directly again. The wrappers are not registered as submodules (state dicts and
        parameters stay the distiller's own)."""
        self.__dict__["_group_wrappers"] = None if wrappers is None else list(wrappers)

    def extra_state_dict(self) -> dict:
        """State of the parts that are neither the student nor the teacher (connectors, banks)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith(("student.", "teacher."))}

    def load_extra_state_dict(self, sd: dict) -> None:
        own = self.extra_state_dict()
        missing = [k for k in own if k not in sd]
        if missing:
            raise LakdError(f"the checkpoint lacks the {self.name} method's state {missing[:3]}; was it written by a "
                            f"run of another method or config? resume with that run's own config.yaml")
        self.load_state_dict({**{f"student.{k}": v for k, v in self.student.state_dict().items()},
                              **({f"teacher.{k}": v for k, v in self.teacher.state_dict().items()}
                                 if self.teacher is not None else {}),
                              **sd}, strict=True)


class StepGroup(nn.Module):
    """The parameters one backward pass trains, and the function whose output that pass backpropagates (this
    module's forward). The parameters are the distiller's own objects (registered here too, not copied), so a
    ``DistributedDataParallel`` around the group reduces exactly their gradients."""

    def __init__(self, fn: Callable, params):
        super().__init__()
        self.params = nn.ParameterList(params)
        self.__dict__["fn"] = fn  # a bound method of the distiller: kept out of the module tree

    def forward(self, *args, **kwargs):
        return self.fn(*args, **kwargs)


_NEEDS = {"features": "feature maps and their pooled embedding (the classifier's input)",
          "class_maps": "class activation maps (a linear classifier on a pooled map or on averaged patch tokens)",
          "preact": "pre-activation stage outputs",
          "heads": "a class head and a distillation head whose mean is its output",
          "classifier": "a linear classifier that reads the pooled embedding and gives the logits"}
