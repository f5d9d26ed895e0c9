"""Result tables from runs, shaped like the paper's Table 1: one table per dataset, rows are methods (in each
method's declared ``report_order``), columns teacher -> student pairs; a cell holds the runs of one method and pair.
"""
from __future__ import annotations

import json
import os
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field

from ..distillers import display_name, report_order
from ..engine import rundir
from .runs import Run
from .stats import summarize

DAGGER = "†"
REPEAT = "‡"


@dataclass
class Cell:
    runs: list[Run]
    incomplete: bool  # built from incomplete runs only
    repeats: list[Run] = field(default_factory=list)  # further runs of a seed already in ``runs`` (not averaged)

    def values(self, attr: str) -> list[float]:
        return [getattr(r, attr) for r in self.runs if getattr(r, attr) is not None]

    def stats(self, attr: str) -> tuple[float | None, float | None, int]:
        """(mean, sample std or None for one value, count) of a run attribute."""
        s = summarize(self.values(attr), level=None)
        return s.mean, s.std, s.n

    @property
    def subset(self) -> str:
        """How many test images its runs were measured on when that is part of the test set (``Run.subset``;
        several values joined), else ""."""
        return subset_phrase(self.runs)


def subset_phrase(runs: Sequence[Run]) -> str:
    """How many test images runs were measured on when some used part of the test set, e.g. "1000 of 10000"
    (different counts joined with " / ", "all" among them for runs on the whole test set); "" when every run
    used the whole test set."""
    if not any(r.subset for r in runs):
        return ""
    return " / ".join(sorted({r.subset or "all" for r in runs}))


@dataclass
class Table:
    dataset: str
    columns: list[tuple[str | None, str]]  # (teacher, student)
    methods: list[str]
    cells: dict[tuple[str, int], Cell]  # (method, column index) -> cell
    teacher_top1: dict[int, float | None]
    #: column index -> the test images its teacher's top-1 is measured on when a subset ("1000 of 10000")
    teacher_subset: dict[int, str] = field(default_factory=dict)


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


def method_key(m: str):
    """Table order: each method's declared ``report_order`` (the paper's Table 1), then the name (variants of a
    method, e.g. ``lakd (sdm.splits=[1, 4, 9])``, sort by their settings)."""
    m = m.lower()
    return (report_order(m.split(" (")[0]), m)


def display_label(method: str) -> str:
    """A row label as figures write it: the method's declared display name, then its variant settings."""
    base, sep, rest = method.partition(" (")
    return display_name(base) + sep + rest


def _mtime(r: Run) -> float:
    for name in (rundir.SUMMARY, rundir.METRICS, rundir.CONFIG):
        try:
            return os.path.getmtime(os.path.join(r.path, name))
        except OSError:
            continue
    return 0.0


def one_per_seed(runs: Sequence[Run]) -> tuple[list[Run], list[Run]]:
    """``(kept, repeats)``: the newest run of each seed, and the other runs of a seed that is already kept.

    Repeated runs of one seed are not independent samples: averaging them would shrink the std and weight that
    seed more. Runs with no recorded seed are all kept."""
    kept: dict = {}
    repeats: list[Run] = []
    for r in sorted(runs, key=_mtime, reverse=True):
        key = r.seed if r.seed is not None else ("no seed", id(r))
        if key in kept:
            repeats.append(r)
        else:
            kept[key] = r
    return [r for r in runs if any(r is k for k in kept.values())], repeats


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
        methods = sorted({r.method for r in rs}, key=method_key)
        cells: dict[tuple[str, int], Cell] = {}
        tacc: dict[int, float | None] = {}
        tsub: dict[int, str] = {}
        for ci, (t, s) in enumerate(cols):
            t_runs = [r for r in rs if r.teacher == t and r.student == s and r.teacher_top1 is not None]
            t_vals = [r.teacher_top1 for r in t_runs]
            tacc[ci] = statistics.fmean(t_vals) if t_vals else None
            tsub[ci] = subset_phrase(t_runs)
            for m in methods:
                members = [r for r in rs
                           if r.method == m and r.student == s and (r.teacher == t or not r.teacher)]
                if not members:
                    continue
                done = [r for r in members if r.complete and r.final_top1 is not None]
                if done:
                    kept, rep = one_per_seed(done)
                    cells[(m, ci)] = Cell(kept, incomplete=False, repeats=rep)
                else:
                    part = [r for r in members if r.final_top1 is not None]
                    if part:
                        kept, rep = one_per_seed(part)
                        cells[(m, ci)] = Cell(kept, incomplete=True, repeats=rep)
        tables.append(Table(ds, cols, methods, cells, tacc, tsub))
    return tables


def format_value(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2f}"


def format_cell(cell: Cell, attr: str = "final_top1", best_attr: str | None = "best_top1") -> str:
    mean, std, _ = cell.stats(attr)
    if mean is None:
        return "n/a"
    txt = format_value(mean) + (f" ± {std:.2f}" if std is not None else "")
    if best_attr:
        bmean, _, _ = cell.stats(best_attr)
        if bmean is not None:
            txt += f" (best {bmean:.2f})"
    if cell.incomplete:
        txt += f" {DAGGER}"
    if cell.repeats:
        txt += f" {REPEAT}"
    return txt


def column_title(col: tuple[str | None, str]) -> str:
    t, s = col
    return f"{t} → {s}" if t else f"{s} (no teacher)"


def column_runs(t: Table, ci: int, runs: Sequence[Run]) -> list[Run]:
    teacher, student = t.columns[ci]
    return [r for r in runs if r.dataset == t.dataset and r.student == student
            and (r.teacher == teacher or not r.teacher)]


CSV_FIELDS = ["dataset", "column", "method", "label", "teacher", "student", "n_runs", "seeds", "complete",
              "final_top1_mean", "final_top1_std", "best_top1_mean", "best_top1_std", "final_top5_mean",
              "final_ek_mean", "final_ek_std", "teacher_top1", "test_images", "experiments"]


def csv_rows(tables: Sequence[Table]) -> list[dict]:
    rows = []
    for t in tables:
        for (m, ci), c in sorted(t.cells.items(), key=lambda kv: (method_key(kv[0][0]), kv[0][1])):
            teacher, student = t.columns[ci]
            f_mean, f_std, _ = c.stats("final_top1")
            b_mean, b_std, _ = c.stats("best_top1")
            e_mean, e_std, _ = c.stats("final_ek")
            own_teacher = teacher if any(r.teacher for r in c.runs) else None
            rows.append({
                "dataset": t.dataset, "column": column_title(t.columns[ci]), "method": m, "label": display_label(m),
                "teacher": own_teacher or "", "student": student,
                "n_runs": len(c.runs), "seeds": ";".join(str(r.seed) for r in c.runs),
                "complete": not c.incomplete,
                "final_top1_mean": f_mean, "final_top1_std": f_std, "best_top1_mean": b_mean,
                "best_top1_std": b_std, "final_top5_mean": c.stats("final_top5")[0],
                "final_ek_mean": e_mean, "final_ek_std": e_std, "teacher_top1": t.teacher_top1.get(ci),
                "test_images": c.subset or "all",  # "1000 of 10000" when measured on data.test_subset
                "experiments": ";".join(r.experiment for r in c.runs),
            })
    return rows
