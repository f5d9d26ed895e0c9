"""Reading run folders: ``find_runs`` (run folders under the given paths) and ``load_run`` (one folder ->
``Run``: its summary when complete, else its metrics so far).

A run folder (``runs/<experiment>/``, written by the trainer) holds ``config.yaml``, ``metrics.jsonl`` (one JSON
line per evaluated epoch, read by ``lakd.engine.metrics.read_metrics``) and, once training finished,
``summary.json``. Runs without ``summary.json`` are incomplete.
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import yaml

from ..distillers import DISTILLERS
from ..engine.metrics import read_metrics
from ..errors import LakdError


@dataclass
class Run:
    path: str
    experiment: str
    method: str
    student: str
    teacher: str | None
    dataset: str
    seed: int | None
    complete: bool
    epochs_planned: int | None = None
    epochs_done: int = 0
    final_top1: float | None = None
    best_top1: float | None = None
    best_epoch: int | None = None
    final_top5: float | None = None
    final_ek: float | None = None
    teacher_top1: float | None = None
    wall_time_s: float | None = None
    curve: list[tuple[int, float]] = field(default_factory=list)
    problem: str = ""
    damaged: bool = False  # summary.json exists but cannot be read: the run finished and its result is lost
    settings: dict = field(default_factory=dict)  # the method's own config keys, flattened ("sdm.splits": ...)

    @property
    def pair(self) -> str:
        return f"{self.teacher or '—'} → {self.student}"


def _read_json(path: str):
    with open(path) as f:
        return json.load(f)


def is_run_dir(path: str) -> bool:
    names = ("summary.json", "metrics.jsonl", "config.yaml")
    return any(os.path.exists(os.path.join(path, f)) for f in names)


def find_runs(paths: Sequence[str]) -> list[str]:
    """Run folders among ``paths``: each path is a run folder or a folder holding run folders (any depth)."""
    out: list[str] = []
    for p in paths:
        if not os.path.isdir(p):
            raise LakdError(f"run folder {p!r} does not exist or is not a folder; give run folders such as "
                            f"runs/<experiment> or a folder holding them such as runs/")
        if is_run_dir(p):
            out.append(p)
            continue
        found = []
        for root, dirs, _files in os.walk(p):
            dirs[:] = sorted(d for d in dirs if d != "tb" and not d.startswith("."))
            if is_run_dir(root):
                found.append(root)
                dirs[:] = []
        if not found:
            raise LakdError(f"no run folders (with summary.json, metrics.jsonl or config.yaml) under {p!r}")
        out += found
    seen, uniq = set(), []
    for p in out:
        key = os.path.realpath(p)
        if key not in seen:
            seen.add(key)
            uniq.append(p)
    return uniq


def _num(v):
    """A finite number, or None for anything else (a malformed summary.json must not stop the report)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return float(v)


def _seed(v):
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def load_run(path: str) -> Run:
    """One run folder: ``summary.json`` when present (complete), else the last line of ``metrics.jsonl``."""
    cfg: dict = {}
    cfg_path = os.path.join(path, "config.yaml")
    if os.path.exists(cfg_path):
        try:
            with open(cfg_path) as f:
                cfg = yaml.safe_load(f) or {}
        except (yaml.YAMLError, OSError, UnicodeDecodeError):
            cfg = {}
        if not isinstance(cfg, dict):
            cfg = {}
    summary = None
    problem = ""
    sp = os.path.join(path, "summary.json")
    if os.path.exists(sp):
        try:
            summary = _read_json(sp)
        except (json.JSONDecodeError, OSError, UnicodeDecodeError) as e:
            problem = f"unreadable summary.json ({e})"
        if summary is not None and not isinstance(summary, dict):
            problem, summary = f"summary.json holds a {type(summary).__name__}, not a mapping", None
    metrics, bad = read_metrics(os.path.join(path, "metrics.jsonl"))
    if bad:
        problem = (problem + "; " if problem else "") + f"{bad} unreadable line(s) in metrics.jsonl"
    s = summary or {}
    model = cfg.get("model") or {}
    teacher = cfg.get("teacher") or {}
    data = cfg.get("data") or {}
    solver = cfg.get("solver") or {}
    curve = [(int(r["epoch"]), float(r["test_top1"])) for r in metrics
             if r.get("epoch") is not None and r.get("test_top1") is not None]
    run = Run(
        path=path,
        experiment=str(s.get("experiment") or cfg.get("experiment")
                       or os.path.basename(os.path.normpath(path))),
        method=str(s.get("method") or cfg.get("method") or "unknown"),
        student=str(s.get("student") or model.get("name") or "unknown"),
        teacher=s.get("teacher") or teacher.get("name") or None,
        dataset=str(s.get("dataset") or data.get("dataset") or "unknown"),
        seed=_seed(s.get("seed", cfg.get("seed"))),
        complete=summary is not None,
        epochs_planned=s.get("epochs") or solver.get("epochs"),
        epochs_done=max((e for e, _ in curve), default=0),
        curve=curve,
        problem=problem,
        damaged=os.path.exists(sp) and summary is None,
        settings=_method_settings(cfg),
    )
    if summary is not None:
        run.final_top1 = _num(s.get("final_top1"))
        run.final_top5 = _num(s.get("final_top5"))
        run.best_top1 = _num(s.get("best_top1"))
        run.best_epoch = s.get("best_epoch")
        run.final_ek = _num(s.get("final_ek"))
        run.teacher_top1 = _num(s.get("teacher_top1"))
        run.wall_time_s = _num(s.get("wall_time_s"))
        if run.epochs_done == 0 and s.get("epochs"):
            run.epochs_done = int(s["epochs"])
    elif metrics:
        last = [r for r in metrics if r.get("test_top1") is not None]
        if last:
            run.final_top1 = float(last[-1]["test_top1"])
            run.final_top5 = _num(last[-1].get("test_top5"))
            run.final_ek = _num(last[-1].get("ek"))
            best = max(last, key=lambda r: r["test_top1"])
            run.best_top1, run.best_epoch = float(best["test_top1"]), best.get("epoch")
    return run


def _method_settings(cfg: dict) -> dict:
    """The run's values of its method's own config sections (e.g. ``sdm``, ``ndam``, ``lakd`` for LAKD)."""
    method = cfg.get("method", "")
    if not isinstance(method, str) or method not in DISTILLERS:  # an unknown method: compare nothing
        return {}
    sections = list(DISTILLERS.get(method).DEFAULTS)
    flat: dict = {}
    for sec in sections:
        for k, v in (cfg.get(sec) or {}).items():
            flat[f"{sec}.{k}"] = json.dumps(v, sort_keys=True)
    return flat


def write_text(path: str, text: str) -> str:
    """Write a report file (its folder created when missing); returns the path."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    return path
