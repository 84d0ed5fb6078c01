"""The math that maps a sum of unit latencies to end-to-end milliseconds through the measured anchors.

Pricing a width configuration needs only this arithmetic (which widths the anchors have, how the
units' sum is mapped through their measurements), not the machinery that slims and times whole
networks to obtain them; it lives apart from :mod:`.calibration` so that the cost model never
depends on measuring or slimming.
"""
from __future__ import annotations

import warnings

import numpy as np

from ..graph import ChannelGraph
from .units import reachable_widths


def anchor_widths(graph: ChannelGraph, steps: dict[str, int]) -> dict[str, dict[str, int]]:
    """Widths of the anchors: dense, every prunable group at the grid width nearest half, smallest."""
    # a group that cannot be pruned stays at full width whatever the table's grid says
    grids = {gid: reachable_widths(g.width, steps.get(gid, 1) if g.prunable else g.width)
             for gid, g in graph.groups.items()}
    return {"dense": {gid: o[-1] for gid, o in grids.items()},
            "half": {gid: min(o, key=lambda w: (abs(w - o[-1] / 2), w)) for gid, o in grids.items()},
            "smallest": {gid: o[0] for gid, o in grids.items()}}


def anchor_ms(calibration: dict | None, name: str) -> float | None:
    for a in (calibration or {}).get("anchors", []):
        if a["name"] == name:
            return float(a["ms"])
    return None


def overhead_knots(mode: str, anchors: list[tuple[float, float]], dense: tuple[float, float]
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Knots (units sum -> end-to-end ms) of the piecewise-linear overhead map of ``mode``.

    ``anchors`` are (units, measured) pairs, ``dense`` the dense model's pair."""
    ud, md = dense
    if mode == "none":
        return np.array([0.0, 1.0]), np.array([0.0, 1.0])
    if mode == "offset":
        return np.array([ud - 1.0, ud]), np.array([md - 1.0, md])
    if mode == "scale":
        return np.array([0.0, ud]), np.array([0.0, md])
    pts = sorted(anchors)
    if mode == "affine":
        pts = [pts[0], dense]
    xs, ys = np.array([p[0] for p in pts]), np.array([p[1] for p in pts])
    keep = np.concatenate([[True], np.diff(xs) > 1e-9])  # drop anchors with the same units sum
    xs, ys = xs[keep], ys[keep]
    if len(xs) < 2:
        return np.array([ud - 1.0, ud]), np.array([md - 1.0, md])
    if np.any(np.diff(ys) <= 0):
        # Less work measured as slower (noise, or a network too small for width to matter): a
        # piecewise map would have flat or negative slopes, pricing channels at zero or below and
        # extrapolating to nonsense. Fall back to the one-anchor proportional map.
        warnings.warn(f"end-to-end anchors are not increasing with the units' sum ({np.round(ys, 4).tolist()} ms "
                      f"at {np.round(xs, 4).tolist()}); using overhead='scale' (the dense anchor alone)",
                      RuntimeWarning, stacklevel=2)
        return np.array([0.0, ud]), np.array([0.0, md])
    return xs, ys


ABOVE_TOP_SLOPE = 1.0  # the most end-to-end ms per unit-ms past the top knot (the dense network's)


def apply_knots(xs: np.ndarray, ys: np.ndarray, u: float) -> tuple[float, float]:
    """(mapped value, local slope) of the piecewise-linear map at ``u``, extrapolating linearly.

    Past the top knot (the dense network in every mode but ``none``) the slope is at most
    :data:`ABOVE_TOP_SLOPE`: no anchor measures there, and a units sum above dense's comes from
    narrower widths whose units timed slower (a grouped conv narrowed inside its groups), not
    from more work, so the overhead the anchors grew with width is not grown further. Extending
    the last segment instead priced such RegNetX configurations 40-77 % over what they measured
    (``results/lut_accuracy.md``)."""
    j = int(np.clip(np.searchsorted(xs, u) - 1, 0, len(xs) - 2))
    slope = (ys[j + 1] - ys[j]) / (xs[j + 1] - xs[j])
    if u > xs[-1] and slope > ABOVE_TOP_SLOPE:
        return float(ys[-1] + ABOVE_TOP_SLOPE * (u - xs[-1])), ABOVE_TOP_SLOPE
    return float(ys[j] + slope * (u - xs[j])), float(slope)
