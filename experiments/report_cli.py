"""``halp report``: paper-style tables and figures from a directory of run records.

A plugin of the ``halp`` command line (entry point group ``halp.commands`` in pyproject.toml):
the report reads the suite's run records, so it belongs to the suite, and the library's CLI
finds it without importing the suite."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

HELP = """Collect every result.json under RUNS_DIR (searched recursively; written by experiments/job.py)
and aggregate them per (model, dataset, method, latency target) over seeds: mean and 95 %
confidence half-width (Student t; "–" for a single seed) of top-1, measured latency, speedup,
MACs, params, measured/target and predicted/measured latency.

Writes to --out (default RUNS_DIR/report), each file atomically:
  table.md    paper layout, one section per model/dataset   (--format md|all)
  paper.md    published numbers (with their grade) beside ours   (--format md|all)
  table.csv   one row per group, <metric>_mean / <metric>_ci     (--format csv|all)
  runs.csv    one row per run                                     (--format csv|all)
  pareto.png, predicted_vs_measured.png, widths.png               (unless --no-figures)

The Markdown table goes to stdout; warnings (skipped records, mixed groups) and the list of files
written go to stderr, so `halp report runs > results.md` keeps only the table. A bad record is
skipped with a warning; a missing RUNS_DIR or one without any record is an error (exit status 2).

example:
  halp report runs --out results/report
  halp report runs/compare50 --format csv --no-figures"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="tables and figures (Pareto, predicted vs measured, widths) from runs",
                       description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs_dir", type=Path, metavar="RUNS_DIR", help="directory searched for **/result.json")
    p.add_argument("--out", type=Path, default=None, help="output directory (default RUNS_DIR/report)")
    p.add_argument("--reference", type=Path, default=None,
                   help="published numbers CSV (default results/reference/paper_numbers.csv of this repo)")
    p.add_argument("--format", choices=("md", "csv", "all"), default="all",
                   help="which tables to write (default all); figures are controlled by --no-figures")
    p.add_argument("--no-figures", action="store_true", help="do not draw the PNG figures")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:  # pandas is the optional 'report' extra; import late so other commands never need it
        from .report import build_report
    except ImportError as e:
        raise ValueError(f"halp report needs pandas and matplotlib ({e}); pip install 'halp[report]'") from None
    if args.reference is not None and not args.reference.is_file():
        raise FileNotFoundError(f"reference file {args.reference} does not exist")
    formats = ("md", "csv") if args.format == "all" else (args.format,)
    summary = build_report(args.runs_dir, args.out, args.reference, formats=formats,
                           figures=not args.no_figures,
                           warn=lambda msg: print(f"warning: {msg}", file=sys.stderr))
    print(summary.table_md)
    print(f"{summary.records} record(s) used, {len(summary.skipped)} skipped; wrote:", file=sys.stderr)
    for path in summary.written:
        print(f"  {path}", file=sys.stderr)
    return 0
