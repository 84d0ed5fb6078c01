"""How good is a latency table? Predict, slim, measure, compare.

Draws width configurations (the dense model, the smallest reachable one, uniform-ratio and fully
random ones), slims the model to each, times all of them end to end in one interleaved run, and
compares with the cost model's predictions under several modes:

- ``anchors``     — units (conv+BN+act+pool) mapped piecewise-linearly through the end-to-end
                    anchors: dense, half width, smallest (default)
- ``affine``      — a + b × units through the dense and smallest anchors
- ``calibrated``  — units + the dense model's measured gap (one measurement)
- ``scaled``      — units × (dense measured / dense units)
- ``units``       — units only, no overhead
- ``conv-only``   — conv times only, no overhead (what the reference implementation does)
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy.stats import spearmanr

from ..graph import ChannelGraph
from ..progress import progress_bar
from ..masks import ChannelMasks
from ..slim import slim_model
from .anchors import anchor_widths
from .backends import Setting, get_backend
from .cost import CostModel
from .table import LatencyTable
from .timing import Protocol, measure
from .units import reachable_widths

MODES = {"anchors": dict(overhead="anchors"), "affine": dict(overhead="affine"),
         "calibrated": dict(overhead="offset"),
         "scaled": dict(overhead="scale"),
         "units": dict(overhead="none"), "conv-only": dict(overhead="none", conv_only=True)}


@dataclass
class Validation:
    rows: list[dict] = field(default_factory=list)
    summary: dict[str, dict] = field(default_factory=dict)
    fresh_anchors: bool = False


def draw_configs(graph: ChannelGraph, table: LatencyTable, k: int, seed: int = 0,
                 on_grid: bool = True) -> list[tuple[str, dict[str, int]]]:
    """``k`` configurations, alternately uniform-ratio and fully random ones.

    ``on_grid`` keeps every width on the table's grid (what a pruner with the table's step
    reaches); otherwise widths are any integer from 1 to the full width, the smallest included.
    """
    rng = random.Random(seed)
    steps = {gid: int(table.groups.get(gid, {}).get("step", 1)) for gid in graph.groups}

    def options(gid: str) -> list[int]:
        w = graph.groups[gid].width
        return reachable_widths(w, steps[gid]) if on_grid else list(range(1, w + 1))

    opts = {gid: options(gid) for gid in graph.groups}
    configs = [] if on_grid else [("one-channel", {gid: 1 for gid in opts})]
    i = 0
    while len(configs) < k:
        if i % 2 == 0:  # one keep ratio for all groups, as a pruned network tends to have
            r = rng.uniform(0.15, 0.95)
            w = {gid: min(o, key=lambda c: abs(c - r * o[-1] * rng.uniform(0.85, 1.15))) for gid, o in opts.items()}
            configs.append((f"ratio{r:.2f}", w))
        else:
            configs.append((f"random{i}", {gid: rng.choice(o) for gid, o in opts.items()}))
        i += 1
    return configs[:k]


def validate(graph: ChannelGraph, table: LatencyTable, setting: Setting, k: int = 20, seed: int = 0,
             on_grid: bool = True, protocol: Protocol | None = None, progress: bool = True,
             fresh_anchors: bool = True) -> Validation:
    """Predict and measure ``k`` configurations; errors are (predicted - measured) / measured.

    The calibration anchors (dense, half, smallest) are timed in the same interleaved run as the
    configurations — timings drift by several per cent between runs, so absolute comparisons
    are only fair side by side. With ``fresh_anchors`` (default) the cost model is calibrated
    on these measurements, otherwise on the anchors stored in the table; the anchor rows are
    shown but never counted in the statistics.
    """
    protocol = protocol or Protocol(rounds=7, sample_ms=50.0, seed=seed)
    steps = {gid: int(g.get("step", 1)) for gid, g in table.groups.items()}
    anchors = list(anchor_widths(graph, steps).items())
    configs = anchors + draw_configs(graph, table, k, seed, on_grid)
    backend = get_backend(setting)
    with backend:
        runners = []
        for name, widths in progress_bar(configs, enabled=progress, desc="slimming"):
            slim = slim_model(graph, ChannelMasks.prefix(graph, widths)).eval()
            runners.append(backend.prepare(slim, torch.randn(setting.batch, *graph.input_shape)))
        bar = progress_bar(total=len(runners) * protocol.rounds, enabled=progress, desc="timing", unit="sample")
        timings = measure(backend, runners, protocol, tick=bar.update)
        bar.close()
    calibration = None
    if fresh_anchors:
        calibration = {"anchors": [{"name": name, "ms": t.ms, "spread": t.spread, "widths": w}
                                   for (name, w), t in zip(anchors, timings)]}
    models = {name: CostModel.create(graph, table, **kw, calibration=calibration) for name, kw in MODES.items()}
    res = Validation(fresh_anchors=fresh_anchors)
    total = sum(g.width for g in graph.groups.values())
    for (name, widths), t in zip(configs, timings):
        row = {"config": name, "anchor": name in dict(anchors), "kept": sum(widths.values()) / total,
               "measured_ms": t.ms, "spread": t.spread}
        for mode, cm in models.items():
            row[mode] = cm.total_ms(widths)
        res.rows.append(row)
    for mode in MODES:
        rows = [r for r in res.rows if not r["anchor"]]
        measured = np.array([r["measured_ms"] for r in rows])
        pred = np.array([r[mode] for r in rows])
        err = 100 * (pred - measured) / measured
        res.summary[mode] = {"configs": len(rows), "median_abs_pct": float(np.median(np.abs(err))),
                             "max_abs_pct": float(np.max(np.abs(err))),
                             "mean_pct": float(np.mean(err)),
                             "spearman": float(spearmanr(pred, measured).statistic)}
    return res


def format_validation(v: Validation) -> str:
    modes = list(MODES)
    lines = [f"{'config':<14}{'kept':>6}{'measured ms':>13}{'spread':>8}" + "".join(f"{m:>13}" for m in modes)]
    for r in v.rows:
        errs = "".join(f"{100 * (r[m] - r['measured_ms']) / r['measured_ms']:>+12.1f}%" for m in modes)
        lines.append(f"{r['config']:<14}{r['kept']:>6.0%}{r['measured_ms']:>13.3f}{r['spread']:>8.1%}{errs}")
    lines.append("")
    lines.append("(anchor rows - dense, half, smallest - are not counted below; calibration: "
                 + ("these anchor measurements)" if v.fresh_anchors else "the anchors stored in the table)"))
    lines.append(f"{'mode':<12}{'median |err|':>14}{'max |err|':>11}{'mean err':>10}{'spearman':>10}")
    for m, s in v.summary.items():
        lines.append(f"{m:<12}{s['median_abs_pct']:>13.1f}%{s['max_abs_pct']:>10.1f}%"
                     f"{s['mean_pct']:>+9.1f}%{s['spearman']:>10.3f}")
    return "\n".join(lines)
