"""Measured vs predicted end-to-end latency from `lut_accuracy.py` reports, one panel per report.

    python benchmarks/plot_validation.py before.report.json after.report.json --out fig.png [--mode anchors]

Each point is one slim configuration of the report's on-grid validation (anchors excluded); the
diagonal is a perfect prediction and the band is ±5 %.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from halp.fileio import atomic_write


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("reports", type=Path, nargs="+", help="*.report.json written by benchmarks/lut_accuracy.py")
    ap.add_argument("--out", type=Path, required=True, help="PNG to write")
    ap.add_argument("--mode", default="anchors", help="prediction mode to plot (default anchors)")
    ap.add_argument("--labels", nargs="*", default=None, help="a title per report (default: file names)")
    ap.add_argument("--section", default="on-grid", help="validation section (default on-grid)")
    args = ap.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = args.labels or [p.name.replace(".report.json", "") for p in args.reports]
    if len(labels) != len(args.reports):
        ap.error("give one label per report")
    fig, axes = plt.subplots(1, len(args.reports), figsize=(4.6 * len(args.reports), 4.4), squeeze=False)
    for ax, path, label in zip(axes[0], args.reports, labels):
        section = json.loads(path.read_text())[args.section]
        rows = [r for r in section["rows"] if not r.get("anchor")]
        xs, ys = [r["measured_ms"] for r in rows], [r[args.mode] for r in rows]
        top = max(xs + ys) * 1.08
        ax.fill_between([0, top], [0, top * 0.95], [0, top * 1.05], color="0.9", label="±5 %")
        ax.plot([0, top], [0, top], color="0.5", lw=1)
        ax.scatter(xs, ys, s=18)
        s = section["summary"][args.mode]
        ax.set_title(f"{label}\nmedian |err| {s['median_abs_pct']:.1f} %, max {s['max_abs_pct']:.1f} %", fontsize=9)
        ax.set_xlabel("measured (ms)")
        ax.set_ylabel(f"predicted, {args.mode} (ms)")
        ax.set_xlim(0, top)
        ax.set_ylim(0, top)
        ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    atomic_write(args.out, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
