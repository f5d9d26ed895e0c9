"""Reading model checkpoints from this project and from mdistiller, CAT-KD, RepDistiller, torchdistill
and torchvision, with one-line errors for files that are missing, corrupt or do not fit the model."""
from __future__ import annotations

import os

import torch
import torch.nn as nn

from ..errors import LakdError

#: keys under which the known code bases store a model's state dict
_STATE_KEYS = ("model", "state_dict", "net", "student", "model_state_dict")
#: environment variable listing checkpoint files (or folders) the user trusts to be unpickled in full
TRUST_ENV = "LAKD_TRUST_CHECKPOINTS"


def is_trusted(path: str) -> bool:
    """Whether ``$LAKD_TRUST_CHECKPOINTS`` (paths separated by ``os.pathsep``) names ``path`` or a folder above it."""
    real = os.path.realpath(path)
    for entry in os.environ.get(TRUST_ENV, "").split(os.pathsep):
        if entry.strip():
            base = os.path.realpath(os.path.expanduser(entry.strip()))
            if real == base or real.startswith(base.rstrip(os.sep) + os.sep):
                return True
    return False


#: how a ``torch.save`` file of the legacy (non-zip) format starts: its magic number, pickled (``LONG1``)
_LEGACY_MAGIC = b"\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little")


def plain_pickle_globals(path: str) -> list[str] | None:
    """For a file written by Python's ``pickle`` rather than ``torch.save`` (neither a zip archive nor torch's
    legacy format): the classes and functions it names (read with ``pickletools``, which runs nothing); None for
    any other file."""
    import pickletools

    try:
        with open(path, "rb") as f:
            head = f.read(64)
            if head[:1] != b"\x80" or head[:4] == b"PK\x03\x04":
                return None
            body = head[2:]
            if body[:1] == b"\x95":  # a FRAME opcode (protocol 4+) before the first object
                body = body[9:]
            if body.startswith(_LEGACY_MAGIC):
                return None
            f.seek(0)
            names, strings = [], []
            try:
                for op, arg, _ in pickletools.genops(f):
                    if op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE", "BINUNICODE8"):
                        strings.append(str(arg))
                    elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                        names.append(f"{strings[-2]}.{strings[-1]}")
                    elif op.name in ("GLOBAL", "INST"):
                        names.append(str(arg).replace(" ", "."))
            except Exception:  # a truncated pickle: the names read so far
                pass
            return list(dict.fromkeys(names))
    except OSError:
        return None


def _refused_globals(path: str) -> list[str]:
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # an older torch or a file it cannot scan: the caller falls back to the load error
        return []


def read_checkpoint(path: str, trusted: bool | None = None) -> dict:
    """``torch.load`` a file, turning every failure into a one-line ``LakdError``.

    Files are loaded with ``weights_only=True`` (tensors and plain containers; no code runs). A file that also
    pickles Python objects (torchdistill stores an ``argparse.Namespace``) is refused with the names of those
    objects; ``trusted=True``, or the file (or a folder above it) listed in ``$LAKD_TRUST_CHECKPOINTS``, loads it
    in full, which runs whatever code the file names: only for files from a source you trust.
    """
    path = os.path.expanduser(str(path))
    if not os.path.exists(path):
        raise LakdError(f"checkpoint {path!r} does not exist; check the path (relative paths are taken from "
                        f"the current directory {os.getcwd()!r})")
    if os.path.isdir(path):
        raise LakdError(f"checkpoint {path!r} is a folder; give a .pt/.pth file (for a run folder, use "
                        f"{os.path.join(path, 'best.pt')!r} or 'last.pt')")
    full = is_trusted(path) if trusted is None else bool(trusted)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=not full)
    except Exception as e:  # torch raises many kinds for a bad file (RuntimeError, UnpicklingError, IndexError...)
        refused = _refused_globals(path) if "Weights only load failed" in str(e) else []
        if refused:
            shown = ", ".join(refused[:4]) + (f" and {len(refused) - 4} more" if len(refused) > 4 else "")
            raise LakdError(f"checkpoint {path!r} holds Python objects that safe loading (weights_only) refuses: "
                            f"{shown}; if you trust its source, allow it with {TRUST_ENV}="
                            f"{os.path.abspath(path)} (loading it runs the code it names), or re-save only its "
                            f"state dict") from None
        plain = plain_pickle_globals(path)
        if plain is not None:
            shown = ", ".join(plain[:4]) + (f" and {len(plain) - 4} more" if len(plain) > 4 else "")
            raise LakdError(f"checkpoint {path!r} is a plain Python pickle (not a torch.save file) that holds Python "
                            f"objects{' (' + shown + ')' if shown else ''}, refused: only torch.save files load without "
                            f"running code; re-save its tensors with torch.save (a state dict) where you trust it") from None
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LakdError(f"checkpoint {path!r} is corrupt or truncated ({first[:160]}); re-download or re-save "
                        f"it (lakd writes checkpoints atomically, so a run's last.pt/best.pt stay readable)") from None
    if not isinstance(obj, dict):
        raise LakdError(f"checkpoint {path!r} holds a {type(obj).__name__}, not a state dict or a dict with one "
                        f"of the keys {', '.join(_STATE_KEYS)}")
    return obj


#: what a checkpoint records besides the weights (lakd writes all of them; other code bases some or none)
META_KEYS = ("arch", "num_classes", "dataset", "image_size", "mean", "std", "method", "epoch", "config")


def checkpoint_meta(source) -> dict:
    """The one reader of checkpoint metadata: the ``META_KEYS`` a checkpoint (a path or a loaded dict)
    records, e.g. ``arch``, ``num_classes``, ``dataset``, ``mean``/``std`` and the run ``config``."""
    obj = read_checkpoint(source) if isinstance(source, (str, os.PathLike)) else source
    meta = {k: obj[k] for k in META_KEYS if k in obj}
    if not isinstance(meta.get("config"), dict):
        meta.pop("config", None)
    return meta


def extract_state_dict(obj: dict, path: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The model's state dict from a checkpoint in any of the known layouts (prefixes such as
    ``module.`` from DataParallel/DDP and ``student.`` are stripped)."""
    sd = None
    for key in _STATE_KEYS:
        if isinstance(obj.get(key), dict):
            sd = obj[key]
            break
    if sd is None:
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            sd = obj  # a bare state dict (torchvision's files)
        else:
            raise LakdError(f"{path!r} has no model weights: expected a state dict or a dict with one of the keys "
                            f"{', '.join(_STATE_KEYS)}, found keys {sorted(obj)[:8]}")
    for prefix in ("module.", "_orig_mod.", "student.", "model."):
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def load_weights(model: nn.Module, path: str, arch: str = "") -> dict:
    """Load a checkpoint file into ``model`` strictly. Returns the checkpoint dict (for its metadata)."""
    obj = read_checkpoint(path)
    sd = dict(extract_state_dict(obj, path))
    # torchvision's published ImageNet files carry no BatchNorm ``num_batches_tracked`` counters
    for k, v in model.state_dict().items():
        if k.endswith("num_batches_tracked") and k not in sd:
            sd[k] = torch.zeros_like(v)
    ck_arch = obj.get("arch")
    if arch and ck_arch and str(ck_arch).lower() != arch.lower():
        raise LakdError(f"checkpoint {path!r} is a {ck_arch!r} but the config asks for {arch!r}; set the model "
                        f"name to {ck_arch!r} or give a {arch} checkpoint")
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    if missing or unexpected:
        raise LakdError(f"checkpoint {path!r} does not fit {arch or type(model).__name__}: {len(missing)} missing "
                        f"keys (e.g. {missing[:2]}) and {len(unexpected)} unexpected (e.g. {unexpected[:2]}); "
                        f"is it a different architecture?")
    for k, v in sd.items():
        if tuple(v.shape) != tuple(own[k].shape):
            cls = getattr(getattr(model, "classifier", None), "out_features", None)
            if v.ndim >= 1 and k.split(".")[-1] in ("weight", "bias") and v.shape[0] != own[k].shape[0] and \
                    cls is not None and own[k].shape[0] == cls:
                raise LakdError(f"checkpoint {path!r} was trained for {v.shape[0]} classes but the model has {cls} "
                                f"({k}); use a checkpoint for this dataset or set model.num_classes={v.shape[0]}")
            raise LakdError(f"checkpoint {path!r} does not fit {arch or type(model).__name__}: {k} has shape "
                            f"{tuple(v.shape)}, the model expects {tuple(own[k].shape)}; is it a different architecture?")
    # weights that are NaN or infinite (a diverged run, a broken file) would evaluate to "loss nan" or blank
    # figures: refused here, for every command that loads a model; buffers other than BatchNorm's statistics
    # (masks that may hold -inf by design) are not checked
    params = {n for n, _ in model.named_parameters()}
    bad = [k for k, v in sd.items() if (k in params or k.endswith(("running_mean", "running_var")))
           and v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise LakdError(f"checkpoint {path!r} holds non-finite weights (NaN or inf in {len(bad)} tensors, e.g. "
                        f"{bad[0]}): the run that wrote it diverged or the file is damaged; use an earlier "
                        f"checkpoint of that run or retrain it")
    model.load_state_dict(sd, strict=True)
    return obj
