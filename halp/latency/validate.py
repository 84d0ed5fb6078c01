"""How good is a latency table? Predict, slim, measure, compare.

Draws width configurations (the dense model, the smallest reachable one, uniform-ratio and fully
random ones), slims the model to each, times all of them end to end in one interleaved run, and
compares with the cost model's predictions under several modes:

- ``calibrated``  — units (conv+BN+act) + overhead offset from the table's dense measurement
- ``in-run``      — the same, calibrated on the dense model timed in this run (as a pruning job
                    does: it times the dense model before pruning); the dense row is then not
                    counted in this mode's statistics
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
from tqdm.auto import tqdm

from ..graph import ChannelGraph
from ..masks import ChannelMasks
from ..slim import slim_model
from .backends import Setting, get_backend
from .cost import CostModel
from .table import LatencyTable
from .timing import Protocol, measure
from .units import reachable_widths

MODES = {"calibrated": dict(overhead="offset"), "in-run": dict(overhead="offset"),
         "scaled": dict(overhead="scale"),
         "units": dict(overhead="none"), "conv-only": dict(overhead="none", conv_only=True)}


@dataclass
class Validation:
    rows: list[dict] = field(default_factory=list)
    summary: dict[str, dict] = field(default_factory=dict)


def draw_configs(graph: ChannelGraph, table: LatencyTable, k: int, seed: int = 0,
                 on_grid: bool = True) -> list[tuple[str, dict[str, int]]]:
    """``k`` configurations: dense, smallest, then alternately uniform-ratio and random ones.

    ``on_grid`` keeps every width on the table's grid (what a pruner with the table's step
    reaches); otherwise widths are any integer from 1 to the full width.
    """
    rng = random.Random(seed)
    steps = {gid: int(table.groups.get(gid, {}).get("step", 1)) for gid in graph.groups}

    def options(gid: str) -> list[int]:
        w = graph.groups[gid].width
        return reachable_widths(w, steps[gid]) if on_grid else list(range(1, w + 1))

    opts = {gid: options(gid) for gid in graph.groups}
    configs = [("dense", {gid: o[-1] for gid, o in opts.items()}),
               ("smallest", {gid: o[0] for gid, o in opts.items()})]
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


def _masks_for(graph: ChannelGraph, widths: dict[str, int]) -> ChannelMasks:
    keep = {}
    for gid, g in graph.groups.items():
        m = torch.zeros(g.width, dtype=torch.bool)
        m[: widths[gid]] = True
        keep[gid] = m
    return ChannelMasks(keep)


def validate(graph: ChannelGraph, table: LatencyTable, setting: Setting, k: int = 20, seed: int = 0,
             on_grid: bool = True, protocol: Protocol | None = None, progress: bool = True) -> Validation:
    """Predict and measure ``k`` configurations; errors are (predicted - measured) / measured."""
    protocol = protocol or Protocol(rounds=7, sample_ms=50.0, seed=seed)
    configs = draw_configs(graph, table, k, seed, on_grid)
    backend = get_backend(setting)
    with backend:
        runners = []
        for name, widths in tqdm(configs, desc="slimming", disable=not progress):
            slim = slim_model(graph, _masks_for(graph, widths)).eval()
            runners.append(backend.prepare(slim, torch.randn(setting.batch, *graph.input_shape)))
        bar = tqdm(total=len(runners) * protocol.rounds, desc="timing", unit="sample", disable=not progress)
        timings = measure(backend, runners, protocol, tick=bar.update)
        bar.close()
    dense_now = timings[0].ms  # configs[0] is the dense model
    models = {name: CostModel.create(graph, table, **kw, dense_ms=dense_now if name == "in-run" else None)
              for name, kw in MODES.items()}
    res = Validation()
    for (name, widths), t in zip(configs, timings):
        row = {"config": name, "kept": sum(widths.values()) / sum(g.width for g in graph.groups.values()),
               "measured_ms": t.ms, "spread": t.spread}
        for mode, cm in models.items():
            row[mode] = cm.total_ms(widths)
        res.rows.append(row)
    for mode in MODES:
        rows = res.rows[1:] if mode == "in-run" else res.rows
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
    lines.append(f"{'mode':<12}{'median |err|':>14}{'max |err|':>11}{'mean err':>10}{'spearman':>10}")
    for m, s in v.summary.items():
        lines.append(f"{m:<12}{s['median_abs_pct']:>13.1f}%{s['max_abs_pct']:>10.1f}%"
                     f"{s['mean_pct']:>+9.1f}%{s['spearman']:>10.3f}")
    return "\n".join(lines)
