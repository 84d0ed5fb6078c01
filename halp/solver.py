"""HALP's augmented knapsack: choose how many chunks every channel group keeps under a latency budget.

Each channel group has its channels sorted by importance and cut into consecutive *chunks*
(chunk 0 = most important). A group keeps a **prefix** of its chunks: ``k`` chunks with
``min_keep <= k <= n``, worth ``V_k = sum(values[:k])`` and costing ``C_k = sum(costs[:k])``.
Chunk costs are latencies in ms and may be zero or negative (latency cliffs), so ``C_k`` need
not grow with ``k``. We maximise ``sum V`` subject to ``sum C <= budget``: a multiple-choice
knapsack with one option per allowed ``k``.

Discretisation (see :func:`discretise`), chosen so that the exact solver is safe:

* every group's options are shifted by the group's cheapest allowed option, ``r_k = C_k - min C``
  (so ``r_k >= 0`` even with negative chunk costs: the DP axis starts at 0); the sum of those
  minima is the *latency floor*, the cheapest reachable total, reserved up front (it includes
  the ``min_keep`` chunks); a budget below it raises :class:`InfeasibleTarget`;
* the free capacity ``S = budget - floor`` is cut into units
  ``unit = min(S, sum_g max r) / resolution``: the whole resolution goes to the part of the axis
  a selection can actually use, even for huge budgets;
* option costs become ``ceil(r_k / unit)`` and the capacity is ``W = floor(S / unit)``: rounding up
  makes every selection that fits ``W`` truly fit the budget, negative chunk costs included (the
  price: a selection within ``len(groups)`` units of the budget may be missed); costs above ``W``
  are capped at ``W + 1`` (= never fits), so huge chunks cause no overflow;
* when ``S`` covers every group's dearest option, ``W = sum_g max ceil(r / unit)`` (all fit).

The reported cost of a solution is the correctly rounded float sum (``math.fsum``) of the chosen
``C_k``. Should float rounding ever put it above the budget, the exact solver re-discretises with
a capacity shrunk by a few ulps; a returned solution never costs more than the budget.

:class:`ExactSolver` is an exact dynamic programme over groups on the integer axis. Per group
only the Pareto options matter (cheapest option per integer cost, values strictly increasing with
cost); as the DP table is non-decreasing in capacity, the group's update is a (max, +)
convolution with a step kernel, computed either densely over a sliding-window view (vectorised over
capacity and kernel) or option by option (few Pareto options). Only the capacity window that can
still reach the final capacity is computed: ``[W - (costs of later groups), costs of earlier
groups]``, and the largest groups are placed at both ends of the order to keep the windows short.
The DP's optimum on the integer axis can lose to greedy on the true costs (rounding up leaves up
to ``len(groups)`` units unspent), so by default the solver then spends that budget by extending
prefixes (:func:`_extend`) and returns the better of that and :class:`GreedySolver`'s solution:
never worse than greedy, never over budget (see :class:`ExactSolver` for the measured gap).
"""
from __future__ import annotations

import heapq
import math
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

_EPS = float(np.finfo(np.float64).eps)
_MARGINS_ULPS = (0.0, 64.0, 6.4e7)  # float-rounding margins tried in turn (ulps of the magnitudes)
_FITS_ULPS = 16.0  # a budget this close to fitting every selection is taken as fitting them all
_BLOCK = 1 << 18  # candidate-matrix elements per block in the dense update (2 MB of float64)
_DENSE_PER_OPTION = 2  # one option of the sparse update costs about as much as 2 dense kernel columns


@dataclass
class GroupItems:
    """The knapsack items of one channel group: its chunks, most important first."""

    id: str
    values: np.ndarray  # shape (n,): importance of keeping chunk j (>= 0), chunk 0 = most important
    costs: np.ndarray  # shape (n,): latency of chunk j in ms; may be zero or negative
    min_keep: int = 1  # chunks that must be kept (0 <= min_keep <= n)

    def __post_init__(self) -> None:
        self.values = np.asarray(self.values, dtype=np.float64)
        self.costs = np.asarray(self.costs, dtype=np.float64)


@dataclass
class Solution:
    """Chunks kept per group id, with the true (float) value and cost of that selection."""

    keep: dict[str, int]
    value: float
    cost: float


class InfeasibleTarget(ValueError):
    """The budget is below the latency floor (every group at its cheapest allowed width)."""

    def __init__(self, target: float, floor: float, at_min_width: bool = True) -> None:
        self.target, self.floor = float(target), float(floor)
        where = "at its minimum width" if at_min_width else "at its cheapest allowed width"
        self.at_min_width = at_min_width
        super().__init__(f"target {self.target:.6g} ms is below the latency floor {self.floor:.6g} ms "
                         f"(every group {where})")

    def __reduce__(self):  # picklable across processes despite the custom signature
        return type(self), (self.target, self.floor, self.at_min_width)


class Solver(Protocol):
    def solve(self, groups: list[GroupItems], budget: float) -> Solution: ...


@dataclass
class DiscreteInstance:
    """The integer multiple-choice knapsack the exact solver solves exactly.

    Group ``g`` has options ``ks[g]`` (chunks kept) with true values ``values[g]``, true costs
    ``costs[g]`` and integer costs ``int_costs[g]`` (``ceil((costs - offsets[g]) / unit)``, capped
    at ``capacity + 1``). Any choice of one option per group with ``sum int_costs <= capacity``
    truly costs at most the budget.
    """

    ids: list[str]
    ks: list[np.ndarray]
    values: list[np.ndarray]
    costs: list[np.ndarray]
    int_costs: list[np.ndarray]
    capacity: int
    unit: float
    floor: float
    offsets: list[float]


def _options(groups: list[GroupItems]) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Validate ``groups``; per group the allowed ``k`` and their cumulative values and costs."""
    out, seen = [], set()
    for g in groups:
        if g.id in seen:
            raise ValueError(f"duplicate group id {g.id!r}")
        seen.add(g.id)
        v, c = np.asarray(g.values, dtype=np.float64), np.asarray(g.costs, dtype=np.float64)
        if v.ndim != 1 or c.shape != v.shape:
            raise ValueError(f"group {g.id!r}: values and costs must be 1-D of the same length, "
                             f"got shapes {v.shape} and {c.shape}")
        if not (np.isfinite(v).all() and np.isfinite(c).all()):
            raise ValueError(f"group {g.id!r}: values and costs must be finite (no NaN or Inf)")
        if (v < 0).any():
            raise ValueError(f"group {g.id!r}: values must be non-negative, min is {v.min():g}")
        m, n = g.min_keep, len(v)
        if isinstance(m, bool) or not isinstance(m, (int, np.integer)) or not 0 <= m <= n:
            raise ValueError(f"group {g.id!r}: min_keep must be an integer in [0, {n}] "
                             f"(the group has {n} chunks), got {m!r}")
        ks = np.arange(int(m), n + 1)
        cv = np.concatenate(([0.0], np.cumsum(v)))[ks]
        cc = np.concatenate(([0.0], np.cumsum(c)))[ks]
        if not (np.isfinite(cv).all() and np.isfinite(cc).all()):
            raise ValueError(f"group {g.id!r}: the sums of values or costs overflow")
        out.append((ks, cv, cc))
    return out


def _budget(budget: float) -> float:
    try:
        value = float(budget)
    except (TypeError, ValueError):
        raise ValueError(f"budget must be a number, got {budget!r}") from None
    if math.isnan(value):
        raise ValueError("budget must be a number, got NaN")
    return value


def _floor(opts: list, budget: float) -> tuple[float, list[float]]:
    """Latency floor and per-group cheapest cost; raise :class:`InfeasibleTarget` below it."""
    offsets = [float(cc.min()) for _, _, cc in opts]
    floor = math.fsum(offsets)
    if budget < floor:
        at_min = all(cc[0] == off for (_, _, cc), off in zip(opts, offsets))
        raise InfeasibleTarget(budget, floor, at_min)
    return floor, offsets


def discretise(groups: list[GroupItems], budget: float, resolution: int = 8192,
               margin_ulps: float = 0.0) -> DiscreteInstance:
    """The integer instance of ``groups`` under ``budget`` (see the module docstring).

    ``margin_ulps`` shrinks the free capacity by that many ulps of the instance's magnitudes; the
    exact solver only uses it when float rounding made a selection exceed the budget.
    """
    if isinstance(resolution, bool) or not isinstance(resolution, (int, np.integer)) or resolution < 1:
        raise ValueError(f"resolution must be a positive integer, got {resolution!r}")
    budget = _budget(budget)
    opts = _options(groups)
    floor, offsets = _floor(opts, budget)
    rel = [cc - off for (_, _, cc), off in zip(opts, offsets)]  # >= 0 exactly in floating point
    rtot = math.fsum(float(r.max()) for r in rel)
    if math.isinf(budget):
        free, slack = math.inf, 0.0
    else:
        ulp = _EPS * (abs(budget) + math.fsum(float(np.abs(cc).max()) for _, _, cc in opts))
        free, slack = max(budget - floor - margin_ulps * ulp, 0.0), _FITS_ULPS * ulp
    span = min(free, rtot)
    unit = span / resolution
    if not unit > 0:  # no free capacity (any unit will do) or an underflow
        unit = span if span > 0 else 1.0
    ceils = [np.minimum(np.ceil(r / unit), 2.0**53) for r in rel]  # no inf from huge costs
    total_max = int(math.fsum(float(c.max()) for c in ceils))
    if free >= rtot - slack:  # every selection fits (up to float rounding, which solve() checks)
        cap = total_max
    else:
        cap = min(math.floor(free / unit), total_max)
        while cap > 0 and cap * unit > free:  # guard the float division
            cap -= 1
    int_costs = [np.minimum(c, cap + 1).astype(np.int64) for c in ceils]
    return DiscreteInstance([g.id for g in groups], [o[0] for o in opts], [o[1] for o in opts],
                            [o[2] for o in opts], int_costs, cap, unit, floor, offsets)


def _pareto(c: np.ndarray, v: np.ndarray, cap: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Options worth keeping: integer costs ascending, values strictly increasing; option indices."""
    idx = np.flatnonzero(c <= cap)  # the cheapest option has cost 0, so never empty
    order = np.lexsort((-v[idx], c[idx]))  # by cost, then best value first
    idx = idx[order]
    cs, vs = c[idx], v[idx]
    first = np.concatenate(([True], cs[1:] != cs[:-1]))
    idx, cs, vs = idx[first], cs[first], vs[first]
    run = np.maximum.accumulate(vs)
    keep = np.concatenate(([True], vs[1:] > run[:-1]))
    return cs[keep], vs[keep], idx[keep]


def _ends_order(sizes: list[int]) -> list[int]:
    """Largest first and last, smallest in the middle (short capacity windows for big groups)."""
    ranked = sorted(range(len(sizes)), key=lambda i: -sizes[i])
    return ranked[0::2] + ranked[1::2][::-1]


def _update(f: np.ndarray, ds: np.ndarray, vs: np.ndarray, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
    """``best[w] = max_i f[w - ds[i]] + vs[i]`` for ``w`` in ``[lo, hi]`` (``f`` is -inf below 0),
    with the maximising Pareto index ``i``. ``ds`` ascending from 0, ``vs`` increasing."""
    R, L = int(ds[-1]), hi - lo + 1
    src = np.concatenate((np.full(R, -np.inf), f))  # src[w + R - d] = f[w - d]
    if R + 1 <= _DENSE_PER_OPTION * len(ds):
        # step kernel over every integer cost d = R..0 (reversed: row w of the view reads d = R - j)
        level = np.searchsorted(ds, np.arange(R + 1), side="right") - 1
        kernel, choice = vs[level][::-1].copy(), level[::-1].astype(np.int32)
        view = sliding_window_view(src[lo:hi + R + 1], R + 1)
        best, arg = np.empty(L), np.empty(L, dtype=np.int32)
        rows = max(1, _BLOCK // (R + 1))
        buf = np.empty((min(rows, L), R + 1))
        for a in range(0, L, rows):
            blk = view[a:a + rows]
            cand = np.add(blk, kernel, out=buf[:len(blk)])
            j = cand.argmax(axis=1)
            best[a:a + len(blk)] = cand[np.arange(len(blk)), j]
            arg[a:a + len(blk)] = choice[j]
        return best, arg
    best, arg = np.full(L, -np.inf), np.zeros(L, dtype=np.int32)
    cand, better = np.empty(L), np.empty(L, dtype=bool)
    for i, (d, v) in enumerate(zip(ds.tolist(), vs.tolist())):
        np.add(src[lo + R - d:hi + R - d + 1], v, out=cand)
        np.greater(cand, best, out=better)
        np.copyto(best, cand, where=better)
        np.copyto(arg, i, where=better)
    return best, arg


def _solve_discrete(inst: DiscreteInstance) -> list[int]:
    """Exactly optimal option index per group for the integer instance."""
    cap = inst.capacity
    fronts = [_pareto(c, v, cap) for c, v in zip(inst.int_costs, inst.values)]
    sizes = [int(ds[-1]) for ds, _, _ in fronts]
    if sum(sizes) <= cap:  # everything fits: the best option of every group
        return [int(idx[-1]) for _, _, idx in fronts]
    f = np.zeros(cap + 1)  # no group yet: value 0 at any capacity
    before, after = 0, sum(sizes)
    trace = []
    for g in _ends_order(sizes):
        ds, vs, _ = fronts[g]
        after -= sizes[g]
        lo, hi = max(0, cap - after), min(cap, before + sizes[g])
        before += sizes[g]
        best, arg = _update(f, ds, vs, lo, hi)
        f = np.full(cap + 1, -np.inf)  # below lo: never read again
        f[lo:hi + 1] = best
        f[hi + 1:] = best[-1]  # above hi every option of every group so far fits
        trace.append((g, lo, hi, arg))
    chosen = [0] * len(fronts)
    w = cap
    for g, lo, hi, arg in reversed(trace):
        w = min(w, hi)
        i = int(arg[w - lo])
        ds, _, idx = fronts[g]
        chosen[g] = int(idx[i])
        w -= int(ds[i])
    return chosen


def _solution(inst_ids: list[str], ks, values, costs, chosen: list[int]) -> Solution:
    return Solution({gid: int(k[i]) for gid, k, i in zip(inst_ids, ks, chosen)},
                    math.fsum(float(v[i]) for v, i in zip(values, chosen)),
                    math.fsum(float(c[i]) for c, i in zip(costs, chosen)))


class ExactSolver:
    """The DP of :func:`_solve_discrete` on :func:`discretise`'s instance, then polished against
    the true costs; always truly within the budget. ``resolution`` = capacity units.

    What "exact" means: the DP is exactly optimal for the discretised instance (rounded-up integer
    costs), which may miss selections within ``len(groups)`` units of the budget. With ``polish``
    (the default) the solver then spends the budget that rounding left: it extends the groups'
    prefixes by the best value-per-ms extension that truly fits (:func:`_extend`), and returns the
    better of that and :class:`GreedySolver`'s solution (greedy runs on every solve and adds its
    time, a fraction of the DP's: see ``benchmarks/solver.py``). So the result is never worse than
    the DP's optimum on the discretised instance, never worse than greedy (by construction), and
    never over budget in the true float costs; it is not guaranteed optimal for the true costs.

    Measured relative gap to the optimum of the true, undiscretised costs (HiGHS MILP), on the 36
    random ResNet-50-sized instances of ``tests/test_solver.py`` (50-60 groups of 32-channel
    chunks, 2-64 per group; budgets at 30/50/70 % of the dense cost), resolution 8192: the DP alone
    mean 1.6e-4, max 3.6e-4 (it lost to greedy on some of them); polished mean 2.0e-5, max 1.5e-4;
    greedy mean 1.7e-3, max 6.1e-3.

    ``polish=False`` returns the DP's solution alone (what the tests compare with the MILP optimum
    of the discretised instance).
    """

    def __init__(self, resolution: int = 8192, polish: bool = True) -> None:
        if isinstance(resolution, bool) or not isinstance(resolution, (int, np.integer)) or resolution < 1:
            raise ValueError(f"resolution must be a positive integer, got {resolution!r}")
        self.resolution = int(resolution)
        self.polish = bool(polish)

    def solve(self, groups: list[GroupItems], budget: float) -> Solution:
        """Chunks to keep per group: maximum value with true cost <= ``budget``."""
        inst, chosen = self._solve_dp(groups, budget)
        if not self.polish:
            return _solution(inst.ids, inst.ks, inst.values, inst.costs, chosen)
        best = _extend(inst, chosen, _budget(budget))
        greedy = GreedySolver().solve(groups, budget)
        return greedy if greedy.value > best.value else best

    def _solve_dp(self, groups: list[GroupItems], budget: float) -> tuple[DiscreteInstance, list[int]]:
        """The discretised instance and the DP's option index per group (truly within budget)."""
        for margin in _MARGINS_ULPS:
            inst = discretise(groups, budget, self.resolution, margin)
            chosen = _solve_discrete(inst)
            if _solution(inst.ids, inst.ks, inst.values, inst.costs, chosen).cost <= budget:
                return inst, chosen
        # not reachable with a sane float margin; the floor selection always fits
        return inst, [int(np.argmin(c)) for c in inst.costs]  # pragma: no cover


def _extend(inst: DiscreteInstance, chosen: list[int], budget: float) -> Solution:
    """The selection ``chosen`` (option index per group of ``inst``, truly within ``budget``) with
    prefixes extended while the true budget allows.

    First every extension that costs nothing (it adds value or frees latency) is taken; then, in
    turn, the extension of any group to any longer prefix with the best value per ms among those
    that fit the budget left (a longer prefix sees through a latency cliff). Never lowers the
    value; the float running sum is checked exactly (``math.fsum``) at the end, as in greedy.
    """
    cvs, ccs = inst.values, inst.costs
    pos = list(chosen)
    total = _Total(math.fsum(float(cc[i]) for cc, i in zip(ccs, pos)))
    history: list[tuple[int, int]] = []  # (group, option before) of every extension
    n = len(pos)
    ulp = _EPS * (abs(budget) + math.fsum(float(np.abs(cc).max()) for cc in ccs)) if n else 0.0
    limit = budget + _FITS_ULPS * ulp  # generous by a few ulps: the exact check follows

    def take(g: int, j: int) -> None:
        history.append((g, pos[g]))
        total.add(float(ccs[g][j] - ccs[g][pos[g]]))
        pos[g] = j

    def free(g: int) -> int | None:  # the extension that adds the most value at no cost
        dv, dc = cvs[g][pos[g] + 1:] - cvs[g][pos[g]], ccs[g][pos[g] + 1:] - ccs[g][pos[g]]
        ok = np.flatnonzero((dc <= 0) & ((dv > 0) | (dc < 0)))
        if not len(ok):
            return None
        return pos[g] + 1 + int(ok[np.lexsort((dc[ok], -dv[ok]))[0]])

    def paid(g: int, room: float) -> tuple[float, int]:  # best value per ms that fits ``room``
        dv, dc = cvs[g][pos[g] + 1:] - cvs[g][pos[g]], ccs[g][pos[g] + 1:] - ccs[g][pos[g]]
        ok = np.flatnonzero((dc > 0) & (dv > 0) & (dc <= room))
        if not len(ok):
            return -1.0, -1
        ratio = dv[ok] / dc[ok]
        i = int(ok[np.flatnonzero(ratio == ratio.max())[-1]])  # ties: the longer extension
        return float(dv[i] / dc[i]), pos[g] + 1 + i

    changed = True
    while changed:  # free extensions may enable more free extensions
        changed = False
        for g in range(n):
            j = free(g)
            if j is not None:
                take(g, j)
                changed = True
    best = [paid(g, limit - total.value) for g in range(n)]
    while True:
        g = max(range(n), key=lambda h: best[h][0], default=None)
        if g is None or best[g][1] < 0:
            break
        take(g, best[g][1])
        room = limit - total.value
        j = free(g)  # never after a best-ratio extension, except through float ties
        if j is not None:
            take(g, j)
            best = [paid(h, limit - total.value) for h in range(n)]  # room grew
            continue
        best[g] = paid(g, room)
        for h in range(n):  # room only shrank: a best that still fits stays the best
            if best[h][1] >= 0 and ccs[h][best[h][1]] - ccs[h][pos[h]] > room:
                best[h] = paid(h, room)
    while True:  # the running sum is only a float estimate: undo extensions until truly feasible
        sol = _solution(inst.ids, inst.ks, cvs, ccs, pos)
        if sol.cost <= budget or not history:  # no history: the input, truly feasible
            return sol
        g, before = history.pop()
        pos[g] = before


class GreedySolver:
    """Value/cost ranking under the prefix constraint (the paper's solver ablation).

    Every group starts at its cheapest allowed width (the latency floor, so the result is feasible
    whenever the budget is); then chunks with cost <= 0 are taken as soon as they are next in their
    group, and the next chunks of all groups are ranked by value / cost. A chunk that does not fit
    closes its group (later chunks would need it).
    """

    def solve(self, groups: list[GroupItems], budget: float) -> Solution:
        """Chunks to keep per group, greedily by value per ms; true cost <= ``budget``."""
        budget = _budget(budget)
        opts = _options(groups)
        _floor(opts, budget)
        ids, ks, cvs, ccs = [g.id for g in groups], *([o[i] for o in opts] for i in range(3))
        kept = []
        for k, cv, cc in opts:  # cheapest option, the most valuable among ties
            cheapest = np.flatnonzero(cc == cc.min())
            kept.append(int(k[cheapest[np.argmax(cv[cheapest])]]))
        vals = [np.asarray(g.values, dtype=np.float64).tolist() for g in groups]
        costs = [np.asarray(g.costs, dtype=np.float64).tolist() for g in groups]
        total = _Total(math.fsum(float(cc[kp - k[0]]) for k, cc, kp in zip(ks, ccs, kept)))
        ulp = _EPS * (abs(budget) + math.fsum(float(np.abs(cc).max()) for cc in ccs)) if groups else 0.0
        limit = budget + _FITS_ULPS * ulp  # generous by a few ulps: the exact check follows
        heap: list[tuple[float, int]] = []
        history: list[tuple[int, int]] = []  # (group, kept before) of every paid step

        def advance(g: int) -> None:  # take the free chunks, then queue the next paid one
            while kept[g] < len(costs[g]) and costs[g][kept[g]] <= 0:
                total.add(costs[g][kept[g]])
                kept[g] += 1
            if kept[g] < len(costs[g]):
                heapq.heappush(heap, (-vals[g][kept[g]] / costs[g][kept[g]], g))

        for g in range(len(groups)):
            advance(g)
        while heap:
            _, g = heapq.heappop(heap)
            c = costs[g][kept[g]]
            if total.value + c <= limit:
                history.append((g, kept[g]))
                total.add(c)
                kept[g] += 1
                advance(g)
        while True:  # the running sum is only a float estimate: undo steps until truly feasible
            sol = _solution(ids, ks, cvs, ccs, [kp - int(k[0]) for kp, k in zip(kept, ks)])
            if sol.cost <= budget or not history:
                return sol
            g, before = history.pop()
            kept[g] = before


class _Total:
    """A running float sum with Neumaier's error compensation (no drift over 10^5 additions)."""

    def __init__(self, start: float = 0.0) -> None:
        self.sum, self.comp = start, 0.0

    def add(self, x: float) -> None:
        t = self.sum + x
        self.comp += (self.sum - t) + x if abs(self.sum) >= abs(x) else (x - t) + self.sum
        self.sum = t

    @property
    def value(self) -> float:
        return self.sum + self.comp


SOLVERS: dict[str, type] = {"exact": ExactSolver, "greedy": GreedySolver}


def get_solver(name: str, **kwargs) -> Solver:
    """A solver by name (``exact`` or ``greedy``); ``kwargs`` go to its constructor."""
    try:
        cls = SOLVERS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown solver {name!r}; valid names: {', '.join(sorted(SOLVERS))}") from None
    return cls(**kwargs)
