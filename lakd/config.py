"""Configs: YAML files merged over defaults, ``key=value`` overrides, and validation with clear errors.

A config is a nested dict. Every key must exist in the defaults below or in the ``DEFAULTS`` of a registered
distiller (each method owns its own sections, e.g. ``kd:``, ``sdm:``/``ndam:``/``lakd:``), so a typo is an error
that lists the close keys instead of a silently ignored setting.
"""
from __future__ import annotations

import copy
import math
import os
import re
from typing import Any

import yaml

from .errors import LakdError, close_matches
from .registry import DISTILLERS
from .settings import check_finite, check_settings, run_facts

#: environment variable naming the default data folder (else ``./data``, relative to the working directory)
DATA_ENV = "LAKD_DATA"


def expand_path(value: str | None, key: str) -> str | None:
    """A path setting as the process uses it: ``~`` and environment variables (``$LAKD_SHARED/data``,
    ``${DATA}/cifar``) expanded. The config keeps the text as written, so a run's ``config.yaml`` and a sweep's plan
    name ``$DATA/...`` rather than one machine's folders; an unset variable is a one-line error naming it."""
    if not isinstance(value, str) or not value:
        return value
    out = os.path.expanduser(os.path.expandvars(value))
    missing = re.findall(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)", out)
    if missing:
        raise LakdError(f"{key}={value!r} names the environment variable ${missing[0]}, which is not set; set it "
                        f"(e.g. export {missing[0]}=/path/to/folder) or write the path out")
    return out


#: the settings that name files or folders, expanded by ``with_paths_expanded``
PATH_KEYS = (("data", "root"), ("model", "checkpoint"), ("teacher", "checkpoint"))


def with_paths_expanded(cfg: dict) -> dict:
    """``cfg`` with its path settings (``PATH_KEYS``) as the process uses them (``expand_path``); the sections it
    changes are copies, ``cfg`` itself is left as written."""
    out = dict(cfg)
    for sec, key in PATH_KEYS:
        if isinstance(out.get(sec), dict) and out[sec].get(key):
            out[sec] = {**out[sec], key: expand_path(out[sec][key], f"{sec}.{key}")}
    return out


def default_data_root() -> str:
    """Where datasets live when ``data.root`` is not set: ``$LAKD_DATA``, else ``data`` in the working directory
    (``data.download=true`` fetches CIFAR there)."""
    return os.environ.get(DATA_ENV) or "data"


DEFAULTS: dict[str, Any] = {
    "experiment": "",  # run name (the run folder is output_dir/experiment)
    "seed": 0,
    "output_dir": "runs",
    "device": "auto",  # auto | cpu | cuda | cuda:N
    "method": "scratch",  # a registered distiller (see `lakd methods`)
    "resume": None,  # a run folder (or its last.pt) to continue
    # where a reference-recipe config comes from (configs/<dataset>/<method>/ref/*.yaml): repository, commit,
    # files, top1, reported_in, deviations; recorded with the run, it changes nothing the run computes
    "reference": None,
    # cross-setting rules broken on purpose: the setting keys (e.g. [dkd.warmup]) of rules their method marks
    # waivable (a warm-up longer than a short run); the run logs a warning and goes on (lakd.settings)
    "waive": [],
    "data": {
        "dataset": "cifar10",  # cifar10 | cifar100 | imagenet | imagefolder | digits
        "root": "",  # folder holding cifar-10-batches-py / cifar-100-python / train,val ("": $LAKD_DATA or ./data)
        "download": False,  # fetch CIFAR through torchvision when online
        "verify_md5": False,
        "fast": "auto",  # in-memory loader with batched on-device augmentation: auto | true | false
        "num_workers": 2,
        "pin_memory": True,
        "persistent_workers": True,
        "prefetch_factor": 4,
        "augment": True,
        "train_subset": 0,  # use N evenly spaced training images (0: all); for quick runs
        "test_subset": 0,
        "image_size": 0,  # 0: the dataset's default (32 for CIFAR/digits, 224 for ImageNet)
        "mean": None,  # None: the dataset's (or the teacher checkpoint's) normalisation
        "std": None,
    },
    # name: a zoo name (`lakd models`), torchvision:<name>, timm:<name> or module:<package.module>:<callable>;
    # for those, kwargs go to the constructor and blocks/stem/classifier/leaf_modules cut the network (docs/api.md)
    "model": {"name": "resnet20", "num_classes": None, "checkpoint": None, "kwargs": {}, "blocks": None,
              "stem": None, "classifier": None, "leaf_modules": []},
    "teacher": {"name": None, "checkpoint": None, "kwargs": {}, "blocks": None, "stem": None, "classifier": None,
                "leaf_modules": []},
    "solver": {
        "epochs": 240,
        "batch_size": 64,  # global batch (split across DDP ranks)
        "lr": 0.05,
        "momentum": 0.9,
        "nesterov": True,
        "weight_decay": 5e-4,
        "schedule": "multistep",  # linear | multistep | cosine | constant
        "milestones": [150, 180, 210],
        "gamma": 0.1,
        "warmup_epochs": 0.0,
        "min_lr": 0.0,
        "max_steps_per_epoch": 0,  # 0: full epochs; >0 cuts each epoch short (tests, smoke runs)
    },
    "train": {
        "amp": "none",  # none | bf16 | fp16 | auto (bf16 where the hardware computes it natively)
        "channels_last": "auto",  # true | false | auto (per model family, measured: lakd/engine/device.py)
        "compile": False,
        # fold the frozen teacher's eval-mode BatchNorms into the convolutions before them (lakd/models/fold.py):
        # the same teacher function up to float rounding, one BatchNorm pass fewer per teacher layer
        "fold_teacher_bn": True,
        "malloc": "auto",  # auto (glibc tuned for per-process batches >= 256 on CPU) | true | false
        "sync_bn": False,
        "eval_every": 1,
        "eval_batch_size": 500,
        "save_every": 1,
        "progress": True,
        "log_every": 50,
        "deterministic": False,
        "threads": 0,  # torch.set_num_threads on CPU (0: leave PyTorch's default)
        # refuse, at construction, a distiller whose losses leave a trainable parameter without a gradient (one
        # dry step on a batch of 2: Distiller.check_reachability)
        "check_reachability": True,
        "dist_timeout_s": 600.0,  # multi-process: how long ranks wait for each other before naming the missing one
    },
}


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads ``5e-4`` as a string; researchers write it as a float, so resolve it as one."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$"),
    list("-+0123456789."),
)


def yaml_load(text_or_stream):
    return yaml.load(text_or_stream, Loader=_Loader)


def method_sections() -> dict[str, dict[str, Any]]:
    """Every registered method's own config sections (``DEFAULTS``), by method name, learnt through the method
    registry: from its catalog while the methods are not imported (no torch: a misspelt key or method is answered
    at once), else from the classes."""
    light = DISTILLERS.light()
    if light is not None:
        return {name: e["defaults"] for name, e in light.items()}
    return {name: DISTILLERS.get(name).DEFAULTS for name in DISTILLERS.names()}


def method_defaults() -> dict[str, Any]:
    """The union of every registered distiller's own config sections."""
    out: dict[str, Any] = {}
    for sections in method_sections().values():
        for section, values in sections.items():
            out[section] = _merge(out.get(section, {}), values)
    return out


def uses_teacher(cfg: dict) -> bool:
    """Whether the run ``cfg`` distils from a teacher (its method's ``uses_teacher``; from the catalog unless one
    of the method's settings decides it)."""
    light = DISTILLERS.light()
    entry = light.get(str(cfg["method"]).lower()) if light is not None else None
    if entry is not None and not entry.get("teacher_depends_on_settings"):
        return bool(entry["needs_teacher"])
    return DISTILLERS.get(cfg["method"]).uses_teacher(cfg)


def run_sections(cfg: dict) -> dict:
    """``cfg`` less the other methods' sections: what the run itself reads (``lakd train --show-config``)."""
    own = set(method_sections().get(str(cfg.get("method")).lower(), {}))
    others = set(method_defaults()) - own - set(DEFAULTS)
    return {k: v for k, v in cfg.items() if k not in others}


def full_defaults() -> dict[str, Any]:
    return _merge(copy.deepcopy(DEFAULTS), method_defaults())


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _check_keys(cfg: dict, schema: dict, where: str, prefix: str = "") -> None:
    for k, v in cfg.items():
        path = f"{prefix}{k}"
        if k not in schema:
            known = [f"{prefix}{s}" for s in schema]
            raise LakdError(f"unknown config key {path!r} in {where}{close_matches(path, known)}; "
                            f"see `lakd train --show-config` for every key")
        if isinstance(schema[k], dict) and schema[k] and not isinstance(v, dict):
            raise LakdError(f"config key {path!r} in {where} must be a section (a mapping), got {v!r}")
        if isinstance(v, dict) and isinstance(schema[k], dict) and schema[k]:
            _check_keys(v, schema[k], where, prefix=f"{path}.")


def shipped_configs_dir() -> str:
    """The shipped configs, which ``lakd configs`` lists: ``lakd/configs`` inside an installed wheel (the package
    data pyproject.toml maps there), else the clone's top-level ``configs/`` beside the package."""
    package = os.path.dirname(os.path.abspath(__file__))
    inside = os.path.join(package, "configs")
    if os.path.isdir(inside):
        return inside
    return os.path.join(os.path.dirname(package), "configs")


def shipped_config_names(root: str | None = None) -> list[str]:
    """Every shipped config as ``lakd configs`` names it (``cifar10/lakd/resnet56_resnet20_149``: its path under
    the configs folder without ``.yaml``), sorted; the ``_base_`` files (names starting with ``_``) are left out."""
    root = root or shipped_configs_dir()
    out = []
    for dirpath, _, files in os.walk(root):
        for f in files:
            if f.endswith((".yaml", ".yml")) and not f.startswith("_"):
                rel = os.path.relpath(os.path.join(dirpath, f), root).replace(os.sep, "/")
                out.append(os.path.splitext(rel)[0])
    return sorted(out)


def shipped_config(name: str) -> str | None:
    """The shipped file a config name points at (``cifar100/kd/resnet32x4_resnet8x4``, also with ``configs/`` in
    front or ``.yaml`` behind), or None."""
    name = name.replace("\\", "/")
    if os.path.isabs(name):
        return None
    if name.startswith("configs/"):
        name = name[len("configs/"):]
    root = shipped_configs_dir()
    for candidate in (name, name + ".yaml", name + ".yml"):
        path = os.path.join(root, candidate)
        if os.path.isfile(path):
            return path
    return None


def resolve_base(base: str, path: str) -> str:
    """Where a ``_base_`` line points: the YAML file's own folder first; when no such file exists and ``base``
    names a shipped config as ``lakd configs`` lists it (``configs/cifar10/_base_distill.yaml``, also without
    ``.yaml`` or without the ``configs/`` prefix), that shipped file, so the line works from any folder."""
    own = os.path.join(os.path.dirname(path), base)
    if os.path.exists(own):
        return own
    return shipped_config(base) or own  # missing: load_yaml's error names it


def resolve_config(path: str) -> str:
    """The file a config argument names: the path itself when it exists, else the shipped config of that name
    (``lakd train cifar100/kd/resnet32x4_resnet8x4`` from any folder, or ``configs/...`` outside the clone)."""
    if os.path.exists(path):
        return path
    return shipped_config(path) or path


def _close_configs(path: str) -> str:
    name = os.path.splitext(path.replace("\\", "/"))[0]
    name = name[len("configs/"):] if name.startswith("configs/") else name
    return close_matches(name, shipped_config_names())


def load_yaml(path: str, _chain: tuple[str, ...] = ()) -> dict:
    if not os.path.exists(path):
        raise LakdError(f"config file {path!r} does not exist{_close_configs(path)}; `lakd configs` lists the shipped "
                        f"ones, which work by name from any folder (e.g. `lakd train cifar10/kd/resnet56_resnet20`)")
    if os.path.isdir(path):
        raise LakdError(f"config file {path!r} is a folder; give a YAML file (`lakd configs` lists the shipped ones)")
    real = os.path.realpath(path)
    if real in _chain:
        cycle = " -> ".join([*_chain[_chain.index(real):], real])
        raise LakdError(f"config file {path!r}: its _base_ chain loops ({cycle}); remove one of the _base_ lines")
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml_load(f) or {}
    except UnicodeDecodeError as e:
        raise LakdError(f"config file {path!r} is not UTF-8 text (byte {e.start}: {e.reason}); save it as UTF-8 "
                        f"YAML") from None
    except OSError as e:
        raise LakdError(f"cannot read config file {path!r} ({e.strerror or e}); check its permissions") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise LakdError(f"config file {path!r} is not valid YAML{where}: {getattr(e, 'problem', e)}") from None
    if not isinstance(data, dict):
        raise LakdError(f"config file {path!r} must hold a mapping of keys, not a {type(data).__name__}")
    base = data.pop("_base_", None)
    if base:
        if not isinstance(base, str):
            raise LakdError(f"config file {path!r}: _base_ must be a path to another YAML file, got {base!r}")
        parent = load_yaml(resolve_base(base, path), (*_chain, real))
        data = _merge(parent, data)
    return data


def check_type(value: Any, default: Any, key: str, where: str) -> Any:
    """Check a value against its default's type (bool, number, string, list); ints become floats where the
    default is a float. ``where`` says where the value came from, for the error message."""
    if value is None:
        return value
    if default == "auto" and isinstance(value, bool):  # true | false | auto keys (train.channels_last, ...)
        return value
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise LakdError(f"{where}: {key} must be true or false, got {value!r}")
    elif isinstance(default, (int, float)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise LakdError(f"{where}: {key} must be a number (e.g. {key}={default}), got {value!r}")
        if isinstance(default, int) and not isinstance(value, int):
            raise LakdError(f"{where}: {key} must be a whole number (e.g. {key}={default}), got {value!r}")
        if isinstance(default, float):
            value = float(value)
    elif isinstance(default, str):
        if not isinstance(value, str):
            raise LakdError(f"{where}: {key} must be a string (e.g. {key}={default or 'NAME'}), got {value!r}")
    elif isinstance(default, list):
        if not isinstance(value, list):
            example = f"[{value}]" if isinstance(value, str) and value and "," not in value else \
                f"[{','.join(str(x) for x in default)}]" if default else "[3,6,9]"
            raise LakdError(f"{where}: {key} must be a list (e.g. {key}={example}), got {value!r}")
    return value


def _check_values(cfg: dict, schema: dict, where: str, prefix: str = "") -> None:
    for k, v in cfg.items():
        d = schema.get(k)
        if isinstance(d, dict) and d:
            if isinstance(v, dict):
                _check_values(v, d, where, f"{prefix}{k}.")
        else:
            cfg[k] = check_type(v, d, f"{prefix}{k}", where)


def parse_value(text: str, default: Any, key: str) -> Any:
    """Parse an override's value with YAML and check it against the default's type."""
    try:
        value = yaml_load(text) if text != "" else ""
    except yaml.YAMLError:
        value = text
    if isinstance(default, str) and not isinstance(value, str) and value is not None and \
            not (default == "auto" and isinstance(value, bool)):
        value = text  # e.g. experiment=2024 or data.root=123 stay strings
    return check_type(value, default, key, f"override {key}={text!r}")


def apply_overrides(cfg: dict, overrides: list[str], schema: dict) -> dict:
    cfg = copy.deepcopy(cfg)
    for item in overrides:
        if "=" not in item:
            raise LakdError(f"override {item!r} must look like key=value (e.g. solver.epochs=10)")
        key, text = item.split("=", 1)
        key = key.strip()
        parts = key.split(".")
        node, sch = cfg, schema
        for i, part in enumerate(parts):
            if not isinstance(sch, dict) or part not in sch:
                prefix = ".".join(parts[:i])
                known = [f"{prefix}.{s}" if prefix else s for s in (sch if isinstance(sch, dict) else {})]
                raise LakdError(f"unknown config key {key!r}{close_matches(key, known)}; "
                                f"see `lakd train --show-config` for every key")
            if i == len(parts) - 1:
                node[part] = parse_value(text, sch[part], key)
            else:
                node = node.setdefault(part, {})
                sch = sch[part]
    return cfg


def validate(cfg: dict) -> None:
    """Value checks that do not need data or models (those raise their own errors when built)."""
    s = cfg["solver"]
    for k in ("epochs", "batch_size"):
        if not isinstance(s[k], int) or s[k] < 1:
            raise LakdError(f"solver.{k} must be a positive integer, got {s[k]!r}")
    for k in ("lr", "momentum", "weight_decay", "warmup_epochs", "min_lr"):
        if not isinstance(s[k], (int, float)) or isinstance(s[k], bool) or not math.isfinite(s[k]) or s[k] < 0:
            raise LakdError(f"solver.{k} must be a finite number >= 0, got {s[k]!r}")
    if s["lr"] == 0:
        raise LakdError("solver.lr must be positive (e.g. solver.lr=0.05), got 0")
    for sec, k in (("train", "threads"), ("data", "train_subset"), ("data", "test_subset"),
                   ("data", "num_workers"), ("solver", "max_steps_per_epoch"), ("data", "image_size")):
        v = cfg[sec][k]
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise LakdError(f"{sec}.{k} must be a whole number >= 0 (0: the default), got {v!r}")
    if not cfg["train"]["dist_timeout_s"] > 0:
        raise LakdError(f"train.dist_timeout_s must be a positive number of seconds, got {cfg['train']['dist_timeout_s']!r}")
    if s["schedule"] not in ("linear", "multistep", "cosine", "constant"):
        raise LakdError(f"solver.schedule {s['schedule']!r} is not one of linear, multistep, cosine, constant")
    if cfg["train"]["amp"] not in ("none", "bf16", "fp16", "auto"):
        raise LakdError(f"train.amp {cfg['train']['amp']!r} is not one of none, bf16, fp16, auto")
    for key in ("channels_last", "malloc"):
        if cfg["train"][key] not in (True, False, "auto"):
            raise LakdError(f"train.{key} must be true, false or auto, got {cfg['train'][key]!r}")
    nc = cfg["model"].get("num_classes")
    if nc is not None and (isinstance(nc, bool) or not isinstance(nc, int) or nc < 1):
        raise LakdError(f"model.num_classes must be a positive integer or null (the dataset's), got {nc!r}")
    for key in ("resume",):
        if cfg.get(key) is not None and not isinstance(cfg[key], str):
            raise LakdError(f"{key} must be a path (a run folder or its last.pt), got {cfg[key]!r}")
    for sec, key in (("model", "name"), ("model", "checkpoint"), ("teacher", "name"), ("teacher", "checkpoint")):
        v = cfg[sec].get(key)
        if v is not None and not isinstance(v, str):
            raise LakdError(f"{sec}.{key} must be a string, got {v!r}")
    for sec in ("model", "teacher"):
        c = cfg[sec]
        if c.get("blocks") is not None and (not isinstance(c["blocks"], list) or not c["blocks"]
                                            or not all(isinstance(b, str) for b in c["blocks"])):
            raise LakdError(f"{sec}.blocks must be a list of cut points (module paths such as layer1.0), got "
                            f"{c['blocks']!r}; `lakd models --blocks NAME` lists them")
        for key in ("stem", "classifier"):
            if c.get(key) is not None and not isinstance(c[key], str):
                raise LakdError(f"{sec}.{key} must be a module path (a string), got {c[key]!r}")
        if not isinstance(c.get("kwargs") or {}, dict):
            raise LakdError(f"{sec}.kwargs must be a mapping of keyword arguments, e.g. {sec}.kwargs={{width: 16}}")
        if not all(isinstance(x, str) for x in c.get("leaf_modules") or []):
            raise LakdError(f"{sec}.leaf_modules must be a list of class names or module paths")
    if not all(isinstance(m, int) and not isinstance(m, bool) for m in s["milestones"]):
        raise LakdError(f"solver.milestones must be a list of epochs (integers), got {s['milestones']!r}")
    for key in ("mean", "std"):
        v = cfg["data"].get(key)
        if v is not None and (not isinstance(v, list) or len(v) != 3
                              or not all(isinstance(x, (int, float)) for x in v)):
            raise LakdError(f"data.{key} must be a list of 3 numbers or null, got {v!r}")
    check_reference(cfg.get("reference"))
    w = cfg.get("waive")
    if not isinstance(w, list) or not all(isinstance(x, str) and "." in x for x in w):
        raise LakdError(f"waive must be a list of setting keys, e.g. waive=[dkd.warmup], got {w!r}")
    DISTILLERS.check_name(cfg["method"])  # unknown method -> clear error (from the catalog: no torch import)
    if uses_teacher(cfg) and not cfg["teacher"].get("name"):
        raise LakdError(f"method {cfg['method']!r} needs a teacher: set teacher.name (and teacher.checkpoint)")


#: the fields of a config's ``reference`` entry, and whether each must be given
REFERENCE_FIELDS = {"repository": True, "commit": True, "files": False, "top1": False, "reported_in": False,
                    "deviations": False}
_EXAMPLE_REF = "e.g. configs/cifar100/kd/ref/resnet32x4_resnet8x4.yaml"


def check_reference(ref: Any) -> None:
    """A ``reference`` entry: null, or a mapping naming the public code a config reproduces (``repository``
    owner/name on GitHub, the 40-hex ``commit`` read), the ``files`` it follows, the ``top1`` the reference
    reports, where (``reported_in``), and the ``deviations`` lakd does not carry."""
    if ref is None:
        return
    if not isinstance(ref, dict):
        raise LakdError(f"reference must be a mapping (repository, commit, files, top1, reported_in, deviations) "
                        f"or null, got {ref!r} ({_EXAMPLE_REF})")
    for key in ref:
        if key not in REFERENCE_FIELDS:
            raise LakdError(f"unknown key reference.{key}{close_matches(key, REFERENCE_FIELDS)}; a reference has "
                            f"{', '.join(REFERENCE_FIELDS)}")
    for key, required in REFERENCE_FIELDS.items():
        if required and ref.get(key) in (None, ""):
            raise LakdError(f"reference.{key} is missing; a reference names its repository and the commit read "
                            f"(e.g. repository: megvii-research/mdistiller, commit: <40 hex digits>)")
    repo = ref["repository"]
    if not isinstance(repo, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9_.-]+", repo):
        raise LakdError(f"reference.repository must be a GitHub owner/name (e.g. megvii-research/mdistiller), "
                        f"got {repo!r}")
    commit = ref["commit"]
    if not isinstance(commit, str) or not re.fullmatch(r"[0-9a-f]{40}", commit):
        raise LakdError(f"reference.commit must be the full 40-hex commit read (lower case, e.g. "
                        f"a08d46f10d6102bd6e3f258ca5ac880b020ea259), got {commit!r}")
    for key in ("files", "deviations"):
        v = ref.get(key)
        if v is not None and (not isinstance(v, list) or not all(isinstance(x, str) and x for x in v)):
            raise LakdError(f"reference.{key} must be a list of strings (e.g. [configs/cifar100/kd.yaml]), "
                            f"got {v!r}")
    top1 = ref.get("top1")
    if top1 is not None and (isinstance(top1, bool) or not isinstance(top1, (int, float))
                             or not 0 < top1 <= 100):
        raise LakdError(f"reference.top1 must be the reported top-1 in percent (0-100, e.g. 73.33) or null, "
                        f"got {top1!r}")
    where = ref.get("reported_in")
    if where is not None and not isinstance(where, str):
        raise LakdError(f"reference.reported_in must be a string naming where top1 is published (e.g. "
                        f"\"README.md, CIFAR-100 table\"), got {where!r}")


def check_ranges(cfg: dict) -> None:
    """What ``validate`` leaves to ranges: the solver's decay factor, increasing milestones, a warm-up no longer
    than the run, and then NaN and infinity anywhere else (``lakd.settings.check_finite``)."""
    s = cfg["solver"]
    g = s["gamma"]
    if isinstance(g, bool) or not isinstance(g, (int, float)) or not 0 < g < math.inf:
        raise LakdError(f"solver.gamma (the multistep schedule's decay factor) must be a finite number > 0, got "
                        f"{g!r}; e.g. solver.gamma=0.1")
    m = s["milestones"]
    if any(x < 0 for x in m) or any(a >= b for a, b in zip(m, m[1:])):
        fix = ",".join(str(x) for x in sorted({abs(x) for x in m})) or "150,180,210"
        raise LakdError(f"solver.milestones must be increasing epochs >= 0, got {m!r}; e.g. solver.milestones=[{fix}]")
    if s["warmup_epochs"] > s["epochs"]:
        raise LakdError(f"solver.warmup_epochs={s['warmup_epochs']} must be <= solver.epochs={s['epochs']} (the "
                        f"learning rate would still be warming up when the run ends); e.g. solver.warmup_epochs=0")
    check_finite(cfg)


def check_method_settings(cfg: dict, train_size: int | None = None, world_size: int | None = None,
                          defaults: dict | None = None) -> None:
    """The methods' declared settings (``Distiller.SETTINGS``: every registered method's section, so a NaN in
    any of them is refused) and the run's method's ``CHECKS``, through ``lakd.settings``; ``train_size`` (the
    training images, once the data are known) and ``world_size`` are facts some checks compare with."""
    defaults = defaults if defaults is not None else full_defaults()
    facts = run_facts(cfg, train_size, world_size)
    method = str(cfg.get("method")).lower()
    declarations = method_declarations()
    waived = set(cfg.get("waive") or [])
    if waived:
        own = [r["key"] for r in declarations.get(method, ({}, []))[1] if r.get("waivable")]
        for key in sorted(waived - set(own)):
            raise LakdError(f"waive=[{key}]: {method} has no rule on {key} that may be waived (waivable: "
                            f"{', '.join(own) or 'none'}); remove it from waive")
    for name, (declared, checks) in declarations.items():
        check_settings(cfg, declared, checks, defaults, facts, name, rules=name == method)


def method_declarations() -> dict[str, tuple[dict, list]]:
    """Every registered method's ``(SETTINGS, CHECKS)``: plain data, from the method catalog while the methods are
    not imported (where the registry has one holding them: no torch), else from the classes."""
    light = DISTILLERS.light() if hasattr(DISTILLERS, "light") else None
    if light is not None and all("settings" in e and "checks" in e for e in light.values()):
        return {name: (e["settings"] or {}, e["checks"] or []) for name, e in light.items()}
    return {name: (DISTILLERS.get(name).SETTINGS, DISTILLERS.get(name).CHECKS) for name in DISTILLERS.names()}


def load_config(path: str | None = None, overrides: list[str] | None = None) -> dict:
    """Defaults <- YAML file <- overrides, validated."""
    schema = full_defaults()
    cfg = copy.deepcopy(schema)
    if path:
        path = resolve_config(path)
        data = load_yaml(path)
        _check_keys(data, schema, path)
        _check_values(data, schema, path)
        cfg = _merge(cfg, data)
    cfg = apply_overrides(cfg, overrides or [], schema)
    validate(cfg)
    check_method_settings(cfg, defaults=schema)
    check_ranges(cfg)
    if not cfg["data"].get("root"):
        cfg["data"]["root"] = default_data_root()
    if not cfg["experiment"]:
        base = os.path.splitext(os.path.basename(path))[0] if path else "run"
        cfg["experiment"] = base
    return cfg


#: keys that say where and how fast a run goes, not what it computes: resume may change them freely
RESUME_FREE = {
    "experiment", "output_dir", "resume", "device", "data.root", "data.download", "data.verify_md5",
    "data.num_workers", "data.pin_memory", "data.persistent_workers", "data.prefetch_factor", "train.progress",
    "train.log_every", "train.threads", "train.save_every", "train.eval_batch_size", "train.malloc",
    "train.dist_timeout_s",
    "sdm.recompute",  # LAKD's activation recomputation: the same step (tested bitwise), less memory, more time
    "reference",  # provenance of a reference-recipe config (and every reference.* field): computes nothing
    "waive",  # which rules the checks let pass: computes nothing
}


def resume_free(key: str) -> bool:
    """Whether a flattened key (``reference.commit``) may change on resume: it or a section above it is free."""
    parts = key.split(".")
    return any(".".join(parts[:i]) in RESUME_FREE for i in range(1, len(parts) + 1))


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_changes(stored: dict | None, cfg: dict) -> dict[str, tuple[Any, Any]]:
    """``{key: (stored value, new value)}`` for the keys that change what a resumed run computes.

    ``stored`` is the config recorded in the checkpoint (None for checkpoints that record none: no check)."""
    if not isinstance(stored, dict):
        return {}
    a, b, defaults = _flatten(stored), _flatten(cfg), _flatten(full_defaults())
    missing = object()
    out: dict[str, tuple[Any, Any]] = {}
    for k in sorted(set(a) | set(b)):
        if resume_free(k):
            continue
        old, new = a.get(k, missing), b.get(k, missing)
        if old is missing and k in defaults and _same(new, defaults[k]):
            continue  # a key added by a later lakd, at its default (which keeps what earlier versions computed)
        if not _same(old, new):
            out[k] = (None if old is missing else old, None if new is missing else new)
    return out


def _same(x: Any, y: Any) -> bool:
    """Equal as config values: the strings 'true'/'false' that earlier versions kept for auto|true|false keys
    equal the booleans that overrides parse to now."""
    def norm(v: Any) -> Any:
        return {"true": True, "false": False}.get(v.lower(), v) if isinstance(v, str) else v
    return norm(x) == norm(y)


def dump_config(cfg: dict) -> str:
    return yaml.safe_dump(cfg, sort_keys=False, default_flow_style=None)
