"""Where the latency table misses, and what measured feedback does about it: one panel per job.

    python benchmarks/plot_feedback.py results/cpu/issue15_*.feedback.result.json \
        --remeasured results/cpu/issue15_feedback_remeasured.json --out results/figures/feedback.png

For each job record with measured feedback, every configuration its last pruning step tried is a
point: x is what the table predicted (÷ the step's target), y is what the job measured (÷ the same
target). Points above the diagonal are configurations the table under-priced. Arrows follow the
order of the trials; the first is the table's own choice (what an open-loop job keeps), the ringed
one is the configuration the job kept; triangles are networks HALP narrowed from one measured over
the target (same residual branches) when the solver's answers jumped across the window. With
``--remeasured`` (a ``halp remeasure`` file), a dashed line marks the kept model re-timed in a
fresh process beside its dense model.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from statistics import median

from halp.fileio import atomic_write


def _last_feedback_step(record: dict) -> dict | None:
    """The last pruning step that timed candidates (the one that decides the final widths)."""
    steps = [s for s in record.get("prune_log", []) if s.get("feedback_trials")]
    return steps[-1] if steps else None


def _retimed(remeasured: dict, record: dict) -> float | None:
    """Re-timed slim/dense ÷ target for the run of ``record``, matched on model and target."""
    name = record["model"].split(":")[-1]
    for key, run in remeasured.get("runs", {}).items():
        if key.startswith(name) and abs(run["target"] - record["target_ratio"]) < 1e-9:
            return median(run["ratios"]) / run["target"]
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("records", type=Path, nargs="+", help="result.json files of jobs run with latency.feedback=true")
    ap.add_argument("--remeasured", type=Path, default=None, help="halp remeasure output for the same runs")
    ap.add_argument("--out", type=Path, required=True, help="PNG to write")
    args = ap.parse_args(argv)
    records = [json.loads(p.read_text()) for p in args.records]
    usable = [(p, r, _last_feedback_step(r)) for p, r in zip(args.records, records)]
    missing = [str(p) for p, _, step in usable if step is None]
    if missing:
        ap.error(f"no pruning step with measured feedback in: {', '.join(missing)} (run with latency.feedback=true)")
    remeasured = json.loads(args.remeasured.read_text()) if args.remeasured else {}
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(usable), figsize=(4.2 * len(usable), 4.3), squeeze=False)
    for ax, (path, record, step) in zip(axes[0], usable):
        target = step["target_ms"]
        xs = [t["predicted_ms"] / target for t in step["feedback_trials"]]
        ys = [t["measured_ms"] / target for t in step["feedback_trials"]]
        kept = min(range(len(ys)), key=lambda i: abs(step["feedback_trials"][i]["measured_ms"] - step["measured_ms"]))
        lo, hi = min(xs + ys + [0.9]) * 0.95, max(xs + ys + [1.1]) * 1.05
        ax.fill_between([lo, hi], [0.95, 0.95], [1.05, 1.05], color="0.9", label="target ±5 %")
        ax.plot([lo, hi], [lo, hi], color="0.5", lw=1, label="table exact")
        for i in range(len(xs) - 1):
            ax.annotate("", (xs[i + 1], ys[i + 1]), (xs[i], ys[i]),
                        arrowprops={"arrowstyle": "->", "color": "0.55", "lw": 0.8})
        # HALP records which search proposed each trial: the solver, or narrowing one structure
        trim = [t.get("search") == "trim" for t in step["feedback_trials"]]
        ax.scatter([x for x, t in zip(xs, trim) if not t], [y for y, t in zip(ys, trim) if not t], s=22, zorder=3,
                   label="trials: solver's answer")
        if any(trim):
            ax.scatter([x for x, t in zip(xs, trim) if t], [y for y, t in zip(ys, trim) if t], s=26, marker="^",
                       color="C1", zorder=3, label="trials: narrowed (same branches)")
        ax.scatter([xs[0]], [ys[0]], s=60, marker="s", facecolors="none", edgecolors="C3", zorder=4,
                   label="table's choice (open loop)")
        ax.scatter([xs[kept]], [ys[kept]], s=110, facecolors="none", edgecolors="k", zorder=4, label="kept")
        retimed = _retimed(remeasured, record) if remeasured else None
        if retimed is not None:
            ax.axhline(retimed, color="C2", ls="--", lw=1, label=f"kept, re-timed: {retimed:.3f}")
        ax.set_xlim(lo, hi)
        ax.set_ylim(lo, hi)
        ax.set_title(f"{record['model']}, {record['target_ratio']:.0%} target\n"
                     f"table's choice measured {ys[0]:.2f}×, kept {ys[kept]:.2f}× the target", fontsize=9)
        ax.set_xlabel("predicted by the table ÷ target")
        ax.set_ylabel("measured in the job ÷ target")
        ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    atomic_write(args.out, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
