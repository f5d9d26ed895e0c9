"""What a training step costs per method: peak memory and images per second, measured in one run.

Memory. On CUDA: ``torch.cuda.max_memory_allocated`` over one training step (after a warm-up step), minus the
memory allocated before it, i.e. the step's own peak (activations, gradients, temporaries); parameters and
optimizer state that live across steps are reported separately as ``resident_bytes``. On CPU PyTorch keeps
no allocator statistics, so we count what dominates a training step's memory and differs between methods: the
tensors autograd saves for backward (activations). Saved-tensor hooks see every tensor packed into the graph;
each distinct storage is counted once while any graph still holds it, and released when the graph frees it
(after its backward), so the peak of the running total is the step's peak activation memory. A method that
backpropagates per local module (LAKD) frees each module's graph before the next one is built, and the count
shows it. Gradients (the same for every method with the same trainable parameters) are not included.
"""
from __future__ import annotations

import time
import weakref

import torch

from ..config import load_config
from ..distillers import DISTILLERS, cost_reference, resolve_method
from ..engine.build import build
from ..engine.step import training_step
from ..models import FAMILY, is_external
from ..models.external import default_input_size


class SavedTensorMeter:
    """Peak live bytes of tensors saved for backward (counted once per storage)."""

    def __init__(self):
        self.live: dict[int, list] = {}  # storage key -> [nbytes, refcount]
        self.current = 0
        self.peak = 0

    def _release(self, key):
        entry = self.live.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.current -= entry[0]
            del self.live[key]

    def pack(self, t: torch.Tensor):
        st = t.untyped_storage()
        key = (st.data_ptr(), t.device.type)
        entry = self.live.get(key)
        if entry is None:
            entry = self.live[key] = [st.nbytes(), 0]
            self.current += entry[0]
            self.peak = max(self.peak, self.current)
        entry[1] += 1
        holder = _Packed(t)
        weakref.finalize(holder, self._release, key)
        return holder

    @staticmethod
    def unpack(holder):
        return holder.tensor

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)


class _Packed:
    __slots__ = ("tensor", "__weakref__")

    def __init__(self, t):
        self.tensor = t


def _setup(teacher: str, teacher_ckpt: str | None, student: str, method: str, num_classes: int,
           overrides: list[str], device: torch.device, image_size: int | None = None):
    """The distiller, optimizer and parameters of one method (or a variant such as ``lakd_joint``), through the
    trainer's build path; no data: CRD's memory bank assumes a training set of ``max(20000, 2 * 16384)``."""
    name, extra = resolve_method(method)
    over = [f"method={name}", f"model.name={student}", f"model.num_classes={num_classes}"]
    if DISTILLERS.get(name).needs_teacher:
        over.append(f"teacher.name={teacher}")
    if image_size:
        over.append(f"data.image_size={image_size}")  # the size torchvision:/timm: networks infer shapes at
    cfg = load_config(None, over + extra + list(overrides))
    if teacher_ckpt and cfg["teacher"].get("name"):
        cfg["teacher"]["checkpoint"] = teacher_ckpt
    parts = build(cfg, device, num_data=max(20000, 2 * 16384), warn=False)
    parts.distiller.train()
    return parts.distiller, parts.optimizer, parts.params


def _batch(student: str, batch_size: int, num_classes: int, device, size: int | None = None):
    size = size or (default_input_size(student) if is_external(student) else
                    224 if FAMILY.get(student) == "imagenet" else 32)
    g = torch.Generator().manual_seed(0)
    return {
        "image": torch.randn(batch_size, 3, size, size, generator=g).to(device),
        "target": torch.randint(0, num_classes, (batch_size,), generator=g).to(device),
        "index": torch.arange(batch_size).to(device),
    }


def measure_memory(teacher: str, student: str, methods: list[str], batch_size: int, teacher_ckpt=None,
                   num_classes: int = 100, device: str = "cpu", overrides=(), amp_dtype=None,
                   image_size: int | None = None) -> dict:
    dev = torch.device(device)
    scaler = torch.amp.GradScaler(dev.type, enabled=amp_dtype == torch.float16)
    results = {}
    for m in methods:
        d, opt, params = _setup(teacher, teacher_ckpt, student, m, num_classes, list(overrides), dev, image_size)
        batch = _batch(student, batch_size, num_classes, dev, image_size)
        training_step(d, opt, scaler, batch, params, amp_dtype)  # warm-up: optimizer state, lazy inits
        if dev.type == "cuda":
            torch.cuda.synchronize()
            opt.zero_grad(set_to_none=True)
            resident = torch.cuda.memory_allocated(dev)
            torch.cuda.reset_peak_memory_stats(dev)
            training_step(d, opt, scaler, batch, params, amp_dtype)
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated(dev) - resident
            results[m] = {"peak_bytes": int(peak), "resident_bytes": int(resident)}
        else:
            meter = SavedTensorMeter()
            with meter.hooks():
                training_step(d, opt, scaler, batch, params, amp_dtype)
            results[m] = {"peak_bytes": int(meter.peak)}
        del d, opt, params
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    _ratios(results, "peak_bytes")
    return {"batch_size": batch_size, "device": _device_name(dev), "teacher": teacher, "student": student,
            "measure": "cuda max_memory_allocated per step" if dev.type == "cuda"
            else "peak live bytes of tensors saved for backward", "results": results}


def measure_speed(teacher: str, student: str, methods: list[str], batch_size: int, steps: int = 10,
                  warmup: int = 2, teacher_ckpt=None, num_classes: int = 100, device: str = "cpu",
                  overrides=(), amp_dtype=None, channels_last: bool = False, rounds: int = 1,
                  image_size: int | None = None) -> dict:
    """Training images/s per method. With ``rounds`` > 1 the methods are timed in interleaved rounds and the
    best round is kept, which evens out a noisy shared machine."""
    dev = torch.device(device)
    scaler = torch.amp.GradScaler(dev.type, enabled=amp_dtype == torch.float16)
    setups = {}
    for m in methods:
        d, opt, params = _setup(teacher, teacher_ckpt, student, m, num_classes, list(overrides), dev, image_size)
        batch = _batch(student, batch_size, num_classes, dev, image_size)
        if channels_last:
            d.to(memory_format=torch.channels_last)
            batch["image"] = batch["image"].contiguous(memory_format=torch.channels_last)
        for _ in range(warmup):
            training_step(d, opt, scaler, batch, params, amp_dtype)
        setups[m] = (d, opt, params, batch)
    best = {m: 0.0 for m in methods}
    for _ in range(max(rounds, 1)):
        for m in methods:
            d, opt, params, batch = setups[m]
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(steps):
                training_step(d, opt, scaler, batch, params, amp_dtype)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            best[m] = max(best[m], steps * batch_size / (time.perf_counter() - t0))
    results = {m: {"images_per_s": v} for m, v in best.items()}
    _ratios(results, "images_per_s")
    return {"batch_size": batch_size, "device": _device_name(dev), "teacher": teacher, "student": student,
            "steps": steps, "results": results}


def _ratios(results: dict, key: str) -> None:
    ref = results.get(cost_reference(), {}).get(key)  # training without distillation
    for r in results.values():
        r["ratio_to_scratch"] = (r[key] / ref) if ref else None


def _device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(dev)})"
    return f"cpu ({torch.get_num_threads()} threads)"
