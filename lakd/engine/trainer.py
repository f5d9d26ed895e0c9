"""The trainer: one loop for every method (no per-method branches).

It builds data, student, teacher and distiller from a config, runs SGD with the configured schedule,
evaluates (top-1, top-5, loss and, with a teacher, EK), and writes the run folder: ``config.yaml``,
``metrics.jsonl``, ``tb/`` (TensorBoard), ``last.pt``/``best.pt`` (atomic) and ``summary.json``.
A method's backward passes go through the ``backward`` callable that ``engine.step.training_step`` hands
to the distiller's ``train_step`` (AMP loss scaling included).

Progress lines (the run banner, one line per epoch, resume notices) go to ``logging.getLogger("lakd.engine
.trainer")`` at INFO level: the ``lakd`` command shows them; from Python configure or silence the ``lakd``
logger. The tqdm bar (``train.progress``, on a terminal only) stays a console widget.
"""
from __future__ import annotations

import itertools
import json
import logging
import math
import os
import re
import sys
import time

import torch

from .. import __version__
from .. import config as config_mod
from ..errors import LakdError
from ..models import read_checkpoint
from ..runtime import distributed as dist
from ..runtime import threads
from ..runtime.device import device_kind, resolve_device, tune_cpu_allocator
from ..runtime.seeding import rng_state, seed_everything, set_rng_state
from . import rundir
from .build import build
from .checkpoint import atomic_save
from .metrics import evaluate, read_metrics, topk_correct
from .schedule import lr_at
from .step import prepare_distributed, training_step

log = logging.getLogger(__name__)


def versions() -> str:
    """What wrote a run, for its files: ``lakd X, torch Y``."""
    return f"lakd {__version__}, torch {torch.__version__}"


class Trainer:
    """``overwrite``: replace a finished run in the folder (never a live one); ``allow_config_change``: let
    ``resume=`` continue with a config that differs from the checkpoint's (the change is recorded in
    ``config_changes.jsonl``); ``from_best``: with ``resume=``, continue from the run's ``best.pt`` when its
    ``last.pt`` cannot be read (the epochs after the best one are trained again).

    Resuming never replaces a run file the user edited without saying so: a finished run (its ``summary.json``
    there, every epoch done) is left as it is; a ``config.yaml`` that differs from the config the run wrote is
    kept beside the new one (``config.edited.yaml``), a ``summary.json`` that a longer run replaces is kept as
    ``summary.previous.json``, each with a warning line."""

    def __init__(self, cfg: dict, run_dir: str | None = None, quiet: bool = False, overwrite: bool = False,
                 allow_config_change: bool = False, from_best: bool = False):
        self.cfg = cfg
        t = cfg["train"]
        self.dist = dist.init_from_env(device_kind(cfg["device"]), timeout_s=float(t["dist_timeout_s"]))
        self.device = resolve_device(str(cfg["device"]), self.dist.local_rank)
        self.quiet = quiet or not self.dist.is_main
        if t.get("threads"):
            torch.set_num_threads(int(t["threads"]))
        if t.get("deterministic"):  # bitwise-reproducible GPU runs (CPU runs are already)
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.backends.cudnn.benchmark = False
            torch.use_deterministic_algorithms(True, warn_only=True)
        seed_everything(int(cfg["seed"]))

        # data, models, distiller, optimizer and scaler: the one build path (engine.build)
        parts = build(cfg, self.device, self.dist.rank, self.dist.world_size, warn=not quiet and self.dist.is_main)
        self.data, self.distiller = parts.data, parts.distiller
        if t.get("compile"):
            self._compile()
        dist.broadcast_module(self.distiller)
        # multi-process: one DistributedDataParallel per backward pass of the method's step (engine.step)
        self.ddp = prepare_distributed(self.distiller, self.device)
        self.params, self.optimizer, self.scaler = parts.params, parts.optimizer, parts.scaler
        self.amp_dtype, self.amp, self.channels_last = parts.amp_dtype, parts.amp, parts.channels_last
        self.malloc_tuned = tune_cpu_allocator(t.get("malloc", "auto"), self.device,
                                               int(cfg["solver"]["batch_size"]) // max(self.dist.world_size, 1))
        self.start_epoch = 0
        self.best_top1 = -1.0
        self.best_epoch = 0
        self.wall_time = 0.0
        self.history: list[dict] = []
        self.finished = False  # resumed a run that had already finished: nothing to train, nothing to write
        self._stored_config: dict | None = None  # the config in the checkpoint resumed from

        # --- run folder: claimed by rank 0 (exclusive creation + lock, see engine/rundir.py) ---
        self.run: rundir.RunDir | None = None
        self.writer = None
        self.run_dir = self._claim_run_dir(run_dir, overwrite)
        try:
            if cfg.get("resume"):
                self._resume(cfg["resume"], allow_config_change, from_best)
            if self.dist.is_main and not self.finished:
                self._keep_edited_config()
                # the file must start a fresh run when re-used, so the resume pointer is left out
                self._write_file(rundir.CONFIG, f"# {versions()}: this run's resolved config\n"
                                 + config_mod.dump_config({**cfg, "resume": None}))
            self.teacher_correct, self.teacher_top1 = self._teacher_eval()
            self._warn_chance_teacher()
        except BaseException:
            self.close(failed=True)
            raise

    # ------------------------------------------------------------------------------------------------
    def _claim_run_dir(self, run_dir: str | None, overwrite: bool) -> str:
        cfg = self.cfg
        path = err = None
        if self.dist.is_main:
            try:
                resume = cfg.get("resume")
                if resume:
                    folder = os.path.dirname(resume) if resume.endswith(".pt") else resume
                    same = run_dir is None or os.path.realpath(run_dir) == os.path.realpath(folder)
                    self.run = (rundir.claim(folder, folder, resume=True) if same
                                else rundir.claim(run_dir, run_dir, overwrite=overwrite))
                else:
                    self.run = rundir.claim(run_dir, os.path.join(cfg["output_dir"], cfg["experiment"]),
                                            overwrite=overwrite)
                path = self.run.path
            except LakdError as e:
                err = str(e)
        # every rank learns the folder, or the reason there is none (so no rank waits for a failed rank 0)
        path, err = dist.broadcast_object((path, err))
        if err:
            raise LakdError(err)
        return path

    def _write_file(self, name: str, text: str, mode: str = "w") -> None:
        try:
            with open(os.path.join(self.run_dir, name), mode) as f:
                f.write(text)
        except OSError as e:
            raise rundir.write_error(self.run_dir, e, f"{name} in the run folder") from None

    def close(self, failed: bool = False) -> None:
        """Close TensorBoard and release the run folder's lock; after a failed start (no checkpoint written in
        a folder this run created) the folder is removed, so that it does not look like an incomplete run."""
        if self.writer is not None:
            try:
                self.writer.close()
            except OSError:
                pass
            self.writer = None
        if self.run is not None:
            if failed:
                self.run.discard()
            else:
                self.run.release()
            self.run = None

    def resume_command(self) -> str:
        return f"lakd train {os.path.join(self.run_dir, rundir.CONFIG)} resume={self.run_dir}"

    def _compile(self) -> None:
        """``torch.compile`` every block module in place (works with LAKD's local backward too)."""
        import torch._dynamo

        c = torch._dynamo.config  # one graph per block: raise the recompile limit so none falls back to eager
        name = "recompile_limit" if hasattr(c, "recompile_limit") else "cache_size_limit"
        setattr(c, name, max(getattr(c, name), 256))
        for model in (self.distiller.student, self.distiller.teacher):
            if model is None:
                continue
            for i in range(model.num_blocks):
                for m in model.block_modules(i):
                    m.compile()

    def _read_resume_checkpoint(self, ck_path: str, from_best: bool) -> tuple[dict, str]:
        """The checkpoint to resume from: ``ck_path``, or the run's ``best.pt`` when ``last.pt`` cannot be read and
        ``from_best`` is set (without it, the error names ``best.pt`` and the flag)."""
        try:
            return read_checkpoint(ck_path), ck_path
        except LakdError as e:
            best = os.path.join(os.path.dirname(ck_path), rundir.BEST)
            if os.path.basename(ck_path) != rundir.LAST or not os.path.exists(best):
                raise
            try:
                ck = read_checkpoint(best)
            except LakdError:
                raise e from None  # both unreadable: the error about last.pt stands
            why = "it is corrupt or truncated" if "corrupt or truncated" in str(e) else str(e)
            epoch = ck.get("epoch", "?")
            if not from_best:
                raise LakdError(f"cannot resume from {ck_path!r}: {why}; the run's {rundir.BEST} (epoch {epoch}) is "
                                f"intact: continue from it with --from-best (the epochs after {epoch} are trained "
                                f"again), e.g. {self.resume_command()} --from-best") from None
            if self.dist.is_main:
                log.warning("%s cannot be read (%s); resuming from %s (epoch %s) as --from-best asks: the epochs after "
                            "it are trained again and the next save replaces %s", ck_path, why, best, epoch,
                            rundir.LAST)
            return ck, best

    def _edits(self, path: str) -> list[str]:
        """How the run file ``path`` (a config.yaml) differs from the config the run wrote (the checkpoint's):
        ``["key: stored -> file", ...]``, ``["it cannot be read as YAML"]``, or ``[]`` when it is the run's own."""
        try:
            with open(path, encoding="utf-8") as f:
                data = config_mod.yaml_load(f)
        except (OSError, UnicodeDecodeError, ValueError, Exception) as e:  # yaml raises its own YAMLError
            return [f"it cannot be read ({type(e).__name__})"]
        if not isinstance(data, dict):
            return ["it does not hold a mapping of keys"]
        a = config_mod._flatten({**self._stored_config, "resume": None})
        b = config_mod._flatten({**data, "resume": None})
        return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b))
                if not config_mod._same(a.get(k), b.get(k))]

    def _keep_edited_config(self) -> None:
        """Before a resumed run writes its config.yaml: a config.yaml edited since the run wrote it is kept (renamed
        to config.edited.yaml, or config.edited-N.yaml), with a warning naming what differs."""
        path = os.path.join(self.run_dir, rundir.CONFIG)
        if self._stored_config is None or not os.path.isfile(path):
            return
        edits = self._edits(path)
        if not edits:
            return
        keep = _free_name(self.run_dir, "config.edited", ".yaml")
        try:
            os.replace(path, keep)
        except OSError as e:
            raise rundir.write_error(self.run_dir, e, "config.edited.yaml in the run folder") from None
        log.warning("%s was edited after the run wrote it (%s%s); it is kept as %s, and %s now holds the config this "
                    "run continues with", path, "; ".join(edits[:3]), f" and {len(edits) - 3} more" if len(edits) > 3
                    else "", keep, rundir.CONFIG)

    def _resume(self, path: str, allow_config_change: bool = False, from_best: bool = False) -> None:
        ck_path = path if path.endswith(".pt") else os.path.join(path, rundir.LAST)
        best = os.path.join(os.path.dirname(ck_path), rundir.BEST)
        if not os.path.exists(ck_path) and not path.endswith(".pt") and os.path.exists(best):
            ck_path = best  # last.pt lost (deleted, or a kill before its first save): best.pt holds a full state
            if not self.quiet:
                log.info("%s is missing; resuming from %s", os.path.join(path, rundir.LAST), best)
        if not os.path.exists(ck_path) and not path.endswith(".pt") and os.path.isfile(
                os.path.join(path, rundir.CONFIG)) and not os.path.exists(os.path.join(path, rundir.SUMMARY)):
            # a run stopped before its first checkpoint: nothing to continue, so it starts again from epoch 1
            if not self.quiet:
                log.info("%s holds no checkpoint (the run stopped before its first save); starting it from epoch 1",
                         path)
            if self.run is not None and os.path.realpath(self.run.path) == os.path.realpath(path):
                self.run.restart()
            return
        if not os.path.exists(ck_path):
            raise LakdError(f"cannot resume: {ck_path!r} does not exist; give the run folder of an earlier run")
        ck, ck_path = self._read_resume_checkpoint(ck_path, from_best)
        if "optimizer" not in ck:
            raise LakdError(f"cannot resume from {ck_path!r}: it holds weights only, not a training state")
        if ck.get("method") != self.cfg["method"] or ck.get("arch") != self.cfg["model"]["name"]:
            raise LakdError(f"cannot resume from {ck_path!r}: it is a {ck.get('method')} run of {ck.get('arch')}, "
                            f"the config asks for {self.cfg['method']} with {self.cfg['model']['name']}")
        changes = config_mod.config_changes(ck.get("config"), self.cfg)
        if changes and not allow_config_change:
            shown = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in list(changes.items())[:6])
            more = f" and {len(changes) - 6} more" if len(changes) > 6 else ""
            raise LakdError(f"cannot resume from {ck_path!r} with a different config ({shown}{more}); continue with "
                            f"the run's own config ({self.resume_command()}), or accept the change with "
                            f"--allow-config-change (it is recorded in the run folder)")
        try:
            self.distiller.student.load_state_dict(ck["model"])
            self.distiller.load_extra_state_dict(ck.get("distiller", {}))
            self.optimizer.load_state_dict(ck["optimizer"])
        except (KeyError, RuntimeError, ValueError) as e:
            raise LakdError(f"cannot resume from {ck_path!r}: it does not fit this config "
                            f"({str(e).strip().splitlines()[0][:160]}); resume with the run's own config.yaml "
                            f"(lakd train {os.path.join(self.run_dir, rundir.CONFIG)} resume={self.run_dir})") from None
        if ck.get("scaler"):
            self.scaler.load_state_dict(ck["scaler"])
        set_rng_state(ck["rng"])
        self.start_epoch = int(ck["epoch"])
        self.best_top1 = float(ck.get("best_top1", -1.0))
        self.best_epoch = int(ck.get("best_epoch", 0))
        self.wall_time = float(ck.get("wall_time_s", 0.0))
        self._stored_config = ck.get("config") if isinstance(ck.get("config"), dict) else None
        self.finished = (self.start_epoch >= int(self.cfg["solver"]["epochs"])
                         and os.path.exists(os.path.join(self.run_dir, rundir.SUMMARY)))
        if self.finished:  # nothing to train: every file of the run stays as it is
            self.history = [m for m in read_metrics(os.path.join(self.run_dir, rundir.METRICS))[0]
                            if isinstance(m, dict)]
            self._say_finished()
            return
        if changes and self.dist.is_main:
            record = {"epoch": self.start_epoch, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                      "changes": {k: {"from": a, "to": b} for k, (a, b) in changes.items()}}
            self._write_file("config_changes.jsonl", json.dumps(record) + "\n", mode="a")
            if not self.quiet:
                log.info("config changed on resume (%s); recorded in %s", ", ".join(changes),
                         os.path.join(self.run_dir, "config_changes.jsonl"))
        metrics = os.path.join(self.run_dir, rundir.METRICS)
        if os.path.exists(metrics) and self.dist.is_main:
            # drop lines written after the checkpoint (a kill between the log and the save; a torn line is skipped)
            lines, _ = read_metrics(metrics)
            self.history = [m for m in lines if isinstance(m, dict) and m.get("epoch", 1e9) <= self.start_epoch]
            with open(metrics, "w") as f:
                f.writelines(json.dumps(m) + "\n" for m in self.history)
        if not self.quiet:
            log.info("resumed %s at epoch %d", self.run_dir, self.start_epoch)

    def _say_finished(self) -> None:
        if not self.dist.is_main:
            return
        edited = ""
        if self._stored_config is not None and os.path.isfile(os.path.join(self.run_dir, rundir.CONFIG)):
            edits = self._edits(os.path.join(self.run_dir, rundir.CONFIG))
            if edits:
                edited = (f"; its {rundir.CONFIG} differs from the config the run wrote ({'; '.join(edits[:3])}"
                          f"{' and more' if len(edits) > 3 else ''})")
        log.warning("%s already finished at epoch %d of %d (its %s): nothing to continue, and its files are left as "
                    "they are%s; to train it longer, resume with a larger solver.epochs and --allow-config-change",
                    self.run_dir, self.start_epoch, int(self.cfg["solver"]["epochs"]), rundir.SUMMARY, edited)

    def _finished_summary(self) -> dict:
        """The summary of a run that had already finished: its summary.json as the run wrote it (not rewritten);
        one computed from the checkpoint and metrics when the file cannot be read (not written either)."""
        try:
            with open(os.path.join(self.run_dir, rundir.SUMMARY)) as f:
                summary = json.load(f)
            if isinstance(summary, dict):
                return {**self._summary(), **summary, "run_dir": self.run_dir}
        except (OSError, ValueError):
            pass
        return self._summary()

    @torch.no_grad()
    def _teacher_eval(self):
        teacher = self.distiller.teacher
        if teacher is None:
            return None, None
        res = evaluate(teacher, self.data.test, self.device, self.amp_dtype)
        return res["correct"], res["top1"]

    def _chance_teacher(self) -> str:
        """A phrase naming the teacher checkpoint when its top-1 is within 5 points of chance (100 / classes),
        else ''."""
        top1 = self.teacher_top1
        chance = 100.0 / max(int(self.cfg["model"]["num_classes"] or 1), 1)
        if top1 is None or top1 > chance + 5.0:
            return ""
        where = self.cfg["teacher"].get("checkpoint") or "no checkpoint: random weights"
        on = (f"on {self.data.num_test} of the {self.data.num_test_total} test images"
              if self.data.num_test_total > self.data.num_test else "on the test set")
        return f"the teacher ({where}) scores {top1:.2f}% top-1 {on}, near chance ({chance:.2g}%)"

    def _warn_chance_teacher(self) -> None:
        why = self._chance_teacher()
        if why and self.cfg["teacher"].get("checkpoint") and self.dist.is_main:
            log.warning("%s: it has not learnt the task (trained too briefly, or the wrong file or dataset), so "
                        "distilling from it teaches the student nothing and may diverge; check teacher.checkpoint",
                        why.upper()[:1] + why[1:])

    def _diverged_hint(self) -> str:
        why = self._chance_teacher()
        return f"; {why}, which may be the cause: check teacher.checkpoint" if why else ""

    # ------------------------------------------------------------------------------------------------
    def _checkpoint(self, epoch: int) -> dict:
        student = self.distiller.student
        return {
            "model": student.state_dict(),
            "arch": self.cfg["model"]["name"],
            "num_classes": self.cfg["model"]["num_classes"],
            "dataset": self.cfg["data"]["dataset"],
            "image_size": int(self.data.image_size),  # the size an adapted network was built for (a ViT's grid)
            "mean": list(self.data.mean),
            "std": list(self.data.std),
            "method": self.cfg["method"],
            "epoch": epoch,
            "config": self.cfg,
            "distiller": self.distiller.extra_state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "rng": rng_state(),
            "best_top1": self.best_top1,
            "best_epoch": self.best_epoch,
            "wall_time_s": self.wall_time,
            "lakd_version": __version__,
        }

    def train_epoch(self, epoch: int) -> dict:
        cfg = self.cfg
        loader = self.data.train
        loader.set_epoch(epoch)
        self.distiller.set_epoch(epoch, int(cfg["solver"]["epochs"]))
        self.distiller.train()
        steps = len(loader)
        if steps == 0:
            raise LakdError("the training set gives no batch: lower solver.batch_size or raise data.train_subset")
        sums: dict[str, torch.Tensor] = {}
        n_img = torch.zeros((), device=self.device, dtype=torch.float64)
        n_correct = torch.zeros_like(n_img)
        bar = None
        show = bool(cfg["train"].get("progress")) and not self.quiet
        log_every = max(int(cfg["train"].get("log_every", 50)), 1)
        if show:
            from tqdm import tqdm

            bar = tqdm(total=steps, desc=f"epoch {epoch + 1}/{cfg['solver']['epochs']}", leave=False,
                       dynamic_ncols=True, file=sys.stderr, disable=not sys.stderr.isatty())
        t0 = time.perf_counter()
        lr = 0.0
        for step, batch in enumerate(loader):
            lr = lr_at(cfg["solver"], epoch, step, steps)
            for g in self.optimizer.param_groups:
                g["lr"] = lr
            if self.channels_last:
                batch["image"] = batch["image"].contiguous(memory_format=torch.channels_last)
            logits, losses = training_step(self.distiller, self.optimizer, self.scaler, batch, self.amp_dtype)
            bs = batch["target"].shape[0]
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + v.float() * bs
            n_img += bs
            n_correct += topk_correct(logits.float(), batch["target"], ks=(1,))[0].sum()
            if show and (step % log_every == 0 or step + 1 == steps):
                total = sum(float(v) for v in losses.values())
                img_s = float(n_img) / (time.perf_counter() - t0)
                if bar is not None and not bar.disable:
                    bar.set_postfix(loss=f"{total:.3f}", img_s=f"{img_s:.0f}")
                else:  # no terminal (a log file): a plain line every train.log_every steps
                    log.info(f"  epoch {epoch + 1} step {step + 1}/{steps} loss {total:.4f} {img_s:.0f} img/s")
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        dist.average_norm_buffers(self.distiller)  # every rank evaluates and saves the same BN statistics
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        keys = sorted(sums)
        vec = torch.stack([n_img, n_correct] + [torch.as_tensor(sums[k], dtype=torch.float64,
                                                                device=self.device) for k in keys])
        vec = dist.all_reduce_sum(vec).tolist()
        n = max(vec[0], 1.0)
        losses_avg = {k: v / n for k, v in zip(keys, vec[2:])}
        if any(not math.isfinite(v) for v in losses_avg.values()):
            raise LakdError(f"training diverged at epoch {epoch + 1} (loss {losses_avg}); lower solver.lr or "
                            f"check the loss weights{self._diverged_hint()}")
        return {"lr": lr, "train_loss": sum(losses_avg.values()), "train_top1": 100.0 * vec[1] / n,
                "losses": losses_avg, "epoch_time_s": dt, "images_per_s": vec[0] / dt}

    def fit(self) -> dict:
        """Train to ``solver.epochs``; the run folder's lock is released at the end, whatever happens."""
        ok = False
        try:
            summary = self._fit()
            ok = True
            return summary
        except KeyboardInterrupt:
            if self.run is not None and self.run.has_checkpoint():
                epoch = self.history[-1]["epoch"] if self.history else self.start_epoch
                msg = f"the run stopped after epoch {epoch}; continue it with: {self.resume_command()}"
            else:
                msg = "the run stopped before its first checkpoint; nothing to continue (its folder was removed)"
            self.close(failed=True)
            raise KeyboardInterrupt(msg) from None
        except RuntimeError as e:  # a collective failed (gloo/NCCL timeout, a rank gone): which rank?
            if self.dist.enabled:
                self._name_stuck_ranks(e)
            raise
        finally:
            self.close(failed=not ok)

    def _name_stuck_ranks(self, err: RuntimeError) -> None:
        _, wait = dist.split_timeout(float(self.cfg["train"]["dist_timeout_s"]))
        ranks = dist.unresponsive_ranks(wait)
        if not ranks:
            return  # every rank answers (or it cannot be told): the original error stands
        who = ", ".join(str(r) for r in ranks)
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        first = re.sub(r"^\[[^\]]*\]\s*", "", first).split(". This is typically")[0][:160]  # gloo's source position
        lost = LakdError(f"rank {who} of {self.dist.world_size} stopped answering (rank {self.dist.rank} saw: "
                         f"{first}); check that process (killed, hung, stopped, out of memory?) and restart with "
                         f"resume={self.run_dir}; train.dist_timeout_s={self.cfg['train']['dist_timeout_s']} sets how "
                         f"long ranks wait for each other")
        lost.exit_now = True
        raise lost from None

    def _check_finite(self, epoch: int, ev: dict | None) -> None:
        """Stop before a checkpoint holds a diverged model (a NaN test loss, or non-finite weights)."""
        bad = ""
        if ev is not None and not math.isfinite(float(ev["loss"])):
            bad = f"the test loss is {ev['loss']}"
        else:
            for name, t in itertools.chain(self.distiller.named_parameters(), self.distiller.named_buffers()):
                if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                    bad = f"{name} holds non-finite values"
                    break
        if bad:
            last = os.path.join(self.run_dir, rundir.LAST)
            kept = (f"the last good checkpoint {last} is kept" if os.path.exists(last)
                    else "no checkpoint was written")
            raise LakdError(f"training diverged at epoch {epoch + 1}: {bad}; nothing of this epoch was saved and "
                            f"{kept}; lower solver.lr (now {self.cfg['solver']['lr']}) or check the loss weights"
                            f"{self._diverged_hint()}")

    def _rescue(self, epoch: int, err: OSError) -> None:
        """The run folder became unwritable: save the training state elsewhere, then stop with the way back."""
        import tempfile

        where = ""
        try:
            folder = tempfile.mkdtemp(prefix=f"lakd-rescue-{self.cfg['experiment']}-")
            atomic_save(self._checkpoint(epoch + 1), os.path.join(folder, rundir.LAST))
            where = (f"; the training state of epoch {epoch + 1} was saved to {folder}/last.pt: when the folder is "
                     f"writable again, copy it to {self.run_dir}/last.pt and continue with {self.resume_command()}")
        except OSError:
            pass
        raise LakdError(f"cannot write to the run folder {self.run_dir!r} at epoch {epoch + 1} "
                        f"({err.strerror or err}){where}") from None

    def _fit(self) -> dict:
        cfg = self.cfg
        epochs = int(cfg["solver"]["epochs"])
        if self.finished:
            return self._finished_summary()
        if self.dist.is_main and self.writer is None:
            from torch.utils.tensorboard import SummaryWriter

            try:
                self.writer = SummaryWriter(os.path.join(self.run_dir, "tb"))
            except OSError as e:
                raise rundir.write_error(self.run_dir, e, "TensorBoard's folder in the run folder") from None
        if not self.quiet:
            t = f", teacher {cfg['teacher']['name']} top-1 {self.teacher_top1:.2f}" if self.teacher_top1 else ""
            if t and self.data.num_test_total > self.data.num_test:  # data.test_subset: say over what
                t += f" on {self.data.num_test} of the {self.data.num_test_total} test images"
            log.info(f"run {self.run_dir}: {cfg['method']} -> {cfg['model']['name']} on {cfg['data']['dataset']} "
                     f"({self.data.num_train} train images, {len(self.data.train)} steps/epoch, "
                     f"device {self.device}, {self.dist.world_size} process(es), amp {self.amp}, "
                     f"channels_last {self.channels_last}{threads.describe()}{t})")
        if self.start_epoch == 0:  # the method's own stage (Distiller.prepare): fresh runs only; its result is saved
            self.distiller.prepare(self.data.train, self.device)
        for epoch in range(self.start_epoch, epochs):
            t0 = time.perf_counter()
            record = {"epoch": epoch + 1, **self.train_epoch(epoch)}
            every = max(int(cfg["train"]["eval_every"]), 1)
            ev = None
            if (epoch + 1) % every == 0 or epoch + 1 == epochs:
                ev = evaluate(self.distiller, self.data.test, self.device, self.amp_dtype, self.teacher_correct)
                record.update(test_top1=ev["top1"], test_top5=ev["top5"], test_loss=ev["loss"], ek=ev["ek"])
            self._check_finite(epoch, ev)
            try:
                if ev is not None and ev["top1"] > self.best_top1:
                    self.best_top1, self.best_epoch = ev["top1"], epoch + 1
                    if self.dist.is_main:
                        atomic_save(self._checkpoint(epoch + 1), os.path.join(self.run_dir, rundir.BEST))
                self.wall_time += time.perf_counter() - t0
                self.history.append(record)
                if self.dist.is_main:
                    self._log(record)
                    if (epoch + 1) % max(int(cfg["train"]["save_every"]), 1) == 0 or epoch + 1 == epochs:
                        atomic_save(self._checkpoint(epoch + 1), os.path.join(self.run_dir, rundir.LAST))
            except OSError as e:
                self._rescue(epoch, e)
            dist.barrier()
        summary = self._summary()
        if self.dist.is_main:
            old = os.path.join(self.run_dir, rundir.SUMMARY)
            if os.path.exists(old):  # a longer run of a finished one (--allow-config-change): the old one is kept
                keep = _free_name(self.run_dir, "summary.previous", ".json")
                os.replace(old, keep)
                log.warning("%s is replaced by this run's; the earlier one is kept as %s", old, keep)
            # on disk the run folder is named, not located: the summary sits in it, and a results folder that is
            # copied or committed carries no path of the machine that ran it
            self._write_file(rundir.SUMMARY, json.dumps({**summary, "run_dir": os.path.basename(
                os.path.normpath(self.run_dir))}, indent=2))
        return summary

    def _log(self, record: dict) -> None:
        with open(os.path.join(self.run_dir, rundir.METRICS), "a") as f:
            f.write(json.dumps(record) + "\n")
        e = record["epoch"]
        w = self.writer
        w.add_scalar("train/loss", record["train_loss"], e)
        w.add_scalar("train/top1", record["train_top1"], e)
        w.add_scalar("train/lr", record["lr"], e)
        for k, v in record["losses"].items():
            w.add_scalar(f"train/loss_{k}", v, e)
        if "test_top1" in record:
            w.add_scalar("test/top1", record["test_top1"], e)
            w.add_scalar("test/top5", record["test_top5"], e)
            w.add_scalar("test/loss", record["test_loss"], e)
            if record.get("ek") is not None:
                w.add_scalar("test/ek", record["ek"], e)
        w.flush()
        if not self.quiet:
            ev = ""
            if "test_top1" in record:
                ev = f" | test top-1 {record['test_top1']:.2f} top-5 {record['test_top5']:.2f}"
                if record.get("ek") is not None:
                    ev += f" EK {record['ek']:.2f}"
            parts = " ".join(f"{k} {v:.4f}" for k, v in record["losses"].items())
            log.info(f"epoch {e:>3}/{self.cfg['solver']['epochs']} lr {record['lr']:.4f} | loss "
                     f"{record['train_loss']:.4f} ({parts}) train top-1 {record['train_top1']:.2f}{ev} | "
                     f"{record['images_per_s']:.0f} img/s {record['epoch_time_s']:.1f}s")

    def _summary(self) -> dict:
        evals = [m for m in self.history if "test_top1" in m]
        final = evals[-1] if evals else {}
        cfg = self.cfg
        return {
            "experiment": cfg["experiment"],
            "method": cfg["method"],
            "student": cfg["model"]["name"],
            "teacher": cfg["teacher"].get("name"),
            "dataset": cfg["data"]["dataset"],
            "seed": cfg["seed"],
            "epochs": cfg["solver"]["epochs"],
            "final_top1": final.get("test_top1"),
            "final_top5": final.get("test_top5"),
            "best_top1": self.best_top1 if self.best_top1 >= 0 else None,
            "best_epoch": self.best_epoch,
            "final_ek": final.get("ek"),
            "teacher_top1": self.teacher_top1,
            # the test images every top-1 above is measured on (fewer than the test set's with data.test_subset)
            "test_images": self.data.num_test,
            "test_images_total": self.data.num_test_total,
            "wall_time_s": self.wall_time,
            "run_dir": self.run_dir,
            "world_size": self.dist.world_size,
            "lakd_version": __version__,
            "torch_version": torch.__version__,
        }


def _free_name(folder: str, stem: str, ext: str) -> str:
    """``folder/stem.ext``, or ``stem-1.ext``, ``stem-2.ext``... for the first name not taken."""
    k = 0
    while True:
        path = os.path.join(folder, f"{stem}{'' if k == 0 else f'-{k}'}{ext}")
        if not os.path.exists(path):
            return path
        k += 1
