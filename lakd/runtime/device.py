"""Device and precision choices, and the CPU defaults that ``train.*: auto`` resolves to.

What ``auto`` picks, and the measurement behind each choice (``docs/performance.md``):

- ``train.amp: auto``: bf16 autocast where the hardware computes bf16 natively (a CPU with the ``avx512_bf16``
  or ``amx_bf16`` flags; a CUDA device for which ``torch.cuda.is_bf16_supported()``) *and* every model of the
  run belongs to a family measured faster with it on that kind of device (the class attribute ``BF16_FASTER``:
  on CPUs the CIFAR ResNets, WRN and VGG, not MobileNetV2 or the ShuffleNets; on CUDA none so far, since the
  CIFAR ResNets were no faster on an H200); full precision elsewhere. The *default* stays ``none`` (fp32): in
  the seeded CIFAR-10 study bf16 cost KD 0.23 points, consistently (docs/results.md).
- ``train.channels_last: auto`` (default): on a CPU, channels_last when every convolutional model of the run
  belongs to a family measured faster with it (the class attribute ``CHANNELS_LAST_CPU``, from
  ``benchmarks/bench_layout.py``); on CUDA off (measured on an H200 with ``benchmarks/gpu_check.sh``: no
  consistent effect on the CIFAR ResNets).
- ``train.malloc: auto`` (default): on Linux/glibc CPUs, for large per-process batches only, stop glibc from
  serving big blocks by ``mmap`` and trimming the heap after every step (``tune_cpu_allocator``).
"""
from __future__ import annotations

import ctypes
import logging

import torch

from ..errors import LakdError

log = logging.getLogger(__name__)

AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
#: per-process batch from which ``train.malloc: auto`` tunes glibc (measured: no effect at 64, faster at 512)
MALLOC_MIN_BATCH = 256


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise LakdError(f"device {name!r} asked for but CUDA is not available here; set device=cpu (or auto)")
        if name == "cuda":
            name = f"cuda:{local_rank}"
    elif name != "cpu" and name != "mps":
        raise LakdError(f"device {name!r} is not one of auto, cpu, cuda, cuda:N")
    return torch.device(name)


def device_kind(name: str) -> str:
    """``cuda`` or ``cpu``: the kind of device ``name`` will resolve to (before any process group exists)."""
    name = str(name)
    return "cuda" if name.startswith("cuda") or (name == "auto" and torch.cuda.is_available()) else "cpu"


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def native_bf16(device: torch.device) -> bool:
    """Does ``device`` compute bf16 natively (so that bf16 autocast is a speed-up, not an emulation)?"""
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    if device.type == "cpu":
        return bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})
    return False


def _every_model(models, declares) -> bool:
    """Does every model of the run (``None``: no teacher) declare it, and is there at least one?"""
    models = [m for m in models if m is not None]
    return bool(models) and all(declares(m) for m in models)


def resolve_amp(value: str, device: torch.device, models=()) -> str:
    """``train.amp`` as one of none, bf16, fp16 (``auto``: bf16 where the device computes it natively and every
    model in ``models`` is of a family measured faster with it there, ``BF16_FASTER``; else none)."""
    if value == "auto":
        measured = _every_model(models, lambda m: device.type in getattr(m, "BF16_FASTER", ()))
        return "bf16" if measured and native_bf16(device) else "none"
    return value


def resolve_channels_last(value, device: torch.device, models) -> bool:
    """``train.channels_last`` as a bool for these models (``auto``: see the module docstring)."""
    if value != "auto":
        return bool(value)
    if device.type != "cpu":
        return False
    return _every_model(models, lambda m: getattr(m, "CHANNELS_LAST_CPU", False))


def tune_cpu_allocator(value, device: torch.device, batch_size: int) -> bool:
    """``train.malloc``: keep freed memory in glibc's heap instead of unmapping/trimming it after every step.

    At large batches a training step allocates and frees activations of many MB; by default glibc serves those
    blocks with ``mmap`` and returns them (and trims the heap top) on free, so the next step faults every page
    in again. ``M_MMAP_MAX = 0`` serves them from the heap and a large ``M_TRIM_THRESHOLD`` keeps the heap, so
    steps reuse warm pages. Process-wide and in-process (``mallopt`` through ctypes); the resident set then
    stays at the step's peak. Returns whether it was applied (``auto``: CPU, glibc, per-process batch >=
    ``MALLOC_MIN_BATCH``)."""
    if value is False or device.type != "cpu":
        return False
    if value == "auto" and batch_size < MALLOC_MIN_BATCH:
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_max = -1, -4
        ok = bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 2**30))
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to tune
        return False
    if ok:
        log.info("glibc malloc tuned for large batches (M_MMAP_MAX=0, M_TRIM_THRESHOLD=1 GiB)")
    return ok
