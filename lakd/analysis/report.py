"""The one renderer of ``lakd report``: Markdown and CSV of both reports, from the one loader (``runs.py``).

- the plain report (``make_report``): tables shaped like the paper's Table 1 (``tables.py``), accuracy curves
  drawn by ``visualize.plot_curves``;
- the report over seeds (``make_seed_report``): one table per sweep group with the statistics of ``stats.py``
  (mean, std, t-intervals, paired differences, Holm), curves drawn by ``visualize.plot_seed_curves``.

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
import statistics
from collections.abc import Sequence

from ..sweep.spec import Plan
from .runs import (
    Group,
    Row,
    Run,
    comparisons,
    curve_panels,
    find_runs,
    is_run_dir,
    load_run,
    load_study,
    row_map,
    write_text,
)
from .stats import Paired, Summary, holm, paired_difference
from .tables import (
    CSV_FIELDS,
    DAGGER,
    REPEAT,
    Cell,
    Table,
    build_tables,
    column_title,
    csv_rows,
    display_label,
    format_cell,
    format_value,
    label_variants,
    method_key,
    subset_phrase,
)

#: marks a number measured on part of the test set (data.test_subset) in a table whose runs differ in that
SUBSET = "§"

__all__ = ["Run", "Cell", "Table", "find_runs", "is_run_dir", "load_run", "label_variants", "build_tables",
           "format_cell", "csv_rows", "render_markdown", "render_seeds", "write_csv", "make_report",
           "make_seed_report"]


def table_subset(t: Table) -> str | None:
    """The test images every number of table ``t`` is measured on when all its runs used the same part of the test
    set (data.test_subset), e.g. "1000 of 10000"; "" when all used the whole test set; None when they differ."""
    counts = {r.subset for c in t.cells.values() for r in c.runs}
    counts |= {v or "" for i, v in t.teacher_subset.items() if t.teacher_top1.get(i) is not None}
    if len(counts) > 1 or any(" / " in v for v in counts):
        return None
    return next(iter(counts), "")


def _markdown_table(t: Table, attr: str, best_attr: str | None, with_teacher: bool) -> list[str]:
    header = ["Method"] + [column_title(c) for c in t.columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    common = table_subset(t)
    if with_teacher:
        accs = [format_value(t.teacher_top1.get(i)) + (f" {SUBSET}" if common is None and t.teacher_subset.get(i)
                                                         and t.teacher_top1.get(i) is not None else "")
                for i in range(len(t.columns))]
        label = f"Teacher (on {common} test images)" if common else "Teacher"
        lines.append(f"| {label} | " + " | ".join(accs) + " |")
    best: dict[int, float] = {}
    for ci in range(len(t.columns)):
        means = [c.stats(attr)[0] for (m, i), c in t.cells.items() if i == ci and not c.incomplete]
        means = [v for v in means if v is not None]
        if len(means) > 1:  # bold only where there is something to compare
            best[ci] = max(means)
    for m in t.methods:
        row = [display_label(m)]
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
            if common is None and c.subset:
                txt += f" {SUBSET}"
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
        common = table_subset(t)
        on = f" on {common} test images (data.test_subset)" if common else ""
        out.append(f"## {t.dataset}: top-1 accuracy (%){on}")
        out.append("")
        out.append("Final-epoch top-1, mean ± sample std over seeds (std shown for 2+ seeds), and the mean "
                   "best-epoch top-1 in parentheses. Best cell per column in bold."
                   + (f" {SUBSET} measured on part of the test set (data.test_subset; the Runs table below says "
                      f"how many images)." if common is None else ""))
        out.append("")
        out += _markdown_table(t, "final_top1", "best_top1", with_teacher=any(
            v is not None for v in t.teacher_top1.values()))
        out.append("")
        if any(c.stats("final_ek")[0] is not None for c in t.cells.values()):
            out.append(f"### {t.dataset}: Extracurricular Knowledge, EK (%){on}")
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
                   + "; ".join(f"{r.experiment} ({display_label(r.method)}, {r.pair}, seed {r.seed})"
                               for r in repeats) + ".")
        out.append("")
    used = {id(r) for t in tables for c in t.cells.values() for r in c.runs}
    left_out = [r for r in incomplete if id(r) not in used]
    if left_out:
        out.append("Incomplete runs left out of the tables (cells use the complete runs): "
                   + "; ".join(f"{r.experiment} ({display_label(r.method)}, {r.pair}, seed {r.seed}, "
                               f"epoch {r.epochs_done}/{r.epochs_planned if r.epochs_planned is not None else '?'})"
                               for r in left_out)
                   + ".")
        out.append("")
    out.append("## Runs")
    out.append("")
    out.append("| Experiment | Dataset | Method | Teacher → Student | Seed | Epochs | Test images | Final top-1 "
               "| Best top-1 (epoch) | Final EK | Status |")
    out.append("|---|---|---|---|---|---|---|---|---|---|---|")
    order = sorted(runs, key=lambda r: (r.dataset, method_key(r.method), r.pair, str(r.seed), r.experiment))
    for r in order:
        planned = r.epochs_planned if r.epochs_planned is not None else "?"
        status = ("complete" if r.complete
                  else f"INCOMPLETE (no summary.json; epoch {r.epochs_done}/{planned})")
        if r.problem:
            status += f"; {r.problem}"
        best = "n/a" if r.best_top1 is None else f"{r.best_top1:.2f} ({r.best_epoch})"
        images = r.subset or (f"all {r.test_images_total}" if r.test_images_total else "all")
        out.append(f"| {r.experiment} | {r.dataset} | {display_label(r.method)} | {r.pair} | {r.seed} "
                   f"| {r.epochs_done}/{planned} | {images} | {format_value(r.final_top1)} | {best} "
                   f"| {format_value(r.final_ek)} | {status} |")
    out.append("")
    return "\n".join(out)


def write_csv(path: str, fields: Sequence[str], rows: Sequence[dict]) -> str:
    """The one CSV writer of both reports: the rows' data at full precision (Python's shortest round-trip float
    repr), None as an empty cell."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(fields))
        w.writeheader()
        for row in rows:
            w.writerow({k: ("" if v is None else repr(v) if isinstance(v, float) else v)
                        for k, v in row.items()})
    return path


def make_report(paths: Sequence[str], out: str | None = "report.md", csv_path: str | None = None,
                plot_path: str | None = None, plot_if_any: bool = False) -> dict:
    """Read run folders, write the Markdown report (and the CSV / plot when asked); returns what it wrote.
    ``plot_if_any``: no runs with test accuracies leave the plot out (``"no_plot"`` says why) instead of raising."""
    runs = [load_run(p) for p in find_runs(paths)]
    label_variants(runs)
    tables = build_tables(runs)
    text = render_markdown(runs, tables)
    written = {"markdown": text, "runs": runs, "tables": tables}
    if out:
        written["out"] = write_text(out, text)
    if csv_path:
        written["csv"] = write_csv(csv_path, CSV_FIELDS, csv_rows(tables))
    if plot_path and plot_if_any and not any(r.curve for r in runs):
        written["no_plot"] = "no run has test accuracies in metrics.jsonl yet"
    elif plot_path:
        from .visualize import plot_curves  # matplotlib: imported on use

        written["plot"] = plot_curves(runs, plot_path, tables)
    return written


# ----------------------------------------------------------------------------------------------------------------
# Over seeds
def _holm_cell(p: Paired, held: bool | None, family: int) -> str:
    """``holds`` / ``does not hold`` for a difference whose interval excludes 0; nothing to adjust otherwise."""
    if held is None:
        return "n/a"
    if p.verdict.startswith("cannot tell"):
        return "—"
    return f"{'holds' if held else 'does not hold'} ({family} in the family)"


def _p(p: Paired) -> str:
    v = p.p_value
    return "n/a" if v is None else "< 0.001" if v < 0.001 else f"{v:.3f}"


def _f(v: float | None, nd: int = 2) -> str:
    return "n/a" if v is None else f"{v:.{nd}f}"


def _mean_std(s: Summary) -> str:
    if s.mean is None:
        return "—"
    return _f(s.mean) + (f" ± {s.std:.2f}" if s.std is not None else "")


def _ci(s: Summary) -> str:
    return "n/a" if s.ci is None else f"[{s.ci[0]:.2f}, {s.ci[1]:.2f}]"


def _signed(v: float | None) -> str:
    return "n/a" if v is None else f"{v:+.2f}"


def _flags(row: Row) -> str:
    out = []
    for seed, extra in sorted(row.repeats.items()):
        vals = {r.final_top1 for r in extra} | {row.runs[seed].final_top1}
        out.append(f"seed {seed} run {len(extra) + 1}× ({'identical' if len(vals) == 1 else 'different results'}; "
                   f"counted once)")
    damaged = sum(r.damaged for r in row.incomplete)
    if len(row.incomplete) > damaged:
        out.append(f"{len(row.incomplete) - damaged} unfinished run(s) left out")
    if damaged:
        out.append(f"{damaged} run(s) with an unreadable summary.json left out")
    return "; ".join(out)


def render_seeds(groups: Sequence[Group], runs: Sequence[Run], plan: Plan | None, attr: str = "final_top1",
                 level: int = 1, subset: bool = False) -> str:
    """The report over seeds in Markdown: a title at heading ``level``, one section per group below it.
    ``subset``: ``plan`` holds only some of the sweep's groups (the status line says so)."""
    all_rows = row_map(groups)
    h1, h2 = "#" * level, "#" * (level + 1)
    complete = [r for r in runs if r.complete]
    planned = plan.runs if plan else []
    expected = [r for r in planned if not r.same_as and not r.skip and not r.outside]
    out = [f"{h1} Results over seeds", ""]
    status = f"{len(complete)} finished run(s)"
    if expected:
        names = {r.experiment for r in complete}
        done = sum(r.name in names for r in expected)
        status = (f"{done} of the {len(expected)} runs the sweep plans "
                  f"{'for these groups ' if subset else ''}have finished")
        skipped = [r for r in planned if r.skip and not r.same_as]
        if skipped:
            ran = sum(r.name in names for r in skipped)
            status += (f" ({len(skipped)} more, of rows marked skip, are not run"
                       + (f"; {ran} of them had finished before" if ran else "") + ")")
        outside = [r for r in planned if r.outside and not r.same_as]
        if outside:
            status += (f" ({len(outside)} more finished earlier, outside the current spec: kept from an earlier "
                       f"plan of this results folder)")
        if done < len(expected):
            status += " (**partial**: the sweep is not finished; cells with fewer seeds are less certain)"
    out += [status + ".", ""]
    subset = subset_phrase(complete)
    if subset:  # numbers over part of the test set say so (and over how many images)
        out += [f"Measured on {subset} test images (data.test_subset): top-1 and EK below are over those images, "
                f"not the whole test set.", ""]
    out += ["Top-1 is the final-epoch test accuracy (%). Cells: mean ± sample std over seeds, n seeds, and the "
            "95% confidence interval of the mean (Student's t, n − 1 degrees of freedom; none for n = 1). "
            "Paired differences A − B are taken seed by seed over the seeds both rows have, with the same "
            "t-interval; \"cannot tell\" means the interval contains 0. Each comparison table, and each group's "
            "differences against its reference row, is one family: `Holm` says whether a difference still "
            "excludes 0 after Holm's adjustment for the family's size (family-wise error 5%), the safer "
            "reading when a table makes many comparisons.", ""]
    for g in groups:
        out += [f"{h2} {g.title}", ""]
        if g.paper_note:
            out += [f"Paper column: {g.paper_note}", ""]
        ref = all_rows.get(g.reference) if g.reference else None
        header = ["Row", "n", "top-1 mean ± std", "95% CI", "best-epoch top-1", "EK mean ± std", "per seed"]
        if ref:
            header.insert(4, f"Δ vs {ref.label} (paired, 95% CI)")
        with_paper = any(r.paper is not None for r in g.rows)
        if with_paper:
            header.append("paper")
        header.append("min/run")
        out += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        # every row against the reference: the table's Δ column, and one family for Holm below the table
        vs_ref = {row.name: paired_difference(row.values(attr), ref.values(attr), row.label, ref.label)
                  for row in g.rows if ref and row is not ref and row.name != ref.name}
        for row in g.rows:
            s = row.stats(attr)
            cells = [row.label, str(s.n), _mean_std(s), _ci(s), _mean_std(row.stats("best_top1")),
                     _mean_std(row.stats("final_ek")),
                     ", ".join(f"s{k}: {v:.2f}" for k, v in row.values(attr).items()) or "—"]
            if ref:
                p = vs_ref.get(row.name)
                if p is None:
                    cells.insert(4, "reference")
                else:
                    cells.insert(4, f"{_signed(p.summary.mean)} {_ci(p.summary)} (n={p.summary.n})"
                                 if p.summary.n else "n/a")
            if with_paper:
                cells.append(f"{row.paper:.2f}" if row.paper is not None else "—")
            wall = [r.wall_time_s for r in row.runs.values() if r.wall_time_s]
            cells.append(f"{statistics.fmean(wall) / 60:.1f}" if wall else "n/a")
            flags = _flags(row)
            if row.same_as:
                cells[0] += f" (= runs of {row.same_as})"
            if row.skip:
                cells[0] += f" (not run further: {row.skip})"
            if row.outside:
                cells[0] += " (outside the current spec)"
            if flags:
                cells[0] += f" ‡ ({flags})"
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
        if vs_ref:
            held = holm([p.p_value for p in vs_ref.values()])
            family = sum(h is not None for h in held)
            excl = [(p, h) for p, h in zip(vs_ref.values(), held) if not p.verdict.startswith("cannot")]
            if excl:
                out += [f"Against {ref.label}, Holm over the {family} rows with 2 or more matched seeds: "
                        + "; ".join(f"{p.a} {_signed(p.summary.mean)} "
                                    f"(p {_p(p) if _p(p).startswith('<') else '= ' + _p(p)}) "
                                    f"{'holds' if h else 'does not hold'}" for p, h in excl) + ".", ""]
        pairs = comparisons(g, all_rows, attr)
        if pairs:
            held = holm([p.p_value for p in pairs])
            family = sum(h is not None for h in held)
            out += ["| A − B | matched seeds | mean diff | std | 95% CI | what the interval supports | p | Holm |",
                    "|---|---|---|---|---|---|---|---|"]
            for p, h in zip(pairs, held):
                s = p.summary
                out.append(f"| {p.a} − {p.b} | {', '.join(f's{x}' for x in p.seeds) or 'none'} | {_signed(s.mean)} | "
                           f"{_f(s.std)} | {_ci(s)} | {p.verdict} | {_p(p)} | {_holm_cell(p, h, family)} |")
            out.append("")
    if any(r.repeats for r in all_rows.values()):
        out += ["‡ A seed run more than once counts once (the first run by folder path); the others are listed, "
                "not averaged, since repeats of one seed are not independent.", ""]
    return "\n".join(out)


SEED_CSV_FIELDS = ["group", "row", "label", "n", "seeds", "mean", "std", "ci_low", "ci_high", "best_mean", "ek_mean",
              "ek_std", "repeated_seeds", "values", "paper"]


def seed_csv_rows(groups: Sequence[Group], attr: str = "final_top1") -> list[dict]:
    rows = []
    for g in groups:
        for row in g.rows:
            s, e = row.stats(attr), row.stats("final_ek")
            rows.append({"group": g.name, "row": row.name, "label": row.label, "n": s.n,
                         "seeds": ";".join(map(str, row.values(attr))), "mean": s.mean, "std": s.std,
                         "ci_low": s.ci[0] if s.ci else None, "ci_high": s.ci[1] if s.ci else None,
                         "best_mean": row.stats("best_top1").mean, "ek_mean": e.mean, "ek_std": e.std,
                         "repeated_seeds": ";".join(map(str, row.repeats)),
                         "values": ";".join(repr(v) for v in row.values(attr).values()), "paper": row.paper})
    return rows


def make_seed_report(paths: Sequence[str], out: str | None = None, csv_path: str | None = None,
                     plot_path: str | None = None, reference: str | None = None,
                     groups: Sequence[str] | None = None, plot_if_any: bool = False) -> dict:
    """The report over seeds: Markdown (and CSV, curves when asked); ``section`` holds the same tables one
    heading level down, for a page that embeds them (``lakd report --update PAGE.md``). ``groups``: only these
    sweep groups (a page per part of a large study). ``plot_if_any``: as for ``make_report``."""
    subset = bool(groups)
    groups, runs, plan = load_study(paths, reference, groups)
    text = render_seeds(groups, runs, plan, subset=subset)
    res: dict = {"markdown": text, "groups": groups, "runs": runs,
                 "section": render_seeds(groups, runs, plan, level=3, subset=subset)}
    if out:
        res["out"] = write_text(out, text)
    if csv_path:
        res["csv"] = write_csv(csv_path, SEED_CSV_FIELDS, seed_csv_rows(groups))
    panels = curve_panels(groups) if plot_path else []
    if plot_path and plot_if_any and not any(curves for _, rows in panels for _, curves in rows):
        res["no_plot"] = "no finished run has test accuracies in metrics.jsonl yet"
    elif plot_path:
        from .visualize import plot_seed_curves  # matplotlib: imported on use

        res["plot"] = plot_seed_curves(panels, plot_path)
    return res
