"""``halp remeasure``: re-time a sweep's slim models beside their dense models (see
:mod:`experiments.remeasure`). A plugin of the ``halp`` command line (entry point group
``halp.commands``)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

HELP = """Re-time every slim model of a sweep side by side with the dense model it was pruned from,
in one process, interleaved: the fair latency comparison between the runs of a sweep (jobs that ran
hours apart, or two at a time, timed under different load).

For every run under RUNS_DIR with result.json and slim.pt: the dense model and the slim one are
timed together with the latency protocol (ROUNDS rounds, REPEAT times with different shuffles),
in the run's own latency setting (backend, batch, threads); the median slim/dense ratio is kept.

Writes OUT (default RUNS_DIR/remeasured.json) after every run, atomically: rerunning the command
continues where an interrupted one stopped; runs already timed (same slim.pt) are skipped unless
--force. `halp report --paper` uses these ratios. Run it on a quiet machine: no sweep, test run or
build beside it (a load average above 0.5 is warned about), and from the folder the sweep ran in
(records name their dense model's cache path relative to it).

example:
  halp remeasure runs/repro_cpu
  halp remeasure runs/compare50 --rounds 15 --repeat 5 --out results/cpu/remeasured.json"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("remeasure", help="re-time a sweep's slim models beside their dense models, interleaved",
                       description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs_dir", type=Path, metavar="RUNS_DIR", help="directory searched for **/result.json + slim.pt")
    p.add_argument("--out", type=Path, default=None, help="re-timing file (default RUNS_DIR/remeasured.json)")
    p.add_argument("--rounds", type=int, default=15, help="protocol rounds per repeat (default 15)")
    p.add_argument("--repeat", type=int, default=3, help="interleaved measurements per run (default 3)")
    p.add_argument("--force", action="store_true", help="time every run again, even those already in OUT")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from .remeasure import format_table, remeasure
    blob = remeasure(args.runs_dir, args.out, rounds=args.rounds, repeat=args.repeat, force=args.force,
                     progress=not args.no_progress)
    print(format_table(blob))
    print(f"wrote {args.out or args.runs_dir / 'remeasured.json'}", file=sys.stderr)
    return 0
