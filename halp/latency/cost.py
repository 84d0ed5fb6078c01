"""Predict the latency of any width configuration from a latency table.

- A layer's latency T_l(c_in, c_out) is read from its unit's entries; between grid points it is
  linear in c_in and, in c_out, follows the staircase (the next measured c_out up, ``ceil``) or
  is linear (``linear``). A layer with no input or no output channel costs nothing.
- Total = the units' sum (layers of an emptied residual branch drop out) mapped through the
  end-to-end anchors (see ``anchors.py``): what the units miss (adds, dispatch, data evicted
  between layers) shrinks with the network but not in proportion, so ``anchors`` (default,
  piecewise linear through dense, half and smallest) fits better than the one-measurement
  ``offset`` / ``scale`` or the two-point ``affine``. Marginal costs are scaled by the map's
  local slope.
- The marginal cost of HALP's neuron groups: removing chunk i of a group with n active channels
  and chunk size g saves the units' latency between widths n - g i and n - g (i+1), all other
  groups as they are. With ``two_sided`` (default) that is every latency the chunk changes: the
  writers' c_out, the readers' c_in and, when the group empties a residual branch, the layers
  that leave the network with it, so a step's per-group prices add up to what :meth:`total_ms`
  predicts. ``two_sided=False`` is the paper's eq. 5-6 (writers only), kept for the ablation.
- Measured feedback (:meth:`CostModel.observe`, :mod:`.feedback`): an end-to-end measurement of a
  pruned configuration joins the anchors, so the map passes through it and the configurations a
  pruner picks next, near that one, are priced from a measurement instead of the uniform anchors.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..graph import ChannelGraph
from ..residual import removed_modules
from .anchors import anchor_ms, apply_knots, overhead_knots
from .table import LatencyTable
from .units import UnitSpec, layer_grid, model_units

OVERHEAD_MODES = ("none", "offset", "scale", "affine", "anchors")
COUT_MODES = ("ceil", "linear")


class UnitCurve:
    """Interpolates one unit's measured points."""

    def __init__(self, points: dict[tuple[int, int], float], depthwise: bool, cout_mode: str = "ceil") -> None:
        self.depthwise = depthwise
        self.cout_mode = cout_mode
        rows: dict[int, dict[int, float]] = {}
        for (ci, co), ms in points.items():
            rows.setdefault(ci, {})[co] = ms
        self.cins = np.array(sorted(rows), dtype=float)
        self.rows = {ci: (np.array(sorted(r), dtype=float), np.array([r[c] for c in sorted(r)]))
                     for ci, r in rows.items()}
        if depthwise:
            cs = np.array(sorted(ci for ci, _ in points), dtype=float)
            self.dw = (cs, np.array([points[(int(c), int(c))] for c in cs]))

    def _along(self, xs: np.ndarray, ys: np.ndarray, q: np.ndarray, mode: str) -> np.ndarray:
        q = np.asarray(q, dtype=float)
        if mode == "ceil":
            idx = np.searchsorted(xs, q, side="left")
            inside = idx < len(xs)
            out = np.empty_like(q)
            out[inside] = ys[idx[inside]]
            out[~inside] = ys[-1] * q[~inside] / xs[-1]  # beyond the grid: proportional
            return out
        below = q < xs[0]
        out = np.interp(q, xs, ys, right=np.nan)
        out[below] = ys[0] * q[below] / xs[0]
        beyond = q > xs[-1]
        out[beyond] = ys[-1] * q[beyond] / xs[-1]
        return out

    def curve(self, cin: float, couts: np.ndarray) -> np.ndarray:
        """Latency at c_in = ``cin`` for every c_out in ``couts`` (zeros where a width is 0)."""
        couts = np.asarray(couts, dtype=float)
        if self.depthwise:  # one width: c_in = c_out
            res = self._along(*self.dw, couts, self.cout_mode)
            return np.where(couts > 0, res, 0.0)
        if cin <= 0:
            return np.zeros_like(couts)
        cins = self.cins
        j = int(np.searchsorted(cins, cin))
        if j < len(cins) and cins[j] == cin:
            res = self._along(*self.rows[int(cin)], couts, self.cout_mode)
        elif j == 0:  # below the smallest measured c_in: proportional
            res = self._along(*self.rows[int(cins[0])], couts, self.cout_mode) * cin / cins[0]
        elif j == len(cins):
            res = self._along(*self.rows[int(cins[-1])], couts, self.cout_mode) * cin / cins[-1]
        else:  # linear in c_in between the neighbouring rows
            lo, hi = cins[j - 1], cins[j]
            a = self._along(*self.rows[int(lo)], couts, self.cout_mode)
            b = self._along(*self.rows[int(hi)], couts, self.cout_mode)
            res = a + (b - a) * (cin - lo) / (hi - lo)
        return np.where(couts > 0, res, 0.0)

    def at(self, cin: float, cout: float) -> float:
        if self.depthwise:
            cin = cout
        return float(self.curve(cin, np.array([cout]))[0])


@dataclass
class CostModel:
    """Latency predictions for ``graph`` from ``table``. Build with :meth:`create`."""

    unit = "ms"            # what total_ms and chunk_costs are in (MacsCost: millions of MACs)
    resource = "latency"   # the resource a budget on this cost model constrains
    graph: ChannelGraph
    table: LatencyTable
    curves: dict[str, UnitCurve]
    layer_unit: dict[str, str]
    conv_only: bool = False
    overhead: str = "anchors"
    two_sided: bool = True
    knots: tuple = (np.array([0.0, 1.0]), np.array([0.0, 1.0]))
    anchor_points: tuple = ()           # the overhead map's knots (units sum, ms), the dense one apart
    dense_point: tuple = (0.0, 0.0)     # the dense model's (units sum, ms)
    observed: tuple = ()                # (units sum, ms) measured by feedback, oldest first

    @classmethod
    def create(cls, graph: ChannelGraph, table: LatencyTable, *, conv_only: bool = False,
               overhead: str = "anchors", two_sided: bool = True, cout_mode: str = "ceil",
               strict: bool = True, calibration: dict | None = None) -> "CostModel":
        """Check that ``table`` belongs to ``graph`` and prepare interpolation.

        ``conv_only`` uses the conv-alone times (the reference method); ``strict`` requires every
        grid point of the model to be in the table (an interrupted or partly merged build is not).
        ``calibration`` replaces the anchors stored with the table by fresh ones
        (:func:`~halp.latency.calibration.recalibrate`; timings drift between runs).
        """
        if overhead not in OVERHEAD_MODES:
            raise ValueError(f"overhead must be one of {OVERHEAD_MODES}, got {overhead!r}")
        if cout_mode not in COUT_MODES:
            raise ValueError(f"cout_mode must be one of {COUT_MODES}, got {cout_mode!r}")
        layer_unit = match_layers(graph, table)
        curves: dict[str, UnitCurve] = {}
        for key in set(layer_unit.values()):
            rows = table.entries.get(key, {})
            pts = {}
            for pt, e in rows.items():
                ms = e.conv_ms if conv_only else e.ms
                if ms is None:
                    raise ValueError(f"table has no conv-only times for unit {key}")
                pts[pt] = ms
            if not pts:
                raise ValueError(f"latency table has no entries for unit {key}")
            curves[key] = UnitCurve(pts, table.units[key].depthwise, cout_mode)
        model = cls(graph, table, curves, layer_unit, conv_only, overhead, two_sided)
        if strict:
            model.check_complete()
        cal = calibration if calibration is not None else table.calibration
        dense_ms = anchor_ms(cal, "dense")
        if overhead != "none" and dense_ms is None:
            raise ValueError("latency table has no end-to-end anchor measurements to calibrate the "
                             "overhead; use overhead='none' or rebuild/recalibrate it (halp lut calibrate)")
        dense = (model.units_ms(graph.full_widths()), dense_ms or 0.0)
        pts = [(model.units_ms(a["widths"]), float(a["ms"])) for a in (cal or {}).get("anchors", [])]
        model.knots = overhead_knots(overhead, pts, dense)
        # what observe() starts from: the map's own knots (for every overhead mode), dense apart
        xs, ys = model.knots
        model.dense_point = (dense[0], apply_knots(xs, ys, dense[0])[0])
        model.anchor_points = tuple((float(x), float(y)) for x, y in zip(xs, ys) if abs(x - dense[0]) > 1e-9)
        return model

    def observe(self, widths: dict[str, int], ms: float) -> None:
        """Make the overhead map pass through ``ms``, an end-to-end measurement at ``widths`` (in
        the anchors' scale: the measured slim/dense ratio times the dense anchor).

        The point joins the knots of the map (whatever ``overhead`` built them) and replaces any
        earlier observation at the same units sum. Knots or earlier observations that
        would make the map non-increasing beside it are dropped: a measurement of the network a
        pruner actually chose outranks uniform-width anchors measured at another time. The dense
        point is never dropped, so predictions stay ratios of the same dense latency."""
        u = self.units_ms(widths)
        ud, md = self.dense_point
        if not 0 < ms < md * (1 + 1e-9) or u >= ud:
            raise ValueError(f"an observation must be a pruned network faster than the dense one "
                             f"({ms:.4g} ms at units {u:.4g}; dense {md:.4g} ms at {ud:.4g})")
        kept = [(x, y) for x, y in self.observed if abs(x - u) > 1e-9]
        self.observed = (*kept, (u, float(ms)))
        self.knots = _monotone_knots(self.anchor_points, self.observed, self.dense_point)

    def check_complete(self) -> None:
        steps = {gid: int(g.get("step", 1)) for gid, g in self.table.groups.items()}
        missing = []
        for name in self.graph.layers:
            rows = self.table.entries.get(self.layer_unit[name], {})
            missing += [(name, pt) for pt in layer_grid(self.graph, name, steps) if pt not in rows]
        if missing:
            shown = ", ".join(f"{n} at (c_in, c_out)={pt}" for n, pt in missing[:3])
            raise ValueError(f"latency table is incomplete: {len(missing)} grid point(s) missing, e.g. "
                             f"{shown} (interrupted build, or not all shards merged?)")

    # ------------------------------------------------------------------ predictions
    def layer_ms(self, name: str, cin: int, cout: int) -> float:
        return self.curves[self.layer_unit[name]].at(cin, cout)

    def units_ms(self, widths: dict[str, int]) -> float:
        """Sum of the units' latencies at group ``widths`` (no overhead)."""
        io = self.graph.layer_widths(widths)
        removed = removed_modules(self.graph, widths)
        return sum(self.layer_ms(n, *io[n]) for n in self.graph.layers if n not in removed)

    def total_ms(self, widths: dict[str, int]) -> float:
        """Predicted end-to-end latency at group ``widths``."""
        return apply_knots(*self.knots, self.units_ms(widths))[0]

    def chunk_costs(self, gid: str, widths: dict[str, int], chunk: int) -> np.ndarray:
        """Latency saved by each chunk of group ``gid`` (index 0 = removed first), given the
        current ``widths``: entry i is the cost of going from ``n - chunk*i`` to
        ``n - chunk*(i+1)`` channels (the last chunk may be smaller)."""
        g = self.graph.groups[gid]
        n = int(widths.get(gid, g.width))
        hi = np.arange(n, 0, -chunk)
        lo = np.maximum(hi - chunk, 0)
        if self.two_sided:
            local = {w: self._group_units_ms(gid, widths, int(w)) for w in {*hi.tolist(), *lo.tolist()}}
            cost = np.array([local[h] - local[low] for h, low in zip(hi.tolist(), lo.tolist())])
        else:  # the paper's pricing: the c_out of the layers that write the group
            io = self.graph.layer_widths(widths)
            cost = np.zeros(len(hi))
            for name in g.out_layers:
                curve = self.curves[self.layer_unit[name]]
                cost += curve.curve(io[name][0], hi) - curve.curve(io[name][0], lo)
        return cost * apply_knots(*self.knots, self.units_ms(widths))[1]

    def _group_units_ms(self, gid: str, widths: dict[str, int], n: int) -> float:
        """Units' latency of the layers that group ``gid`` at width ``n`` can change (its writers
        and readers, and those of a residual branch it may empty); the rest is constant."""
        w = {**widths, gid: n}
        g = self.graph.groups[gid]
        layers = {*g.out_layers, *g.in_layers}
        if g.residual_block is not None:  # what leaves with the branch when the group empties
            layers |= removed_modules(self.graph, {**widths, gid: 0}) & set(self.graph.layers)
        removed = removed_modules(self.graph, w) if n == 0 else set()
        io = self.graph.layer_widths(w)
        return sum(self.layer_ms(name, *io[name]) for name in layers if name not in removed)


def _monotone_knots(anchors: tuple, observed: tuple, dense: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """Knots through ``dense``, the ``observed`` points (newest first in priority) and whichever
    ``anchors`` stay increasing beside them."""
    chosen: list[tuple[float, float]] = [dense]

    def fits(p: tuple[float, float]) -> bool:
        return all((p[0] - x) * (p[1] - y) > 0 and abs(p[0] - x) > 1e-9 for x, y in chosen)

    for p in [*reversed(observed), *anchors]:
        if fits(p):
            chosen.append(p)
    pts = sorted(chosen)
    if len(pts) < 2:
        ud, md = dense
        return np.array([0.0, ud]), np.array([0.0, md])
    return np.array([p[0] for p in pts]), np.array([p[1] for p in pts])


def match_layers(graph: ChannelGraph, table: LatencyTable) -> dict[str, str]:
    """Unit key of every layer of ``graph`` in ``table``, or a clear error if it does not fit."""
    units = model_units(graph)
    out = {}
    for gid, g in graph.groups.items():
        tg = table.groups.get(gid)
        if table.groups and (tg is None or int(tg["width"]) != g.width):
            model = table.meta.get("model", "another model")
            raise ValueError(f"latency table was built for {model}: group {gid} "
                             f"({g.width} channels) is {'missing' if tg is None else 'different'} in it")
    for name, spec in units.items():
        key = table.layers.get(name)
        if key is not None and key not in table.units and key == spec.key:
            raise ValueError(f"latency table is incomplete: unit {key} of layer {name} has no entries "
                             "(interrupted build, or not all shards merged?)")
        if key is None or key not in table.units:
            key = _find_unit(table, spec)
        if key is None:
            raise ValueError(f"latency table has no unit for layer {name} ({spec.key}); "
                             f"was it built for {table.meta.get('model', 'another model')}?")
        if not _same_geometry(table.units[key], spec):
            raise ValueError(f"layer {name} is {spec.key} but the table measured {key}: "
                             "the table belongs to another model or input size")
        out[name] = key
    return out


def _same_geometry(a: UnitSpec, b: UnitSpec) -> bool:
    return (a.kind, a.kernel, a.stride, a.depthwise, a.input_hw) == (b.kind, b.kernel, b.stride, b.depthwise, b.input_hw)


def _find_unit(table: LatencyTable, spec: UnitSpec) -> str | None:
    """For tables without a layer map (imported ones): same geometry, closest extras."""
    if spec.key in table.units:
        return spec.key
    same = [k for k, u in table.units.items() if _same_geometry(u, spec)]
    return same[0] if same else None
