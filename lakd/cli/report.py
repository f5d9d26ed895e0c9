"""``lakd report``: a Table-1-style Markdown table (and CSV, accuracy curves) from run folders."""
from __future__ import annotations

import argparse
import os
import sys

from ..errors import LakdError

HELP = "results table (like the paper's Table 1) from run folders, with CSV and accuracy curves"

EPILOG = """\
examples:
  lakd report runs/                 # writes runs/report.md, runs/report.csv and runs/curves.png
  lakd report runs/kd_* runs/lakd_* --out table.md --csv table.csv --plot curves.png
  lakd report runs/ --out runs/table.md            # that file only

Where: with none of --out, --csv, --plot the report goes beside the runs: report.md, report.csv (the table
data) and curves.png (test top-1 vs epoch) in the folder given, or in the folders' common parent when several
are given. Naming any of the three writes exactly the files named. The command prints every path it wrote.

Runs are grouped by dataset, method and teacher -> student pair. A cell is the final top-1 mean over seeds,
"± sample std" with 2+ seeds, and the mean best-epoch top-1 in parentheses; the best cell of a column is bold.
Runs without summary.json (still running or killed) are listed as incomplete from their metrics.jsonl. A run
whose summary.json cannot be read is named, the report is written from the rest, and the command exits 2.

Over seeds (a `lakd sweep` results folder, which holds sweep.json, or --seeds): one table per sweep group with,
per row, n seeds, mean ± sample std, the 95% t-interval of the mean, and the paired difference to a reference
row over matched seeds; then the group's declared comparisons A − B. A seed run twice counts once (flagged).
  lakd report results/cifar10_seeds --out results/cifar10_seeds/report.md --csv results/cifar10_seeds/report.csv \
      --plot results/cifar10_seeds/curves.png --update docs/results.md
  lakd report results/cifar10_seeds --groups logit,feature_stats --out methods.md   # some groups only
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EPILOG
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR",
                        help="run folders, or folders holding run folders (e.g. runs/)")
    parser.add_argument("--out", default=None, metavar="FILE.md",
                        help="Markdown report (default: report.md beside the runs, with report.csv and curves.png)")
    parser.add_argument("--csv", default=None, metavar="FILE", help="the table data as CSV")
    parser.add_argument("--plot", default=None, metavar="FILE.png",
                        help="test top-1 vs epoch, one line per run (over seeds: the mean and the seeds' range)")
    parser.add_argument("--print", dest="print_report", action="store_true", help="print the report too")
    parser.add_argument("--seeds", action="store_true",
                        help="statistics over seeds (automatic for a folder holding a sweep's sweep.json)")
    parser.add_argument("--reference", metavar="ROW",
                        help="over seeds: the row every other row is compared with (default: the sweep group's)")
    parser.add_argument("--update", metavar="DOC.md",
                        help="over seeds: also replace the tables between the '<!-- lakd report: begin -->' and "
                             "'<!-- lakd report: end -->' lines of this Markdown file")
    parser.add_argument("--groups", metavar="NAME[,NAME]",
                        help="over seeds: only these sweep groups, in this order (e.g. one page per part of a "
                             "study; the status line then counts their runs)")


def run(args) -> int:
    from ..analysis.report import make_report
    from ..engine import rundir

    if args.plot and not args.plot.lower().endswith(".png"):
        raise LakdError(f"--plot {args.plot!r} must name a .png file")
    optional_plot = _default_outputs(args)
    if args.seeds or args.reference or args.update or args.groups is not None or any(
            os.path.exists(os.path.join(p, rundir.SWEEP_PLAN)) for p in args.runs):
        return _run_seeds(args, optional_plot)
    res = make_report(args.runs, out=args.out, csv_path=args.csv, plot_path=args.plot, plot_if_any=optional_plot)
    runs = res["runs"]
    n_inc = sum(not r.complete for r in runs)
    if args.print_report:
        print(res["markdown"])
    _name_problems(runs)
    _say_written(f"{len(runs)} run(s) ({n_inc} incomplete)", res, ("out", "csv", "plot"))
    _fail_on_damage(runs)
    return 0


#: what ``lakd report`` writes beside the runs when no output is named
DEFAULT_FILES = {"out": "report.md", "csv": "report.csv", "plot": "curves.png"}


def output_folder(paths: list[str]) -> str:
    """Beside the runs: the one folder given, else the common parent of the folders given."""
    if len(paths) == 1:
        return paths[0]
    full = [os.path.abspath(p) for p in paths]
    try:
        common = os.path.commonpath(full)
    except ValueError:  # different drives: nothing in common; the first folder's parent then
        common = os.path.dirname(full[0])
    rel = os.path.relpath(common)
    return rel if not rel.startswith(os.pardir) else common


def _default_outputs(args) -> bool:
    """With none of --out/--csv/--plot: report.md, report.csv and curves.png beside the runs (``args`` updated, so
    that a failed write names the path). Returns True when the curves are a default (left out, with a note, when
    no run has test accuracies to draw) rather than asked for."""
    if args.out or args.csv or args.plot:
        return False
    for p in args.runs:  # a missing folder is the loader's error to name; here only where to write
        if not os.path.isdir(p):
            return False
    folder = output_folder(args.runs)
    for key, name in DEFAULT_FILES.items():
        setattr(args, key, os.path.join(folder, name))
    return True


def _say_written(what: str, res: dict, keys) -> None:
    """One line for the runs, then every path written, one a line (and why a default plot was left out)."""
    wrote = [res[k] for k in keys if res.get(k)]
    print(f"{what}; wrote:" if wrote else f"{what}; wrote nothing")
    for path in wrote:
        print(f"  {path}")
    if res.get("no_plot"):
        print(f"  (no curves: {res['no_plot']})")


def _name_problems(runs) -> None:
    """A damaged file is named; the report is still written from everything else (nothing is lost)."""
    for r in runs:
        if r.problem:
            print(f"warning: {r.path}: {r.problem}", file=sys.stderr)


def _fail_on_damage(runs) -> None:
    """A finished run whose summary.json cannot be read is a result missing from the tables: after writing
    what could be written, say so as an error (exit 2) rather than let the tables pass for complete. A torn
    last line of a running run's metrics.jsonl stays a warning: it is expected while a sweep runs."""
    damaged = [r for r in runs if r.damaged]
    if damaged:
        raise LakdError(f"{len(damaged)} run(s) have an unreadable summary.json (named above) and are missing "
                        "from the report, which was written from the rest; restore each from the run's "
                        "results copy or rerun it, then rerun lakd report")


BEGIN, END = "<!-- lakd report: begin -->", "<!-- lakd report: end -->"


def _check_markers(path: str) -> str:
    if not os.path.exists(path):
        raise LakdError(f"--update {path!r} does not exist; create it with the lines {BEGIN} and {END}")
    with open(path) as f:
        doc = f.read()
    if doc.count(BEGIN) != 1 or doc.count(END) != 1 or doc.index(BEGIN) > doc.index(END):
        raise LakdError(f"--update {path!r} must hold the line {BEGIN} once, followed by {END} once")
    return doc


def update_between_markers(path: str, text: str) -> str:
    """Replace what lies between the BEGIN and END lines of the Markdown file the user names (``--update``);
    the rest of the file is kept as it is. The CLI's job, not the library's: the library renders, the command
    writes the files it is told to."""
    head, rest = _check_markers(path).split(BEGIN)
    _, tail = rest.split(END)
    with open(path, "w") as f:
        f.write(f"{head}{BEGIN}\n{text.strip()}\n{END}{tail}")
    return path


def _run_seeds(args, optional_plot: bool = False) -> int:
    from ..analysis.report import make_seed_report

    if args.update:
        _check_markers(args.update)  # before any work: a page without its markers is the user's to fix
    names = [n.strip() for n in args.groups.split(",") if n.strip()] if args.groups else None
    if args.groups is not None and not names:
        raise LakdError("--groups is empty; name one or more sweep groups, e.g. --groups main,table3")
    res = make_seed_report(args.runs, out=args.out, csv_path=args.csv, plot_path=args.plot,
                           reference=args.reference, groups=names, plot_if_any=optional_plot)
    if args.update:  # the same tables, as subsections of the page's section between the markers
        res["update"] = update_between_markers(args.update, res["section"])
    if args.print_report:
        print(res["markdown"])
    n_done = sum(r.complete for r in res["runs"])
    _name_problems(res["runs"])
    _say_written(f"{n_done} finished run(s) in {len(res['groups'])} group(s)", res, ("out", "csv", "plot", "update"))
    _fail_on_damage(res["runs"])
    return 0
