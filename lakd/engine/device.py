"""Device and precision choices."""
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
