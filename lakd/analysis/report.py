"""The results report from run folders: reads them (``runs.py``), builds the tables (``tables.py``) and renders
Markdown and CSV here; the accuracy curves are drawn by ``visualize.plot_curves``.

A run folder (``runs/<experiment>/``, written by the trainer) holds ``config.yaml``, ``metrics.jsonl`` (one
JSON line per evaluated epoch) and, once training finished, ``summary.json``. Runs are grouped by dataset, method
and teacher -> student pair; a cell is the mean final top-1 over seeds, "± std" (sample standard deviation,
n - 1) when there are several seeds, and the mean best-epoch top-1. Runs without ``summary.json`` are
incomplete: they are listed from their ``metrics.jsonl`` and only enter a table cell when the cell has no
complete run (the cell is then marked with a dagger).
"""
from __future__ import annotations

import csv
import os
from collections.abc import Sequence

from .runs import Run, find_runs, is_run_dir, load_run, write_text
from .tables import (
    CSV_FIELDS,
    DAGGER,
    REPEAT,
    Cell,
    Table,
    build_tables,
    column_title,
    csv_rows,
    format_cell,
    format_value,
    label_variants,
    method_key,
)

__all__ = ["Run", "Cell", "Table", "find_runs", "is_run_dir", "load_run", "label_variants", "build_tables",
           "format_cell", "csv_rows", "render_markdown", "write_csv", "make_report"]


def _markdown_table(t: Table, attr: str, best_attr: str | None, with_teacher: bool) -> list[str]:
    header = ["Method"] + [column_title(c) for c in t.columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    if with_teacher:
        accs = [format_value(t.teacher_top1.get(i)) for i in range(len(t.columns))]
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
    repeats = [r for t in tables for c in t.cells.values() for r in c.repeats]
    if repeats:
        out.append(f"{REPEAT} the cell has repeated runs of one seed: only the newest run of each seed enters the "
                   f"mean and std (repeats are not independent samples); left out: "
                   + "; ".join(f"{r.experiment} ({r.method}, {r.pair}, seed {r.seed})" for r in repeats) + ".")
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
    order = sorted(runs, key=lambda r: (r.dataset, method_key(r.method), r.pair, str(r.seed), r.experiment))
    for r in order:
        planned = r.epochs_planned if r.epochs_planned is not None else "?"
        status = ("complete" if r.complete
                  else f"INCOMPLETE (no summary.json; epoch {r.epochs_done}/{planned})")
        if r.problem:
            status += f"; {r.problem}"
        best = "n/a" if r.best_top1 is None else f"{r.best_top1:.2f} ({r.best_epoch})"
        out.append(f"| {r.experiment} | {r.dataset} | {r.method} | {r.pair} | {r.seed} "
                   f"| {r.epochs_done}/{planned} | {format_value(r.final_top1)} | {best} | {format_value(r.final_ek)} | {status} |")
    out.append("")
    return "\n".join(out)


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


def make_report(paths: Sequence[str], out: str | None = "report.md", csv_path: str | None = None,
                plot_path: str | None = None) -> dict:
    """Read run folders, write the Markdown report (and the CSV / plot when asked); returns what it wrote."""
    runs = [load_run(p) for p in find_runs(paths)]
    label_variants(runs)
    tables = build_tables(runs)
    text = render_markdown(runs, tables)
    written = {"markdown": text, "runs": runs, "tables": tables}
    if out:
        written["out"] = write_text(out, text)
    if csv_path:
        written["csv"] = write_csv(tables, csv_path)
    if plot_path:
        from .visualize import plot_curves  # matplotlib: imported on use

        written["plot"] = plot_curves(runs, plot_path, tables)
    return written
