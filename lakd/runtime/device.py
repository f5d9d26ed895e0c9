"""Device and precision choices: the one device resolver of the package."""
from __future__ import annotations

import torch

from ..errors import LakdError

AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


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
