"""``lakd report``: a Table-1-style Markdown table (and CSV, accuracy curves) from run folders."""
from __future__ import annotations

import argparse

from ..errors import LakdError

HELP = "results table (like the paper's Table 1) from run folders, with CSV and accuracy curves"

EPILOG = """\
examples:
  lakd report runs/                                   # every run folder under runs/
  lakd report runs/kd_* runs/lakd_* --out table.md --csv table.csv --plot curves.png

Runs are grouped by dataset, method and teacher -> student pair. A cell is the final top-1 mean over seeds,
"± sample std" with 2+ seeds, and the mean best-epoch top-1 in parentheses; the best cell of a column is bold.
Runs without summary.json (still running or killed) are listed as incomplete from their metrics.jsonl.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EPILOG
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR",
                        help="run folders, or folders holding run folders (e.g. runs/)")
    parser.add_argument("--out", default="report.md", metavar="FILE.md", help="Markdown report (default report.md)")
    parser.add_argument("--csv", default=None, metavar="FILE", help="also write the table data as CSV")
    parser.add_argument("--plot", default=None, metavar="FILE.png",
                        help="also draw test top-1 vs epoch, one line per run")
    parser.add_argument("--print", dest="print_report", action="store_true", help="print the report too")


def run(args) -> int:
    from ..analysis.report import make_report

    if args.plot and not args.plot.lower().endswith(".png"):
        raise LakdError(f"--plot {args.plot!r} must name a .png file")
    res = make_report(args.runs, out=args.out, csv_path=args.csv, plot_path=args.plot)
    runs = res["runs"]
    n_inc = sum(not r.complete for r in runs)
    if args.print_report:
        print(res["markdown"])
    wrote = [p for p in (res.get("out"), res.get("csv"), res.get("plot")) if p]
    print(f"{len(runs)} run(s) ({n_inc} incomplete) -> {', '.join(wrote)}")
    return 0
