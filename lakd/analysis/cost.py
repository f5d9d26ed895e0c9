"""What a training step costs per method: peak memory and images per second, measured in one run.

Memory is measured at the allocator, over one whole training step (zero_grad, the teacher's and the student's
forward passes, every backward, the optimizer step), after a warm-up step, each method in a fresh process
(``spawn``) so nothing one method allocated or cached can shift another's figure:

- CPU: the peak of the running sum of the CPU allocator's events (every allocation and free of a tensor's
  memory) recorded by ``torch.profiler`` with ``profile_memory=True`` (``AllocatorMeter``). The step starts with
  the parameters, buffers and optimizer state resident and no gradients; those are reported apart as
  ``resident_bytes``.
- CUDA: ``torch.cuda.max_memory_allocated`` over the step minus what was allocated before it.

Two further columns, labelled as what they are:

- ``saved_bytes``: the peak of the tensors autograd saves for backward (``SavedTensorMeter``; each storage
  counted once while a graph holds it). It misses the teacher's temporaries, gradients and loss temporaries,
  so it understates what a step needs; it was this project's published figure before the allocator count.
- ``rss_peak_bytes`` (Linux CPU): an independent check of the allocator figure from the operating system: the
  process's peak resident set over the step (``VmHWM`` after resetting it through ``/proc/self/clear_refs``)
  minus its resident set before it, with glibc told to map every block above 64 KiB separately and unmap it on
  free (``mallopt``), so that freed memory leaves the resident set at once.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import multiprocessing
import os
import sys
import time
import weakref

import torch

from ..config import apply_overrides, full_defaults, load_config
from ..distillers import DISTILLERS, cost_reference, resolve_method
from ..engine.build import build
from ..engine.step import training_step
from ..models import FAMILY, is_external
from ..models.external import default_input_size
from ..runtime.device import tune_cpu_allocator
from ..runtime.progress import progress_bar


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
           overrides: list[str], device: torch.device, image_size: int | None = None, channels_last: bool = False):
    """The distiller, optimizer and parameters of one method (or a variant such as ``lakd_joint``), through the
    trainer's build path; no data: CRD's memory bank assumes a training set of ``max(20000, 2 * 16384)``."""
    name, extra = resolve_method(method)
    over = [f"method={name}", f"model.name={student}", f"model.num_classes={num_classes}"]
    settings = apply_overrides(full_defaults(), over + extra + list(overrides), full_defaults())
    if DISTILLERS.get(name).uses_teacher(settings):  # tfkd_self's teacher comes from a setting
        over.append(f"teacher.name={teacher}")
    if image_size:
        over.append(f"data.image_size={image_size}")  # the size torchvision:/timm: networks infer shapes at
    cfg = load_config(None, over + extra + list(overrides) + (["train.channels_last=true"] if channels_last else []))
    if teacher_ckpt and cfg["teacher"].get("name"):
        cfg["teacher"]["checkpoint"] = teacher_ckpt
    parts = build(cfg, device, num_data=max(20000, 2 * 16384), warn=False)
    parts.distiller.train()
    return parts.distiller, parts.optimizer, parts.params, parts.channels_last


def _batch(student: str, batch_size: int, num_classes: int, device, size: int | None = None):
    size = size or (default_input_size(student) if is_external(student) else
                    224 if FAMILY.get(student) == "imagenet" else 32)
    g = torch.Generator().manual_seed(0)
    return {
        "image": torch.randn(batch_size, 3, size, size, generator=g).to(device),
        "target": torch.randint(0, num_classes, (batch_size,), generator=g).to(device),
        "index": torch.arange(batch_size).to(device),
    }


@contextlib.contextmanager
def _quiet_fds():
    """File descriptors 1 and 2 sent to /dev/null for the block.

    Kineto, torch.profiler's C++ backend, writes lines such as ``USDT:... profiler_start`` straight to the
    process's stderr when a profile starts and stops; no setting turns them off (``KINETO_LOG_LEVEL`` does not,
    checked with torch 2.x), so the meter silences the descriptors around those two calls only.
    """
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (AttributeError, ValueError, OSError):
            pass
    saved = []
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
    except OSError:
        yield
        return
    try:
        for fd in (1, 2):
            try:
                saved.append((fd, os.dup(fd)))
                os.dup2(devnull, fd)
            except OSError:
                pass
        yield
    finally:
        for fd, copy in saved:
            os.dup2(copy, fd)
            os.close(copy)
        os.close(devnull)


class AllocatorMeter:
    """Peak of the running sum of a device's allocator events over the block (``torch.profiler``).

    Every allocation (+bytes) and free (-bytes) of tensor memory on ``device_type`` inside the block is an event;
    sorted by time, their running sum is the memory the block added at each instant, and its maximum the block's
    peak. The profiler does not report frees of memory allocated before the block, so the block should start
    from a state with nothing to give back (``_memory_one`` drops the gradients before it).
    """

    def __init__(self, device_type: str = "cpu"):
        self.device_type = device_type
        self.peak = 0
        self.end = 0
        self.events = 0

    def __enter__(self):
        from torch.profiler import ProfilerActivity, profile

        os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # the profiler's own warnings (no GPU, ...) are noise here
        self._prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        with _quiet_fds():
            self._prof.__enter__()
        return self

    def __exit__(self, *exc):
        with _quiet_fds():
            self._prof.__exit__(*exc)
        if exc[0] is None:
            want = torch.device(self.device_type).type.upper()
            events = [e for e in self._prof.profiler.kineto_results.events()
                      if e.name() == "[memory]" and str(e.device_type()).rsplit(".", 1)[-1] == want]
            running = 0
            for e in sorted(events, key=lambda e: e.start_ns()):
                running += e.nbytes()
                self.peak = max(self.peak, running)
            self.end, self.events = running, len(events)
        return False


def _rss_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident set (Linux >= 4.0)
        return True
    except OSError:
        return False


def _map_big_blocks() -> bool:
    """glibc: serve every block above 64 KiB by its own mmap and give freed memory back at once, so the
    resident set follows the allocator (only in the measuring process; see ``rss_peak_bytes``)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        return bool(libc.mallopt(m_mmap_threshold, 64 * 1024)) and bool(libc.mallopt(m_trim_threshold, 64 * 1024))
    except (OSError, AttributeError):
        return False


def _resident_bytes(d, opt) -> int:
    seen, total = set(), 0
    tensors = list(d.parameters()) + list(d.buffers())
    for st in opt.state.values():
        tensors += [v for v in st.values() if torch.is_tensor(v)]
    for t in tensors:
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def _memory_one(kw: dict) -> dict:
    """One method's memory figures (run in a fresh process by ``measure_memory``)."""
    if kw.get("threads"):
        torch.set_num_threads(kw["threads"])
    dev = torch.device(kw["device"])
    rss_ok = dev.type == "cpu" and kw.get("isolated") and _map_big_blocks()
    amp_dtype = kw["amp_dtype"]
    scaler = torch.amp.GradScaler(dev.type, enabled=amp_dtype == torch.float16)
    d, opt, params, channels_last = _setup(kw["teacher"], kw["teacher_ckpt"], kw["student"], kw["method"],
                                           kw["num_classes"], list(kw["overrides"]), dev, kw.get("image_size"),
                                           kw.get("channels_last"))
    batch = _batch(kw["student"], kw["batch_size"], kw["num_classes"], dev, kw.get("image_size"))
    if channels_last:  # the memory format training would use (train.channels_last, auto by default)
        batch["image"] = batch["image"].contiguous(memory_format=torch.channels_last)
    if d.random_views(batch["image"]):  # a method's per-sample views (SSKD, MLKD), as the data would hand them
        batch["views"] = d.random_views(batch["image"])

    def step():
        training_step(d, opt, scaler, batch, amp_dtype)

    step()  # warm-up (two steps): optimizer state, lazy inits, the allocator's first-use costs
    step()
    out = {}
    if dev.type == "cuda":
        torch.cuda.synchronize()
        opt.zero_grad(set_to_none=True)
        resident = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        step()
        torch.cuda.synchronize()
        out["peak_bytes"] = int(torch.cuda.max_memory_allocated(dev) - resident)
        out["resident_bytes"] = int(resident)
    else:
        opt.zero_grad(set_to_none=True)
        out["resident_bytes"] = _resident_bytes(d, opt)
        if rss_ok:
            step()
            opt.zero_grad(set_to_none=True)
            before = _rss_kib("VmRSS")
            if before is not None and _reset_peak_rss():
                step()
                peak = _rss_kib("VmHWM")
                opt.zero_grad(set_to_none=True)
                if peak is not None:
                    out["rss_peak_bytes"] = int(peak - before) * 1024
        with AllocatorMeter("cpu") as meter:
            step()
        out["peak_bytes"] = int(meter.peak)
    opt.zero_grad(set_to_none=True)
    saved = SavedTensorMeter()
    with saved.hooks():
        step()
    out["saved_bytes"] = int(saved.peak)
    return out


def measure_memory(teacher: str, student: str, methods: list[str], batch_size: int, teacher_ckpt=None,
                   num_classes: int = 100, device: str = "cpu", overrides=(), amp_dtype=None,
                   image_size: int | None = None, channels_last: bool = False, isolated: bool = True,
                   progress: bool = False) -> dict:
    """Peak memory of one training step per method, at the allocator (module docstring). With ``isolated``
    (default) every method runs in its own fresh ``spawn`` process. ``progress``: a bar on a terminal
    (``lakd.runtime.progress``), one step per method."""
    dev = torch.device(device)
    results = {}
    bar = progress_bar(len(methods), "bench memory", progress, unit="method")
    for m in methods:
        bar.set_description(f"bench memory: {m}")
        kw = dict(teacher=teacher, teacher_ckpt=teacher_ckpt, student=student, method=m, num_classes=num_classes,
                  overrides=list(overrides), device=str(dev), amp_dtype=amp_dtype, batch_size=batch_size,
                  image_size=image_size, channels_last=channels_last, threads=torch.get_num_threads(),
                  isolated=isolated)
        if isolated:
            ctx = multiprocessing.get_context("spawn")
            with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
                results[m] = pool.submit(_memory_one, kw).result()
        else:
            results[m] = _memory_one(kw)
        bar.update(1)
    bar.close()
    _ratios(results, "peak_bytes")
    for key in ("saved_bytes", "rss_peak_bytes"):
        _ratios(results, key, key.replace("_bytes", "_ratio_to_scratch"))
    measure = ("cuda allocator: torch.cuda.max_memory_allocated over one training step" if dev.type == "cuda"
               else "cpu allocator: peak of the running sum of allocation events over one training step "
                    "(torch.profiler profile_memory)")
    return {"batch_size": batch_size, "device": _device_name(dev), "teacher": teacher, "student": student,
            "overrides": list(overrides), "measure": measure + (", fresh process per method" if isolated else ""),
            "results": results}


def measure_speed(teacher: str, student: str, methods: list[str], batch_size: int, steps: int = 10,
                  warmup: int = 2, teacher_ckpt=None, num_classes: int = 100, device: str = "cpu",
                  overrides=(), amp_dtype=None, channels_last: bool = False, rounds: int = 1,
                  image_size: int | None = None, progress: bool = False) -> dict:
    """Training images/s per method. With ``rounds`` > 1 the methods are timed in interleaved rounds and the
    best round is kept, which evens out a noisy shared machine. ``progress``: a bar on a terminal
    (``lakd.runtime.progress``): one step per method set up and warmed up, one per method timed in each round."""
    dev = torch.device(device)
    scaler = torch.amp.GradScaler(dev.type, enabled=amp_dtype == torch.float16)
    # train.malloc as training applies it (process-wide, so once, from the shared overrides)
    malloc = load_config(None, [o for o in overrides if o.startswith("train.malloc=")])["train"]["malloc"]
    malloc_tuned = tune_cpu_allocator(malloc, dev, batch_size)
    setups = {}
    bar = progress_bar(len(methods) * (1 + max(rounds, 1)), "bench speed", progress, unit="step")
    for m in methods:
        bar.set_description(f"bench speed: set up {m}")
        d, opt, params, cl = _setup(teacher, teacher_ckpt, student, m, num_classes, list(overrides), dev,
                                    image_size, channels_last)
        batch = _batch(student, batch_size, num_classes, dev, image_size)
        if cl:  # the memory format training would use (train.channels_last, auto by default)
            batch["image"] = batch["image"].contiguous(memory_format=torch.channels_last)
        if d.random_views(batch["image"]):  # a method's per-sample views (SSKD, MLKD), as the data would hand them
            batch["views"] = d.random_views(batch["image"])
        for _ in range(warmup):
            training_step(d, opt, scaler, batch, amp_dtype)
        setups[m] = (d, opt, params, batch)
        bar.update(1)
    per_round: dict[str, list[float]] = {m: [] for m in methods}
    for r in range(max(rounds, 1)):
        for m in (methods if r % 2 == 0 else methods[::-1]):  # alternate the order: no method always runs first
            d, opt, params, batch = setups[m]
            bar.set_description(f"bench speed: round {r + 1}, {m}")
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(steps):
                training_step(d, opt, scaler, batch, amp_dtype)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            per_round[m].append(steps * batch_size / (time.perf_counter() - t0))
            bar.update(1)
    bar.close()
    # best round (the headline on a noisy machine), the median, and every round: a ratio of two methods is
    # best read round by round (per_round[a][i] / per_round[b][i]), as both saw the same moment's load
    results = {m: {"images_per_s": max(v), "median_images_per_s": sorted(v)[len(v) // 2], "per_round": v}
               for m, v in per_round.items()}
    _ratios(results, "images_per_s")
    return {"batch_size": batch_size, "device": _device_name(dev), "teacher": teacher, "student": student,
            "overrides": list(overrides), "steps": steps, "malloc_tuned": malloc_tuned, "results": results}


def _ratios(results: dict, key: str, out: str = "ratio_to_scratch") -> None:
    ref = results.get(cost_reference(), {}).get(key)  # training without distillation
    for r in results.values():
        if key in r:
            r[out] = (r[key] / ref) if ref else None


def _device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(dev)})"
    return f"cpu ({torch.get_num_threads()} threads)"
