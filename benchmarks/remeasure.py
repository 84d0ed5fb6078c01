"""Re-time the slim models of a sweep side by side, in one process, with their dense model.

Kept for the commands quoted in older results pages; the suite command is ``halp remeasure``
(:mod:`experiments.remeasure`), which this calls.

    python benchmarks/remeasure.py runs/compare50 [--rounds 15] [--repeat 3] [--json out.json]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from experiments.remeasure import format_table, remeasure


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs_dir", type=Path)
    ap.add_argument("--rounds", type=int, default=15, help="protocol rounds (default 15)")
    ap.add_argument("--repeat", type=int, default=3, help="interleaved measurements per run (default 3)")
    ap.add_argument("--json", type=Path, default=None, help="the re-timing file (default RUNS_DIR/remeasured.json)")
    args = ap.parse_args(argv)
    print(format_table(remeasure(args.runs_dir, args.json, rounds=args.rounds, repeat=args.repeat, force=True)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
