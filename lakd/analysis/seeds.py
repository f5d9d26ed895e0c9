"""Results over seeds: mean, sample std, 95% t-interval per cell, and paired differences over matched seeds.

Input: run folders (or a sweep's results folder, which holds each finished run's ``summary.json``,
``metrics.jsonl`` and ``config.yaml`` plus the sweep's ``sweep.json`` plan). A *row* is one setting run with
several seeds: with a ``sweep.json`` the rows and their groups are the sweep's; without one a row is a run name
without its ``-s<seed>`` suffix.

Statistics (``final_top1`` unless told otherwise):

- a cell: n seeds, mean, sample standard deviation (n - 1), and the 95% confidence interval of the mean,
  mean ± t(0.975, n - 1) · std / √n (Student's t, through ``scipy.stats``);
- a paired difference A − B over the seeds both rows have (same seed = same initialisation and data order):
  the mean of the per-seed differences d_s = A_s − B_s with the same t-interval on d. It is the comparison that
  cancels the seed's shared luck; an interval that excludes 0 is what "A beats B" needs here;
- families of comparisons: each group's comparison table is one family, and so are its paired differences
  against the reference row. An interval at 95% each lets one of k comparisons exclude 0 by chance far more
  often than 5% of the time, so each family also gets Holm's step-down adjustment (family-wise error 5%) over the
  paired t-tests' two-sided p-values; a difference that holds after it is the stronger statement;
- a seed that appears more than once in one row (a run repeated, or two copies of a results folder) counts once
  (the first run by path) and is flagged: repeats of one seed are not independent samples.
"""
from __future__ import annotations

import csv
import json
import math
import os
import re
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field

from ..errors import LakdError
from .runs import Run, find_runs, load_run, write_text

SEED_SUFFIX = re.compile(r"-s(\d+)(?:-\d+)?$")
LEVEL = 0.95


# ----------------------------------------------------------------------------------------------------------------
def t_quantile(df: int, level: float = LEVEL) -> float:
    """Two-sided Student-t critical value, e.g. 4.303 for df=2 at 95%."""
    from scipy.stats import t

    return float(t.ppf(0.5 + level / 2, df))


@dataclass
class Summary:
    n: int
    mean: float | None
    std: float | None  # sample std (n - 1); None for n < 2
    ci: tuple[float, float] | None  # 95% interval of the mean; None for n < 2

    @property
    def half_width(self) -> float | None:
        return None if self.ci is None else (self.ci[1] - self.ci[0]) / 2


def summarize(values: Sequence[float], level: float = LEVEL) -> Summary:
    v = [float(x) for x in values]
    if not v:
        return Summary(0, None, None, None)
    mean = statistics.fmean(v)
    if len(v) < 2:
        return Summary(1, mean, None, None)
    std = statistics.stdev(v)
    h = t_quantile(len(v) - 1, level) * std / math.sqrt(len(v))
    return Summary(len(v), mean, std, (mean - h, mean + h))


@dataclass
class Paired:
    a: str
    b: str
    seeds: list[int]
    diffs: list[float]
    summary: Summary

    @property
    def verdict(self) -> str:
        s = self.summary
        if s.ci is None:
            return "cannot tell (fewer than 2 matched seeds)"
        if s.ci[0] > 0:
            return f"{self.a} > {self.b}"
        if s.ci[1] < 0:
            return f"{self.a} < {self.b}"
        return "cannot tell (interval holds 0)"

    @property
    def p_value(self) -> float | None:
        """Two-sided p-value of the paired t-test of mean difference 0 (consistent with the interval: p < 0.05
        exactly when the 95% interval excludes 0); None for fewer than 2 matched seeds."""
        s = self.summary
        if s.ci is None:
            return None
        if s.std == 0:  # every seed gave the same difference
            return 1.0 if s.mean == 0 else 0.0
        from scipy.stats import t

        return float(2 * t.sf(abs(s.mean) / (s.std / math.sqrt(s.n)), s.n - 1))


def holm(pvalues: Sequence[float | None], level: float = LEVEL) -> list[bool | None]:
    """Holm's step-down procedure over one family of tests: which p-values stay significant with family-wise
    error ``1 - level``. The smallest p is compared with alpha / m, the next with alpha / (m - 1), and so on,
    stopping at the first that fails. ``None`` entries (too few seeds) are not part of the family."""
    alpha = 1 - level
    order = sorted((i for i, p in enumerate(pvalues) if p is not None), key=lambda i: pvalues[i])
    out: list[bool | None] = [None if p is None else False for p in pvalues]
    for k, i in enumerate(order):
        if pvalues[i] > alpha / (len(order) - k):
            break
        out[i] = True
    return out


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


def paired_difference(a: dict[int, float], b: dict[int, float], name_a: str = "A", name_b: str = "B",
                      level: float = LEVEL) -> Paired:
    """A − B over the seeds present in both (per-seed values as {seed: value})."""
    seeds = sorted(set(a) & set(b))
    diffs = [float(a[s]) - float(b[s]) for s in seeds]
    return Paired(name_a, name_b, seeds, diffs, summarize(diffs, level))


# ----------------------------------------------------------------------------------------------------------------
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


def load_study(paths: Sequence[str], reference: str | None = None) -> tuple[list[Group], list[Run], dict]:
    """Rows and groups from run folders; the first ``sweep.json`` found among ``paths`` gives the layout."""
    plan: dict = {}
    for p in paths:
        sp = os.path.join(p, "sweep.json")
        if os.path.exists(sp):
            with open(sp) as f:
                plan = json.load(f)
            break
    run_paths: list[str] = []
    for p in paths:
        try:
            run_paths += find_runs([p])
        except LakdError:
            if not os.path.exists(os.path.join(p, "sweep.json")):
                raise  # a sweep's results folder with no finished run yet is an empty table, not an error
    runs = [load_run(p) for p in run_paths]
    by_variant: dict[str, Row] = {}
    alias = {r["name"]: r["variant"] for r in plan.get("runs", [])}  # run name -> variant (merged rows too)
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
    if plan.get("groups"):
        for g in plan["groups"]:
            rows = []
            names = {}
            for spec_row in g["rows"]:
                base = by_variant.get(spec_row["variant"]) or Row(spec_row["variant"], spec_row["label"])
                # the same runs under this group's label (a merged row reads the runs of the row it equals)
                rows.append(Row(spec_row["name"], spec_row["label"], base.runs, base.repeats, base.incomplete,
                                same_as=spec_row["variant"] if spec_row["variant"] != spec_row["name"] else None,
                                paper=spec_row.get("paper"), skip=spec_row.get("skip")))
                names[spec_row["name"]] = rows[-1]
            ref = reference or g.get("reference")
            if ref and ref not in names:
                ref = None if not reference else _unknown_row(reference, names)
            groups.append(Group(g["name"], g.get("title") or g["name"], rows, ref,
                                [tuple(c) for c in g.get("compare") or []], g.get("paper_note") or ""))
    else:
        rows = sorted(by_variant.values(), key=lambda r: r.name)
        names = {r.name: r for r in rows}
        if reference and reference not in names:
            _unknown_row(reference, names)
        groups.append(Group("runs", "Runs by setting", rows, reference, []))
    return groups, runs, plan


def _unknown_row(name: str, names) -> None:
    raise LakdError(f"--reference {name!r} is not a row of the report; rows: {', '.join(names)}")


def _row_map(groups: Sequence[Group]) -> dict[str, Row]:
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


# ----------------------------------------------------------------------------------------------------------------
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


def render(groups: Sequence[Group], runs: Sequence[Run], plan: dict, attr: str = "final_top1",
           level: int = 1) -> str:
    """Markdown: a title at heading ``level``, one section per group below it."""
    all_rows = _row_map(groups)
    h1, h2 = "#" * level, "#" * (level + 1)
    complete = [r for r in runs if r.complete]
    expected = [r for r in plan.get("runs", []) if not r.get("same_as") and not r.get("skip")]
    out = [f"{h1} Results over seeds", ""]
    status = f"{len(complete)} finished run(s)"
    if expected:
        names = {r.experiment for r in complete}
        done = sum(r["name"] in names for r in expected)
        status = f"{done} of the {len(expected)} runs the sweep plans have finished"
        skipped = [r for r in plan.get("runs", []) if r.get("skip") and not r.get("same_as")]
        if skipped:
            ran = sum(r["name"] in names for r in skipped)
            status += (f" ({len(skipped)} more, of rows marked skip, are not run"
                       + (f"; {ran} of them had finished before" if ran else "") + ")")
        if done < len(expected):
            status += " (**partial**: the sweep is not finished; cells with fewer seeds are less certain)"
    out += [status + ".", ""]
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
                out.append(f"| {p.a} − {p.b} | {', '.join(map(str, p.seeds)) or 'none'} | {_signed(s.mean)} | "
                           f"{_f(s.std)} | {_ci(s)} | {p.verdict} | {_p(p)} | {_holm_cell(p, h, family)} |")
            out.append("")
    if any(r.repeats for r in all_rows.values()):
        out += ["‡ A seed run more than once counts once (the first run by folder path); the others are listed, "
                "not averaged, since repeats of one seed are not independent.", ""]
    return "\n".join(out)


CSV_FIELDS = ["group", "row", "label", "n", "seeds", "mean", "std", "ci_low", "ci_high", "best_mean", "ek_mean",
              "ek_std", "repeated_seeds", "values", "paper"]


def write_csv(groups: Sequence[Group], path: str, attr: str = "final_top1") -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        for g in groups:
            for row in g.rows:
                s, e = row.stats(attr), row.stats("final_ek")
                w.writerow({"group": g.name, "row": row.name, "label": row.label, "n": s.n,
                            "seeds": ";".join(map(str, row.values(attr))), "mean": s.mean, "std": s.std,
                            "ci_low": s.ci[0] if s.ci else None, "ci_high": s.ci[1] if s.ci else None,
                            "best_mean": row.stats("best_top1").mean, "ek_mean": e.mean, "ek_std": e.std,
                            "repeated_seeds": ";".join(map(str, row.repeats)),
                            "values": ";".join(repr(v) for v in row.values(attr).values()), "paper": row.paper})
    return path


def curve_panels(groups: Sequence[Group]) -> list[tuple[str, list[tuple[str, list[dict[int, float]]]]]]:
    """What ``visualize.plot_seed_curves`` draws: per group, per row, one {epoch: top-1} per counted seed."""
    return [(g.title, [(row.label, [dict(r.curve) for r in row.runs.values() if r.curve]) for row in g.rows])
            for g in groups]


BEGIN, END = "<!-- lakd report: begin -->", "<!-- lakd report: end -->"


def update_between_markers(path: str, text: str) -> str:
    """Replace what lies between the BEGIN and END markers of a Markdown file (e.g. docs/results.md)."""
    if not os.path.exists(path):
        raise LakdError(f"--update {path!r} does not exist; create it with the lines {BEGIN} and {END}")
    with open(path) as f:
        doc = f.read()
    if doc.count(BEGIN) != 1 or doc.count(END) != 1 or doc.index(BEGIN) > doc.index(END):
        raise LakdError(f"--update {path!r} must hold the line {BEGIN} once, followed by {END} once")
    head, rest = doc.split(BEGIN)
    _, tail = rest.split(END)
    with open(path, "w") as f:
        f.write(f"{head}{BEGIN}\n{text.strip()}\n{END}{tail}")
    return path


def make_seed_report(paths: Sequence[str], out: str | None = None, csv_path: str | None = None,
                     plot_path: str | None = None, update: str | None = None,
                     reference: str | None = None) -> dict:
    groups, runs, plan = load_study(paths, reference)
    text = render(groups, runs, plan)
    res: dict = {"markdown": text, "groups": groups, "runs": runs}
    if out:
        res["out"] = write_text(out, text)
    if csv_path:
        res["csv"] = write_csv(groups, csv_path)
    if plot_path:
        from .visualize import plot_seed_curves  # matplotlib: imported on use

        res["plot"] = plot_seed_curves(curve_panels(groups), plot_path)
    if update:  # the same tables, as subsections of the document's seeded-study section
        res["update"] = update_between_markers(update, render(groups, runs, plan, level=3))
    return res
