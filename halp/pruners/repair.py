"""Local passes that move one pruning step's solution toward its budget.

The knapsack prices every chunk at the current widths, one group at a time. Groups interact (a
reader's ``c_in`` is another group's width; an emptied branch takes its other layers with it), so
the solver's budget and the cost model's total of its answer differ, and the chunk grid makes the
total jump. These passes work on the cost model's exact total instead, one chunk at a time, and
keep every group's kept chunks a prefix of its importance order:

- :func:`trim` removes the least important chunk per millisecond until the total fits;
- :func:`trim_path` records the networks :func:`trim` passes through, one chunk at a time, without
  emptying a group, and :func:`narrower` / :func:`wider` list a network's one-chunk narrowings and
  widenings (the measured-feedback search picks among them when the solver's answers jump across
  the target);
- :func:`fill` gives back the most important removed chunk per millisecond while it still fits;
- :func:`exchange` swaps one kept chunk for one removed chunk of another group: first while the
  kept importance rises (a strictly better answer within the limit), then, if the total is still
  below ``enough``, the swap that spends more of the budget at the least loss of importance
  (one or two chunks for one or two; or one given back, across a jump in the total such as an
  emptied branch coming back, and as many others trimmed as it takes).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..latency.cost import CostModel

__all__ = ["Attempt", "exchange", "fill", "narrower", "trim", "trim_path", "wider"]


@dataclass
class Attempt:
    """One answer of a step: predicted total, kept importance, masks and widths."""
    predicted: float
    value: float
    keep: dict[str, torch.Tensor]
    widths: dict[str, int]
    kept: dict[str, int]  # chunks kept per group (a prefix of its importance order)


Order = dict[str, list[torch.Tensor]]  # per group: its chunks' channel indices, most important first


def _move(a: Attempt, order: Order, values: dict[str, np.ndarray], gid: str, add: bool,
          predicted: float) -> Attempt:
    """``a`` with group ``gid``'s next chunk given back (``add``) or its last kept chunk removed."""
    k = a.kept[gid] if add else a.kept[gid] - 1
    piece = order[gid][k]
    m = a.keep[gid].clone()
    m[piece] = add
    sign = 1 if add else -1
    return Attempt(predicted, a.value + sign * float(values[gid][k]), {**a.keep, gid: m},
                   {**a.widths, gid: a.widths[gid] + sign * len(piece)}, {**a.kept, gid: k + (1 if add else 0)})


def fill(cost: CostModel, a: Attempt, values: dict[str, np.ndarray], order: Order, limit: float) -> Attempt:
    """Give back, one at a time, the removed chunk with the most importance per predicted
    millisecond that keeps the total within ``limit``."""
    while True:
        pick = None
        for gid, k in a.kept.items():
            if k >= len(order[gid]):
                continue
            total = cost.total_ms({**a.widths, gid: a.widths[gid] + len(order[gid][k])})
            if total > limit:
                continue
            gain = float(values[gid][k]) / max(total - a.predicted, 1e-12)
            if pick is None or gain > pick[0]:
                pick = (gain, gid, total)
        if pick is None:
            return a
        a = _move(a, order, values, pick[1], True, pick[2])


def trim(cost: CostModel, a: Attempt, values: dict[str, np.ndarray], mins: dict[str, int], order: Order,
         limit: float) -> Attempt:
    """Remove, one at a time, the kept chunk with the least importance per predicted millisecond
    saved (never below a group's ``mins``), until the total is within ``limit`` or nothing more
    may go."""
    while a.predicted > limit:
        pick = None
        for gid, k in a.kept.items():
            if k <= mins[gid]:
                continue
            total = cost.total_ms({**a.widths, gid: a.widths[gid] - len(order[gid][k - 1])})
            loss = float(values[gid][k - 1]) / max(a.predicted - total, 1e-12)
            if pick is None or loss < pick[0]:
                pick = (loss, gid, total)
        if pick is None:
            return a
        a = _move(a, order, values, pick[1], False, pick[2])
    return a


def trim_path(cost: CostModel, a: Attempt, values: dict[str, np.ndarray], mins: dict[str, int], order: Order,
              stop: float, max_len: int = 512) -> list[Attempt]:
    """``a``, then each network one :func:`trim` move further (the kept chunk with the least
    importance per predicted millisecond saved), until the total is at most ``stop``, nothing may
    go, or ``max_len`` networks. A group that ``a`` keeps is never emptied: the path keeps ``a``'s
    structure (which residual branches exist) and only narrows it, so its measured latency falls
    about smoothly even where the solver's answers, which change structure, jump."""
    floor = {gid: max(mins[gid], 1 if k > 0 else 0) for gid, k in a.kept.items()}
    path = [a]
    while a.predicted > stop and len(path) < max_len:
        b = trim(cost, a, values, floor, order, a.predicted * (1 - 1e-9))
        if b.kept == a.kept or b.predicted >= a.predicted:  # nothing left to take off
            break
        path.append(b)
        a = b
    return path


def narrower(cost: CostModel, a: Attempt, values: dict[str, np.ndarray], mins: dict[str, int], order: Order
             ) -> list[Attempt]:
    """Every network one chunk narrower than ``a`` (one group's last kept chunk removed, never
    below ``mins``), priced. Between two neighbours of a :func:`trim_path` these fill in the
    prices that the path's own, often coarse, steps skip."""
    out = []
    for gid, k in a.kept.items():
        if k > mins[gid]:
            w = a.widths[gid] - len(order[gid][k - 1])
            out.append(_move(a, order, values, gid, False, cost.total_ms({**a.widths, gid: w})))
    return out


def wider(cost: CostModel, a: Attempt, values: dict[str, np.ndarray], order: Order) -> list[Attempt]:
    """Every network one chunk wider than ``a`` in a group it keeps (an emptied group stays
    empty, so the structure stays ``a``'s), priced."""
    out = []
    for gid, k in a.kept.items():
        if 0 < k < len(order[gid]):
            w = a.widths[gid] + len(order[gid][k])
            out.append(_move(a, order, values, gid, True, cost.total_ms({**a.widths, gid: w})))
    return out


def exchange(cost: CostModel, a: Attempt, values: dict[str, np.ndarray], mins: dict[str, int], order: Order,
             limit: float, enough: float, max_moves: int = 64, max_checks: int = 64) -> Attempt:
    """Swap kept chunks for removed chunks of other groups, keeping the total within ``limit``.

    A move takes one, two or all removable chunks off the end of one or two groups' prefixes and
    gives back one or two chunks to one or two other groups (at least one of each, one group never on both sides).
    Phase 1 takes the move that raises the kept importance most, while one does. Phase 2, only
    while the total is below ``enough``, takes the move that raises the total at the least loss of
    importance (when no such move qualifies, :func:`_give_back_and_trim`'s wider one), then
    :func:`fill` s where that raises the total. Phase 1 strictly raises the importance and phase 2
    strictly raises the total, so both end. Moves are ranked by their importance change among those whose
    first-order total (the sum of each side's exact effect alone) fits; at most ``max_checks`` are
    priced exactly per move, in that order."""
    for _ in range(max_moves):
        b = _best_move(cost, a, values, mins, order, limit, None, max_checks)
        if b is None:
            break
        a = b
    for _ in range(max_moves):
        if a.predicted >= enough:
            break
        b = _best_move(cost, a, values, mins, order, limit, a.predicted, max_checks)
        if b is None:  # no small swap spends more: give one chunk back and trim as much as it takes
            b = _give_back_and_trim(cost, a, values, mins, order, limit)
        if b is None:
            break
        filled = fill(cost, b, values, order, limit)
        # a noisy table can make a give-back *lower* the total (a wider layer timed faster); taking
        # that here would undo the move and cycle, so phase 2 keeps only totals that rise
        a = filled if filled.predicted > a.predicted else b
    return a


def _give_back_and_trim(cost: CostModel, a: Attempt, values: dict[str, np.ndarray], mins: dict[str, int],
                        order: Order, limit: float) -> Attempt | None:
    """Phase 2's wide move: give back one removed chunk whose price alone passes ``limit`` (say,
    the last chunk of an emptied branch, which brings the branch's other layers back), then
    :func:`trim` the other groups until the total fits. Small swaps cannot bridge such a jump; this
    can. Returns the most important result whose total lands in ``(a.predicted, limit]``, or None."""
    best = None
    for gid, k in a.kept.items():
        if k >= len(order[gid]):
            continue
        total = cost.total_ms({**a.widths, gid: a.widths[gid] + len(order[gid][k])})
        if total <= limit:  # a plain give-back fits: fill's and the small swaps' case
            continue
        b = trim(cost, _move(a, order, values, gid, True, total), values, {**mins, gid: k + 1}, order, limit)
        if a.predicted < b.predicted <= limit and (best is None or b.value > best.value):
            best = b
    return best


def _sides(cost: CostModel, a: Attempt, values: dict[str, np.ndarray], mins: dict[str, int], order: Order):
    """Every one-group change: (group, chunks, importance change, exact total change, new width),
    for removals (one, two or all removable chunks) and for give-backs (one or two)."""
    outs, ins = [], []
    for gid, k in a.kept.items():
        for n in sorted({1, 2, k - mins[gid]}):  # one, two, or every chunk that may go (a branch empties)
            if 1 <= n and k - n >= mins[gid]:
                w = a.widths[gid] - sum(len(p) for p in order[gid][k - n:k])
                d = cost.total_ms({**a.widths, gid: w}) - a.predicted
                outs.append((gid, -n, -float(values[gid][k - n:k].sum()), d, w))
            if n <= 2 and k + n <= len(order[gid]):
                w = a.widths[gid] + sum(len(p) for p in order[gid][k:k + n])
                d = cost.total_ms({**a.widths, gid: w}) - a.predicted
                ins.append((gid, n, float(values[gid][k:k + n].sum()), d, w))
    return outs, ins


def _best_move(cost: CostModel, a: Attempt, values: dict[str, np.ndarray], mins: dict[str, int], order: Order,
               limit: float, above: float | None, max_checks: int) -> Attempt | None:
    """The best move from ``a`` (see :func:`exchange`): the most importance gained, among moves
    that gain importance (``above`` None) or whose total lands in ``(above, limit]``; None if no
    move qualifies."""
    outs, ins = _sides(cost, a, values, mins, order)
    # a side is one change or two changes of different groups
    def combos(side):
        out = [(c,) for c in side]
        out += [(c, e) for i, c in enumerate(side) for e in side[i + 1:] if c[0] != e[0]]
        return out
    o_side, i_side = combos(outs), combos(ins)
    if not o_side or not i_side:
        return None
    o_val = np.array([sum(c[2] for c in s) for s in o_side])
    o_d = np.array([sum(c[3] for c in s) for s in o_side])
    i_val = np.array([sum(c[2] for c in s) for s in i_side])
    i_d = np.array([sum(c[3] for c in s) for s in i_side])
    gain = o_val[:, None] + i_val[None, :]
    est = a.predicted + o_d[:, None] + i_d[None, :]
    slack = 0.02 * max(abs(limit), 1e-12)  # first-order totals are approximate: look a little past
    ok = est <= limit + slack
    ok &= gain > 1e-12 * max(1.0, float(np.abs(gain).max())) if above is None else est > above
    o_groups = [{c[0] for c in s} for s in o_side]
    i_groups = [{c[0] for c in s} for s in i_side]
    cand = np.flatnonzero(ok.ravel())
    cand = cand[np.argsort(-gain.ravel()[cand], kind="stable")]
    checked = 0
    for flat in cand:
        oi, ii = divmod(int(flat), len(i_side))
        if o_groups[oi] & i_groups[ii]:
            continue
        widths = dict(a.widths)
        for c in (*o_side[oi], *i_side[ii]):
            widths[c[0]] = c[4]
        total = cost.total_ms(widths)
        checked += 1
        if total <= limit and (above is None or total > above):
            b = a
            for c in (*o_side[oi], *i_side[ii]):
                for _ in range(abs(c[1])):
                    b = _move(b, order, values, c[0], c[1] > 0, total)
            return b
        if checked >= max_checks:
            break
    return None
