"""The one loader of results: ``find_runs`` (run folders under the given paths), ``load_run`` (one folder ->
``Run``: its summary when complete, else its metrics so far) and ``load_study`` (runs over seeds as rows and
groups, laid out by the sweep's typed plan, ``lakd.sweep.spec.Plan``, read from ``sweep.json``).

A run folder (``runs/<experiment>/``, written by the trainer) holds ``config.yaml``, ``metrics.jsonl`` (one JSON
line per evaluated epoch, read by ``lakd.engine.metrics.read_metrics``) and, once training finished,
``summary.json``. Runs without ``summary.json`` are incomplete.
"""
from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import yaml

from ..distillers import DISTILLERS
from ..engine import rundir
from ..engine.metrics import read_metrics
from ..errors import LakdError
from ..sweep.spec import Plan, read_plan
from .stats import Paired, Summary, paired_difference, summarize

SEED_SUFFIX = re.compile(r"-s(\d+)(?:-\d+)?$")


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
    #: the test images its top-1 (and the teacher's) are measured on, and the test set's size; both None when
    #: not recorded (runs before summary.json held them: then ``test_images`` is the config's data.test_subset)
    test_images: int | None = None
    test_images_total: int | None = None

    @property
    def pair(self) -> str:
        return f"{self.teacher or '—'} → {self.student}"

    @property
    def subset(self) -> str:
        """"" when measured on the whole test set (or nothing says otherwise), else how many of how many test
        images its numbers are measured on, e.g. "1000 of 10000" (data.test_subset)."""
        n, total = self.test_images, self.test_images_total
        if not n or (total and n >= total):
            return ""
        return f"{n} of {total}" if total else f"{n}"


def _read_json(path: str):
    with open(path) as f:
        return json.load(f)


def is_run_dir(path: str) -> bool:
    return any(os.path.exists(os.path.join(path, f)) for f in rundir.SMALL_OUTPUTS)


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


def _count(v) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else None


def _seed(v):
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def load_run(path: str) -> Run:
    """One run folder: ``summary.json`` when present (complete), else the last line of ``metrics.jsonl``."""
    cfg: dict = {}
    cfg_path = os.path.join(path, rundir.CONFIG)
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
    sp = os.path.join(path, rundir.SUMMARY)
    if os.path.exists(sp):
        try:
            summary = _read_json(sp)
        except (json.JSONDecodeError, OSError, UnicodeDecodeError) as e:
            problem = f"unreadable summary.json ({e})"
        if summary is not None and not isinstance(summary, dict):
            problem, summary = f"summary.json holds a {type(summary).__name__}, not a mapping", None
    metrics, bad = read_metrics(os.path.join(path, rundir.METRICS))
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
    subset = data.get("test_subset") if isinstance(data.get("test_subset"), int) else None
    run.test_images = _count(s.get("test_images")) or (subset or None)
    run.test_images_total = _count(s.get("test_images_total"))
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


# ----------------------------------------------------------------------------------------------------------------
# Over seeds: rows of one setting, several seeds each, laid out as the sweep's plan says
@dataclass
class Row:
    name: str  # the variant (run name without -s<seed>)
    label: str
    runs: dict[int, Run] = field(default_factory=dict)  # seed -> the run counted
    repeats: dict[int, list[Run]] = field(default_factory=dict)  # seed -> the runs not counted (same seed)
    incomplete: list[Run] = field(default_factory=list)
    same_as: str | None = None  # a merged row: the row whose runs it reads
    paper: float | None = None  # the published number shown beside the row (the spec's ``paper:``)
    skip: str | None = None  # the spec's reason not to run the row (its earlier runs still count)
    outside: bool = False  # a row of an earlier plan, kept for its finished runs (outside the current spec)

    def values(self, attr: str = "final_top1") -> dict[int, float]:
        return {s: getattr(r, attr) for s, r in sorted(self.runs.items()) if getattr(r, attr) is not None}

    def stats(self, attr: str = "final_top1") -> Summary:
        return summarize(list(self.values(attr).values()))


@dataclass
class Group:
    name: str
    title: str
    rows: list[Row]
    reference: str | None
    compare: list[tuple[str, str]]
    paper_note: str = ""  # whose numbers the rows' ``paper`` values are


def _variant(run: Run) -> str:
    return SEED_SUFFIX.sub("", run.experiment)


def load_study(paths: Sequence[str], reference: str | None = None, groups: Sequence[str] | None = None,
               ) -> tuple[list[Group], list[Run], Plan | None]:
    """Rows and groups from run folders; the first sweep plan (``sweep.json``) found among ``paths`` gives the
    layout (``lakd.sweep.spec.Plan``, the format the sweep writes). ``groups``: only these sweep groups, in the
    order named (the returned plan then holds only their runs, so that "runs planned" counts theirs)."""
    plan: Plan | None = None
    for p in paths:
        plan = read_plan(p)
        if plan is not None:
            break
    if groups:
        plan = select_groups(plan, groups)
    run_paths: list[str] = []
    for p in paths:
        try:
            run_paths += find_runs([p])
        except LakdError:
            if not os.path.exists(os.path.join(p, rundir.SWEEP_PLAN)):
                raise  # a sweep's results folder with no finished run yet is an empty table, not an error
    runs = [load_run(p) for p in run_paths]
    by_variant: dict[str, Row] = {}
    alias = {r.name: r.variant for r in plan.runs} if plan else {}  # run name -> variant (merged rows too)
    for r in sorted(runs, key=lambda r: r.path):
        v = alias.get(r.experiment) or _variant(r)
        row = by_variant.setdefault(v, Row(v, v))
        if not r.complete or r.final_top1 is None:
            row.incomplete.append(r)
            continue
        seed = int(r.seed) if r.seed is not None else -1
        if seed in row.runs:
            row.repeats.setdefault(seed, []).append(r)
        else:
            row.runs[seed] = r
    groups: list[Group] = []
    if plan and plan.groups:
        for g in plan.groups:
            rows = []
            names = {}
            for spec_row in g.rows:
                base = by_variant.get(spec_row.variant) or Row(spec_row.variant, spec_row.label)
                # the same runs under this group's label (a merged row reads the runs of the row it equals)
                rows.append(Row(spec_row.name, spec_row.label, base.runs, base.repeats, base.incomplete,
                                same_as=spec_row.variant if spec_row.variant != spec_row.name else None,
                                paper=spec_row.paper, skip=spec_row.skip, outside=spec_row.outside))
                names[spec_row.name] = rows[-1]
            ref = reference or g.reference
            if ref and ref not in names:
                ref = None if not reference else _unknown_row(reference, names)
            groups.append(Group(g.name, g.title or g.name, rows, ref, [tuple(c) for c in g.compare],
                                g.paper_note))
    else:
        rows = sorted(by_variant.values(), key=lambda r: r.name)
        names = {r.name: r for r in rows}
        if reference and reference not in names:
            _unknown_row(reference, names)
        groups.append(Group("runs", "Runs by setting", rows, reference, []))
    return groups, runs, plan


def select_groups(plan: Plan | None, names: Sequence[str]) -> Plan:
    """The plan reduced to the groups ``names`` (in that order) and their planned runs; an unknown name, or no
    plan at all, is an error naming what there is."""
    if plan is None or not plan.groups:
        raise LakdError("--groups needs a sweep's results folder (one holding sweep.json, written by lakd sweep); "
                        "the folders given hold none")
    by_name = {g.name: g for g in plan.groups}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise LakdError(f"--groups: no sweep group {', '.join(map(repr, unknown))}; the plan's groups: "
                        f"{', '.join(by_name)}")
    keep = set(names)
    return replace(plan, groups=[by_name[n] for n in dict.fromkeys(names)],
                   runs=[r for r in plan.runs if r.group in keep])


def _unknown_row(name: str, names) -> None:
    raise LakdError(f"--reference {name!r} is not a row of the report; rows: {', '.join(names)}")


def row_map(groups: Sequence[Group]) -> dict[str, Row]:
    out: dict[str, Row] = {}
    for g in groups:
        for r in g.rows:
            out.setdefault(r.name, r)
    return out


def comparisons(group: Group, all_rows: dict[str, Row], attr: str = "final_top1",
                with_reference: bool = False) -> list[Paired]:
    """The group's declared pairs (rows of any group); with ``with_reference`` also every row against the
    group's reference row."""
    pairs = list(group.compare)
    if with_reference and group.reference:
        pairs += [(r.name, group.reference) for r in group.rows
                  if r.name != group.reference and (r.name, group.reference) not in pairs]
    own = {r.name: r for r in group.rows}  # a row of this group under this group's label
    out = []
    for a, b in pairs:
        if a not in all_rows or b not in all_rows:
            missing = a if a not in all_rows else b
            raise LakdError(f"group {group.name}: compare names {missing!r}, which is not a row; rows: "
                            f"{', '.join(all_rows)}")
        ra, rb = own.get(a) or all_rows[a], own.get(b) or all_rows[b]
        out.append(paired_difference(ra.values(attr), rb.values(attr), ra.label, rb.label))
    return out


def curve_panels(groups: Sequence[Group]) -> list[tuple[str, list[tuple[str, list[dict[int, float]]]]]]:
    """What ``visualize.plot_seed_curves`` draws: per group, per row, one {epoch: top-1} per counted seed."""
    return [(g.title, [(row.label, [dict(r.curve) for r in row.runs.values() if r.curve]) for row in g.rows])
            for g in groups]
