"""What a latency table says about its own quality: noise, monotonicity, staircase, chunk sizes."""
from __future__ import annotations

import numpy as np

from ..graph import ChannelGraph
from .cost import CostModel
from .table import Entry, LatencyTable
from .units import reachable_widths


def noise_summary(table: LatencyTable) -> dict:
    """Median / 90th percentile of the relative spread of repeats of the measured points (not the
    interpolated ones), and how many were re-measured."""
    entries = [e for v in table.entries.values() for e in v.values()]
    measured = [e for e in entries if e.samples > 0] or entries  # imported tables record no samples
    spreads = np.array([e.spread for e in measured]) if measured else np.zeros(1)
    rounds = int(table.meta.get("protocol", {}).get("rounds", 0))
    remeasured = sum(e.samples > rounds for e in measured) if rounds else 0
    return {"points": table.n_points, "units": len(table.units), "measured": len(measured),
            "median_spread": float(np.median(spreads)), "p90_spread": float(np.percentile(spreads, 90)),
            "max_spread": float(spreads.max()), "remeasured": remeasured}


def monotonicity_violations(table: LatencyTable, slack: float = 2.0) -> list[dict]:
    """Points where more output channels cost *less* than fewer, by more than ``slack`` × the
    spread of the two measurements. Real devices do this (e.g. power-of-two cliffs), so we report
    rather than smooth: the knapsack copes with negative marginal costs."""
    out = []
    for key, rows in table.entries.items():
        by_cin: dict[int, list[tuple[int, float, float]]] = {}
        for (ci, co), e in rows.items():
            by_cin.setdefault(ci, []).append((co, e.ms, e.spread))
        for ci, pts in by_cin.items():
            pts.sort()
            for (c0, m0, s0), (c1, m1, s1) in zip(pts, pts[1:]):
                if m1 < m0 and (m0 - m1) > slack * max(s0 * m0, s1 * m1, 1e-9):
                    out.append({"unit": key, "c_in": ci, "c_out": (c0, c1), "ms": (m0, m1),
                                "drop_pct": 100 * (m0 - m1) / m0})
    return sorted(out, key=lambda v: -v["drop_pct"])


def chunk_sizes(graph: ChannelGraph, table: LatencyTable, tol: float = 0.05,
                cost: CostModel | None = None) -> dict[str, int]:
    """Latency-aware chunk size of every group, read off the measured staircase.

    For a group of width N on a grid of step S, the summed latency of its writing layers (other
    groups at full width) is examined in blocks of m grid steps counted down from N. The chunk is
    the largest m·S (at most N/2) for which every complete block is flat: removing part of a block
    saves less than ``tol`` of the block's latency, so pruning less than a whole block buys
    nothing. With S coarser than the device's stairs this returns S.
    """
    cost = cost or CostModel.create(graph, table, overhead="none", strict=False)
    io = graph.layer_widths(graph.full_widths())
    out = {}
    for gid, g in graph.groups.items():
        step = int(table.groups.get(gid, {}).get("step", 1))
        widths = np.array(reachable_widths(g.width, step))[::-1]  # N, N-S, ...
        lat = np.zeros(len(widths))
        for name in g.out_layers:
            lat += cost.curves[cost.layer_unit[name]].curve(io[name][0], widths)
        best = 1
        m = 2
        while m * step <= g.width // 2:
            flat = True
            for top in range(0, len(widths) - m + 1, m):
                block = lat[top:top + m]
                if block[0] <= 0 or (block[0] - block.min()) / block[0] > tol:
                    flat = False
                    break
            if not flat:
                break
            best = m
            m *= 2
        out[gid] = best * step
    return out


def _isotonic(y: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Weighted least-squares non-decreasing fit (pool adjacent violators)."""
    vals, wts, counts = [], [], []
    for yi, wi in zip(y, w):
        vals.append(yi)
        wts.append(wi)
        counts.append(1)
        while len(vals) > 1 and vals[-2] > vals[-1]:
            v2, w2, c2 = vals.pop(), wts.pop(), counts.pop()
            v1, w1, c1 = vals.pop(), wts.pop(), counts.pop()
            vals.append((v1 * w1 + v2 * w2) / (w1 + w2))
            wts.append(w1 + w2)
            counts.append(c1 + c2)
    return np.repeat(vals, counts)


def smooth_monotone(table: LatencyTable) -> int:
    """Make every (unit, c_in) row non-decreasing in c_out, in place (isotonic regression, each
    point weighted by its number of samples); returns how many entries changed.

    Off by default (``halp lut build --monotone enforce``): real cliffs are information the
    knapsack can use, and smoothing hides them."""
    changed = 0
    for rows in table.entries.values():
        by_cin: dict[int, list[tuple[int, Entry]]] = {}
        for (ci, co), e in rows.items():
            by_cin.setdefault(ci, []).append((co, e))
        for pts in by_cin.values():
            pts.sort(key=lambda p: p[0])
            fit = _isotonic(np.array([e.ms for _, e in pts]), np.array([max(e.samples, 1) for _, e in pts], float))
            for (_, e), v in zip(pts, fit):
                if abs(e.ms - v) > 1e-12:
                    e.ms = float(v)
                    changed += 1
    return changed
