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

With --paper, the reproduction pages instead (experiments/paper.py: one page per table or figure of
the paper, from the runs of the experiment=repro_cpu/* sweeps under the RUNS_DIRs, using the
re-timed latency ratios `halp remeasure` wrote to RUNS_DIR/remeasured.json):
  <page>.md   mean ± 95 % CI over seeds per arm, the paper's claim(s) with a verdict each
              (holds / does not hold / inconclusive at this n, from the CI of the paired
              difference), the published rows where the paper has some
  <page>.png  top-1 against re-timed latency, one line per arm, CI bars
  README.md   index, verdicts, the commands, the records' commits and wall time
Same runs in, same bytes out (no timestamps, paths relative to the repository). --wandb DIR also
logs every page's table and figure to one W&B run kept in DIR (offline unless --wandb-mode online).

example:
  halp report runs --out results/report
  halp report runs/compare50 --format csv --no-figures
  halp report --paper runs/repro_cpu --out results/paper"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="tables and figures (Pareto, predicted vs measured, widths) from runs",
                       description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs_dirs", type=Path, nargs="+", metavar="RUNS_DIR",
                   help="directory searched for **/result.json (several only with --paper)")
    p.add_argument("--out", type=Path, default=None, help="output directory (default RUNS_DIR/report, "
                   "with --paper RUNS_DIR/paper)")
    p.add_argument("--paper", action="store_true", help="write the reproduction pages (see above)")
    p.add_argument("--wandb", type=Path, default=None, metavar="DIR",
                   help="with --paper: also log the pages' tables and figures to one W&B run in DIR")
    p.add_argument("--wandb-mode", choices=("offline", "online"), default="offline",
                   help="W&B mode for --wandb (default offline; `wandb sync` uploads later)")
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
    if args.paper:
        return _paper(args)
    if args.wandb is not None:
        raise ValueError("--wandb goes with --paper")
    if len(args.runs_dirs) != 1:
        raise ValueError("give one RUNS_DIR (several only with --paper)")
    args.runs_dir = args.runs_dirs[0]
    formats = ("md", "csv") if args.format == "all" else (args.format,)
    summary = build_report(args.runs_dir, args.out, args.reference, formats=formats,
                           figures=not args.no_figures,
                           warn=lambda msg: print(f"warning: {msg}", file=sys.stderr))
    print(summary.table_md)
    print(f"{summary.records} record(s) used, {len(summary.skipped)} skipped; wrote:", file=sys.stderr)
    for path in summary.written:
        print(f"  {path}", file=sys.stderr)
    return 0


def _paper(args: argparse.Namespace) -> int:
    from .paper_pages import build_paper, log_to_wandb
    from .tracking import LoggerConfig

    for root in args.runs_dirs:
        if not root.is_dir():
            raise FileNotFoundError(f"runs directory {root} does not exist")
    out = args.out or args.runs_dirs[0] / "paper"
    written, results, df = build_paper(args.runs_dirs, out, args.reference, figures=not args.no_figures,
                                       warn=lambda msg: print(f"warning: {msg}", file=sys.stderr))
    for r in results:
        print(f"{r.page.key}: " + "; ".join(f"{c.text}: {c.verdict}" for c in r.claims))
    if args.wandb is not None:
        run_id = log_to_wandb(results, out, LoggerConfig(backend="wandb", mode=args.wandb_mode), args.wandb)
        print(f"W&B run {run_id} in {args.wandb}" if run_id else "W&B logging failed (see the warning above)",
              file=sys.stderr)
    print(f"{len(df)} record(s), {len(results)} page(s); wrote:", file=sys.stderr)
    for path in written:
        print(f"  {path}", file=sys.stderr)
    return 0
