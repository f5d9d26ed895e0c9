"""Tables of results from run folders, shaped like the paper's Table 1, plus CSV and accuracy curves.

A run folder (``runs/<experiment>/``, written by the trainer) holds ``config.yaml``, ``metrics.jsonl`` (one
JSON line per evaluated epoch) and, once training finished, ``summary.json``. Runs are grouped by dataset, method
and teacher -> student pair; a cell is the mean final top-1 over seeds, "± std" (sample standard deviation,
n - 1) when there are several seeds, and the mean best-epoch top-1. Runs without ``summary.json`` are
incomplete: they are listed from their ``metrics.jsonl`` and only enter a table cell when the cell has no
complete run (the cell is then marked with a dagger).
"""
from __future__ import annotations

import csv
import json
import math
import os
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field

import yaml

from ..distillers import DISTILLERS, display_name, report_order
from ..engine.metrics import read_metrics
from ..errors import LakdError

DAGGER = "†"


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
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


def load_run(path: str) -> Run:
    """One run folder: ``summary.json`` when present (complete), else the last line of ``metrics.jsonl``."""
    cfg: dict = {}
    cfg_path = os.path.join(path, "config.yaml")
    if os.path.exists(cfg_path):
        try:
            with open(cfg_path) as f:
                cfg = yaml.safe_load(f) or {}
        except yaml.YAMLError:
            cfg = {}
    summary = None
    problem = ""
    sp = os.path.join(path, "summary.json")
    if os.path.exists(sp):
        try:
            summary = _read_json(sp)
        except (json.JSONDecodeError, OSError) as e:
            problem = f"unreadable summary.json ({e})"
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
        seed=s.get("seed", cfg.get("seed")),
        complete=summary is not None,
        epochs_planned=s.get("epochs") or solver.get("epochs"),
        epochs_done=max((e for e, _ in curve), default=0),
        curve=curve,
        problem=problem,
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


@dataclass
class Cell:
    runs: list[Run]
    incomplete: bool  # built from incomplete runs only

    def values(self, attr: str) -> list[float]:
        return [getattr(r, attr) for r in self.runs if getattr(r, attr) is not None]

    def stats(self, attr: str) -> tuple[float | None, float | None, int]:
        """(mean, sample std or None for one value, count) of a run attribute."""
        v = self.values(attr)
        if not v:
            return None, None, 0
        return statistics.fmean(v), (statistics.stdev(v) if len(v) > 1 else None), len(v)


@dataclass
class Table:
    dataset: str
    columns: list[tuple[str | None, str]]  # (teacher, student)
    methods: list[str]
    cells: dict[tuple[str, int], Cell]  # (method, column index) -> cell
    teacher_top1: dict[int, float | None]


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


def label_variants(runs: Sequence[Run]) -> None:
    """Runs of one method on one pair whose method settings differ (LAKD's split points, NDAM switches...)
    become separate rows, labelled by the settings that differ, e.g. ``lakd (sdm.splits=[1, 4, 9])``.
    Seeds of the same settings stay in one row."""
    groups: dict[tuple, list[Run]] = {}
    for r in runs:
        groups.setdefault((r.dataset, r.method, r.pair), []).append(r)
    for members in groups.values():
        keys = sorted({k for r in members for k in r.settings})
        varying = [k for k in keys if len({r.settings.get(k) for r in members}) > 1]
        if not varying:
            continue
        for r in members:
            parts = ", ".join(f"{k}={json.loads(r.settings[k]) if k in r.settings else None}" for k in varying)
            r.method = f"{r.method} ({parts})"


def _method_key(m: str):
    """Table order: each method's declared ``report_order`` (the paper's Table 1), then the name (variants of a
    method, e.g. ``lakd (sdm.splits=[1, 4, 9])``, sort by their settings)."""
    m = m.lower()
    return (report_order(m.split(" (")[0]), m)


def _display(method: str) -> str:
    """A row label as figures write it: the method's declared display name, then its variant settings."""
    base, sep, rest = method.partition(" (")
    return display_name(base) + sep + rest


def build_tables(runs: Sequence[Run]) -> list[Table]:
    """Group runs into one table per dataset: rows are methods, columns teacher -> student pairs.

    Runs without a teacher (training from scratch) fill every column whose student is their model (the
    paper's "Student" row); they get a column of their own only when no distillation run uses their model.
    """
    tables = []
    for ds in sorted({r.dataset for r in runs}):
        rs = [r for r in runs if r.dataset == ds]
        cols: list[tuple[str | None, str]] = []
        for r in rs:
            if r.teacher and (r.teacher, r.student) not in cols:
                cols.append((r.teacher, r.student))
        for r in rs:
            if not r.teacher and not any(s == r.student for _, s in cols):
                cols.append((None, r.student))
        methods = sorted({r.method for r in rs}, key=_method_key)
        cells: dict[tuple[str, int], Cell] = {}
        tacc: dict[int, float | None] = {}
        for ci, (t, s) in enumerate(cols):
            t_vals = [r.teacher_top1 for r in rs
                      if r.teacher == t and r.student == s and r.teacher_top1 is not None]
            tacc[ci] = statistics.fmean(t_vals) if t_vals else None
            for m in methods:
                members = [r for r in rs
                           if r.method == m and r.student == s and (r.teacher == t or not r.teacher)]
                if not members:
                    continue
                done = [r for r in members if r.complete and r.final_top1 is not None]
                if done:
                    cells[(m, ci)] = Cell(done, incomplete=False)
                else:
                    part = [r for r in members if r.final_top1 is not None]
                    if part:
                        cells[(m, ci)] = Cell(part, incomplete=True)
        tables.append(Table(ds, cols, methods, cells, tacc))
    return tables


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2f}"


def format_cell(cell: Cell, attr: str = "final_top1", best_attr: str | None = "best_top1") -> str:
    mean, std, _ = cell.stats(attr)
    if mean is None:
        return "n/a"
    txt = _fmt(mean) + (f" ± {std:.2f}" if std is not None else "")
    if best_attr:
        bmean, _, _ = cell.stats(best_attr)
        if bmean is not None:
            txt += f" (best {bmean:.2f})"
    if cell.incomplete:
        txt += f" {DAGGER}"
    return txt


def _column_title(col: tuple[str | None, str]) -> str:
    t, s = col
    return f"{t} → {s}" if t else f"{s} (scratch)"


def _markdown_table(t: Table, attr: str, best_attr: str | None, with_teacher: bool) -> list[str]:
    header = ["Method"] + [_column_title(c) for c in t.columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    if with_teacher:
        accs = [_fmt(t.teacher_top1.get(i)) for i in range(len(t.columns))]
        lines.append("| Teacher | " + " | ".join(accs) + " |")
    best: dict[int, float] = {}
    for ci in range(len(t.columns)):
        means = [c.stats(attr)[0] for (m, i), c in t.cells.items() if i == ci and not c.incomplete]
        means = [v for v in means if v is not None]
        if len(means) > 1:  # bold only where there is something to compare
            best[ci] = max(means)
    for m in t.methods:
        row = [m]
        any_value = False
        for ci in range(len(t.columns)):
            c = t.cells.get((m, ci))
            if c is None or c.stats(attr)[0] is None:
                row.append("—")
                continue
            any_value = True
            txt = format_cell(c, attr, best_attr)
            mean = c.stats(attr)[0]
            if not c.incomplete and ci in best and mean == best[ci]:
                txt = f"**{txt}**"
            row.append(txt)
        if any_value:
            lines.append("| " + " | ".join(row) + " |")
    return lines


def render_markdown(runs: Sequence[Run], tables: Sequence[Table]) -> str:
    out = ["# Results", ""]
    complete = [r for r in runs if r.complete]
    incomplete = [r for r in runs if not r.complete]
    out.append(f"{len(runs)} run folder(s): {len(complete)} complete, {len(incomplete)} incomplete.")
    out.append("")
    for t in tables:
        out.append(f"## {t.dataset}: top-1 accuracy (%)")
        out.append("")
        out.append("Final-epoch top-1, mean ± sample std over seeds (std shown for 2+ seeds), and the mean "
                   "best-epoch top-1 in parentheses. Best cell per column in bold.")
        out.append("")
        out += _markdown_table(t, "final_top1", "best_top1", with_teacher=any(
            v is not None for v in t.teacher_top1.values()))
        out.append("")
        if any(c.stats("final_ek")[0] is not None for c in t.cells.values()):
            out.append(f"### {t.dataset}: Extracurricular Knowledge, EK (%)")
            out.append("")
            out.append("Final-epoch EK (share of the images the teacher gets wrong that the student gets "
                       "right), mean ± sample std over seeds.")
            out.append("")
            out += _markdown_table(t, "final_ek", None, with_teacher=False)
            out.append("")
    if any(c.incomplete for t in tables for c in t.cells.values()):
        out.append(f"{DAGGER} from incomplete runs only: values at the last evaluated epoch (see below).")
        out.append("")
    used = {id(r) for t in tables for c in t.cells.values() for r in c.runs}
    left_out = [r for r in incomplete if id(r) not in used]
    if left_out:
        out.append("Incomplete runs left out of the tables (cells use the complete runs): "
                   + "; ".join(f"{r.experiment} ({r.method}, {r.pair}, seed {r.seed}, epoch {r.epochs_done}/"
                               f"{r.epochs_planned if r.epochs_planned is not None else '?'})" for r in left_out)
                   + ".")
        out.append("")
    out.append("## Runs")
    out.append("")
    out.append("| Experiment | Dataset | Method | Teacher → Student | Seed | Epochs | Final top-1 "
               "| Best top-1 (epoch) | Final EK | Status |")
    out.append("|---|---|---|---|---|---|---|---|---|---|")
    order = sorted(runs, key=lambda r: (r.dataset, _method_key(r.method), r.pair, str(r.seed), r.experiment))
    for r in order:
        planned = r.epochs_planned if r.epochs_planned is not None else "?"
        status = ("complete" if r.complete
                  else f"INCOMPLETE (no summary.json; epoch {r.epochs_done}/{planned})")
        if r.problem:
            status += f"; {r.problem}"
        best = "n/a" if r.best_top1 is None else f"{r.best_top1:.2f} ({r.best_epoch})"
        out.append(f"| {r.experiment} | {r.dataset} | {r.method} | {r.pair} | {r.seed} "
                   f"| {r.epochs_done}/{planned} | {_fmt(r.final_top1)} | {best} | {_fmt(r.final_ek)} | {status} |")
    out.append("")
    return "\n".join(out)


CSV_FIELDS = ["dataset", "column", "method", "teacher", "student", "n_runs", "seeds", "complete", "final_top1_mean",
              "final_top1_std", "best_top1_mean", "best_top1_std", "final_top5_mean", "final_ek_mean",
              "final_ek_std", "teacher_top1", "experiments"]


def csv_rows(tables: Sequence[Table]) -> list[dict]:
    rows = []
    for t in tables:
        for (m, ci), c in sorted(t.cells.items(), key=lambda kv: (_method_key(kv[0][0]), kv[0][1])):
            teacher, student = t.columns[ci]
            f_mean, f_std, _ = c.stats("final_top1")
            b_mean, b_std, _ = c.stats("best_top1")
            e_mean, e_std, _ = c.stats("final_ek")
            own_teacher = teacher if any(r.teacher for r in c.runs) else None
            rows.append({
                "dataset": t.dataset, "column": _column_title(t.columns[ci]), "method": m,
                "teacher": own_teacher or "", "student": student,
                "n_runs": len(c.runs), "seeds": ";".join(str(r.seed) for r in c.runs),
                "complete": not c.incomplete,
                "final_top1_mean": f_mean, "final_top1_std": f_std, "best_top1_mean": b_mean,
                "best_top1_std": b_std, "final_top5_mean": c.stats("final_top5")[0],
                "final_ek_mean": e_mean, "final_ek_std": e_std, "teacher_top1": t.teacher_top1.get(ci),
                "experiments": ";".join(r.experiment for r in c.runs),
            })
    return rows


def write_csv(tables: Sequence[Table], path: str) -> str:
    """Same data as the Markdown tables, full precision (Python's shortest round-trip float repr)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        for row in csv_rows(tables):
            w.writerow({k: ("" if v is None else repr(v) if isinstance(v, float) else v)
                        for k, v in row.items()})
    return path


def _column_runs(t: Table, ci: int, runs: Sequence[Run]) -> list[Run]:
    teacher, student = t.columns[ci]
    return [r for r in runs if r.dataset == t.dataset and r.student == student
            and (r.teacher == teacher or not r.teacher)]


def plot_curves(runs: Sequence[Run], path: str, tables: Sequence[Table] | None = None) -> str:
    """Test top-1 vs epoch, one line per run, one panel per table column (dataset, teacher -> student; runs
    from scratch appear in the panels of their model). Colour: method; line style: seed; dashed: incomplete."""
    from matplotlib import colormaps

    from .visualize import _new_figure, _save

    with_curve = [r for r in runs if r.curve]
    if not with_curve:
        raise LakdError("no run has test accuracies in metrics.jsonl to plot; nothing to draw for --plot")
    tables = build_tables(with_curve) if tables is None else tables
    panels = [(t, ci) for t in tables for ci in range(len(t.columns))]
    panels = [(t, ci) for t, ci in panels if any(r.curve for r in _column_runs(t, ci, with_curve))]
    methods = sorted({r.method for r in with_curve}, key=_method_key)
    colours = {m: colormaps["tab10"](i % 10) for i, m in enumerate(methods)}
    styles = ["-", "-.", ":"]
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig = _new_figure(5.2 * ncols, 3.8 * nrows)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for pi, (t, ci) in enumerate(panels):
        ax = axes[pi // ncols, pi % ncols]
        members = sorted(_column_runs(t, ci, with_curve), key=lambda r: (_method_key(r.method), str(r.seed)))
        for m in methods:
            for k, r in enumerate(x for x in members if x.method == m):
                xs, ys = zip(*r.curve)
                style = styles[k % len(styles)] if r.complete else "--"
                ax.plot(xs, ys, style, color=colours[r.method], lw=1.4 if r.complete else 1.0, alpha=0.9,
                        label=f"{_display(r.method)} seed {r.seed}" + ("" if r.complete else " (incomplete)"))
        ax.set_title(f"{t.dataset}: {_column_title(t.columns[ci])}", fontsize=10)
        ax.set_xlabel("epoch")
        ax.set_ylabel("test top-1 (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for pi in range(len(panels), nrows * ncols):
        axes[pi // ncols, pi % ncols].set_visible(False)
    fig.tight_layout()
    return _save(fig, path)


def make_report(paths: Sequence[str], out: str | None = "report.md", csv_path: str | None = None,
                plot_path: str | None = None) -> dict:
    """Read run folders, write the Markdown report (and the CSV / plot when asked); returns what it wrote."""
    runs = [load_run(p) for p in find_runs(paths)]
    label_variants(runs)
    tables = build_tables(runs)
    text = render_markdown(runs, tables)
    written = {"markdown": text, "runs": runs, "tables": tables}
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as f:
            f.write(text)
        written["out"] = out
    if csv_path:
        written["csv"] = write_csv(tables, csv_path)
    if plot_path:
        written["plot"] = plot_curves(runs, plot_path, tables)
    return written
