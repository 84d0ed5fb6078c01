"""The HALP pruner: prune while training, toward a latency target, with a knapsack per step.

A training loop calls two hooks::

    loss.backward(); pruner.after_backward()      # accumulate saliency
    optimizer.step(); pruner.after_step(optimizer)  # prune if due; re-apply masks

Every ``interval`` iterations from ``start``, for ``steps`` steps, the pruner takes the mean
saliency since the last step, sorts each group's active channels by it, cuts them into chunks of
``chunk`` channels counted from the least important (so widths stay on the latency table's grid),
prices every chunk with the cost model at the current widths, and lets the solver keep, per group,
a prefix of the importance order that fits the step's latency target
``L_t = L_0^(1 - t/T) · L_T^(t/T)`` with ``L_T = target · L_0``. Chunk prices are exact for one
group at a time, but groups interact (a reader's c_in is another group's width), so the budget
handed to the solver is searched in both directions (bisection) until the cost model's total lands
in ``[L_t·(1 − budget_tolerance), L_t]``, where the chunk grid allows: the step uses its budget
instead of leaving it. Local passes (:mod:`.repair`) then fill what the grid left, swap chunks
between groups while that raises the kept importance, and on the last step also trade importance
for budget use until the total is within the tolerance. With ``lookahead``, an intermediate step
that would leave a state from which the final budget cannot be met waits instead (its log entry
removes nothing and stays over its target). Pruned channels never return.
With measured feedback (``pruner.feedback``, :mod:`halp.latency.feedback`), the last step times the
network it chose against the dense one and solves again at a price the measurements aim (a
secant on the table's prices), until the measured latency is within the feedback's tolerance below
the target (at most ``max_rounds`` measurements). Where the solver's answers jump across that
window (two structures the table misprices against each other), it narrows the network measured
closest over the target instead, by chunks and keeping its structure (or, where no narrowing is
priced in between, widens the one measured closest under it by one chunk). The most valuable
measured choice inside the window is kept, else the one measured closest under the target, and the
cost model is made to pass through the measurements.
Its state (counters, saliency sums, masks, log) is part of a checkpoint.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch

from ..graph import ChannelGraph
from ..latency.cost import CostModel
from ..saliency import Saliency, SaliencyKind
from ..solver import SOLVERS, GroupItems, InfeasibleTarget, get_solver
from .base import PruneConfig, Pruner, PrunerContext, StepLog
from .registry import register_pruner
from .repair import Attempt, exchange, fill, narrower, trim, trim_path, wider

__all__ = ["HalpConfig", "HalpPruner", "PruneConfig", "StepLog"]


@dataclass
class HalpConfig:
    """HALP's own knobs: ``solver`` (``exact`` knapsack or ``greedy``, the paper's ablation),
    ``saliency`` (``taylor_bn``, the paper's; ``taylor_bn_sq``, ``l1``, ``l2``),
    ``budget_tolerance`` (a step is done when its predicted latency is within this fraction below
    its target), ``max_resolve`` (the most extra solver calls a step makes searching its budget)
    and ``lookahead`` (an intermediate step waits rather than leave a state from which the final
    budget can no longer be met within the tolerance)."""

    solver: str = "exact"
    saliency: str = "taylor_bn"
    max_resolve: int = 8
    budget_tolerance: float = 0.005
    lookahead: bool = True

    def __post_init__(self) -> None:
        SaliencyKind(self.saliency)
        if self.solver not in SOLVERS:
            raise ValueError(f"unknown solver {self.solver!r}; choose one of {', '.join(sorted(SOLVERS))}")
        if self.max_resolve < 0:
            raise ValueError(f"max_resolve must be >= 0, got {self.max_resolve}")
        if not 0 <= self.budget_tolerance < 1:
            raise ValueError(f"budget_tolerance must be in [0, 1), got {self.budget_tolerance}")


@register_pruner("halp", HalpConfig, label="HALP")
class HalpPruner(Pruner):
    """Latency-constrained channel pruning driven by a cost model (one per model and device)."""

    uses_feedback = True

    def __init__(self, graph: ChannelGraph, cost: CostModel, config: PruneConfig,
                 method_cfg: HalpConfig | None = None, context: PrunerContext | None = None,
                 chunk_sizes: dict[str, int] | None = None) -> None:
        super().__init__(graph, cost, config, chunk_sizes, context=context)
        self.hcfg = method_cfg or HalpConfig()
        self.saliency = Saliency(graph, self.groups, self.hcfg.saliency)
        self.solver = get_solver(self.hcfg.solver)

    def accumulate(self) -> None:
        self.saliency.accumulate()

    def ready(self) -> bool:
        return self.saliency.ready

    # ------------------------------------------------------------------ one step
    def _items(self, scores: dict[str, torch.Tensor], keep: dict[str, torch.Tensor], widths: dict[str, int]
               ) -> tuple[list[GroupItems], dict[str, list[torch.Tensor]], float]:
        items, order, kept_cost = [], {}, 0.0
        for g in self.groups:
            pieces = self.pieces(g.id, scores[g.id], keep[g.id])
            if not pieces:
                continue
            values = np.array([float(scores[g.id][p].sum()) for p in pieces])
            costs = self.cost.chunk_costs(g.id, widths, self.chunks[g.id])
            # chunk_costs[i] prices going from n - chunk*i down: index 0 = least important piece
            assert len(costs) == len(pieces), (g.id, len(costs), len(pieces))
            need = min(self.min_keep(g), sum(len(p) for p in pieces))
            kept_top, min_keep = 0, 0
            for p in pieces[::-1]:
                if kept_top >= need:
                    break
                kept_top += len(p)
                min_keep += 1
            items.append(GroupItems(g.id, values[::-1].copy(), costs[::-1].copy(), min_keep))
            order[g.id] = pieces[::-1]
            kept_cost += float(costs.sum())
        return items, order, kept_cost

    def prune_step(self) -> StepLog:
        """Run one pruning step now (normally called by :meth:`after_step`)."""
        scores = self.saliency.scores()
        keep = dict(self.masks)
        target = self.target_ms(self.step + 1)
        last = self.step + 1 >= self.cfg.steps
        chosen, resolves = self._solve(scores, keep, target, last)
        if not last and self.hcfg.lookahead and not self._reaches_final(scores, chosen):
            # the final budget could no longer be met (say, a whole branch went and only coarse
            # chunks are left): this step waits if that keeps it reachable; a later one, with more
            # to choose from, prunes instead
            current = Attempt(self.predicted_ms(), 0.0, keep, self.widths(), {})
            if current.predicted > chosen.predicted and self._reaches_final(scores, current):
                chosen = current
        measured, rounds, trials = None, 0, []
        if last and self.feedback is not None:
            chosen, measured, trials = self._close_loop(scores, keep, target, chosen)
            rounds = len(trials)
        removed = sum(int(keep[g].sum()) - w for g, w in chosen.widths.items())
        self.set_masks(chosen.keep)
        self.saliency.reset()
        return self.record(target, chosen.predicted, removed, resolves, measured, rounds, trials)

    def _close_loop(self, scores: dict[str, torch.Tensor], keep: dict[str, torch.Tensor], target: float,
                    chosen: Attempt) -> tuple[Attempt, float, list[dict]]:
        """Measure ``chosen``, then choose again at prices aimed by the measurements so far, until
        a measurement lands in the accepted window. Returns the most valuable measured choice inside
        the window (else the one measured closest under ``target``, else the fastest measured), its
        measurement, and every trial (the table's price, the measured latency, the widths, which
        search proposed it). The cost model is then made to pass through every measurement, the
        returned one last, so its prediction is what was measured.

        The solver's answers can change structure (which branches exist) between two nearby
        prices, and the table can misprice one structure against another by more than the window
        is wide: its timings then jump across the window. When the solver has nothing new between
        the closest networks measured under and over the target, or their measured ÷ priced
        differ by more than the window, the search times narrowings of the network measured
        closest over the target instead (same structure, fewer channels:
        :meth:`_narrowings`), each priced where the timings so far aim, and where none is priced
        in between, one-chunk widenings of the network measured closest under the target.
        """
        fb = self.feedback
        tried: list[tuple[Attempt, float, str]] = []
        mid = target * (1 - fb.tolerance / 2)  # aim inside the window, not at its edge
        # The search runs on the table's price of each timed network: the measured latency is
        # about a smooth function of it, while the solver's budget maps to prices by steps.
        narrowings: tuple[list[Attempt], Callable[[Attempt], list[Attempt]]] | None = None
        source = "solver"
        for r in range(fb.max_rounds):
            obs = fb.ratio(self.graph, chosen.widths) * self.dense_ms
            tried.append((chosen, obs, source))
            if fb.accepts(obs, target) or r + 1 == fb.max_rounds:
                break
            again = None if narrowings is not None else self._solver_next(scores, keep, tried, mid, target,
                                                                           fb.tolerance)
            if again is None and narrowings is None:
                narrowings = self._narrowings(scores, keep, tried, target, mid)
            if narrowings is not None:
                again, source = _narrowing_next(*narrowings, tried, target, mid)
            if again is None:  # nothing untimed left between what measured under and over
                break
            chosen = again
        # the budget is spent first: the most valuable network measured inside the window; else
        # the one measured closest under the target (a more valuable one further under leaves the
        # budget unused, the miss this loop exists to close); else the fastest measured
        accepted = [t for t in tried if fb.accepts(t[1], target)]
        fitting = [t for t in tried if t[1] <= target * (1 + 1e-9)]
        if accepted:
            best = max(accepted, key=lambda t: (t[0].value, t[1]))
        elif fitting:
            best = max(fitting, key=lambda t: (t[1], t[0].value))
        else:
            best = min(tried, key=lambda t: t[1])
        for a, m, _ in [t for t in tried if t is not best] + [best]:
            try:
                self.observe(a.widths, m)
            except ValueError:  # measured as slow as the dense network (noise at a target near 1)
                pass
        trials = [{"predicted_ms": a.predicted, "measured_ms": m, "search": how, "widths": dict(a.widths)}
                  for a, m, how in tried]
        return replace(best[0], predicted=self.cost.total_ms(best[0].widths)), best[1], trials

    def _solver_next(self, scores: dict[str, torch.Tensor], keep: dict[str, torch.Tensor],
                     tried: list[tuple[Attempt, float, str]], mid: float, target: float, tolerance: float
                     ) -> Attempt | None:
        """The solver's next untimed network, at a price aimed by the measurements: scaled by the
        last miss until one measured under and one over, then by a secant between the closest
        such pair. None when the solver has nothing untimed there, or the pair is misordered or
        across a cliff (their measured ÷ priced differ by more than ``tolerance``)."""
        under = max(((a.predicted, m) for a, m, _ in tried if m <= target * (1 + 1e-9)), default=None)
        over = min(((a.predicted, m) for a, m, _ in tried if m > target * (1 + 1e-9)), default=None)
        price, obs = tried[-1][0].predicted, tried[-1][1]
        if under is not None and over is not None:
            (p0, m0), (p1, m1) = under, over
            if p1 <= p0 or (m1 / p1) / (m0 / p0) > 1 + tolerance:
                # a pricier network measured faster, or the two differ in measured ms per priced ms
                # by more than the window is wide: the table misprices one against the other (two
                # structures, a cliff), and a secant between them only creeps along one side
                return None
            # secant between the bracketing prices, kept off their ends
            aim = p0 + min(max((mid - m0) / (m1 - m0), 0.1), 0.9) * (p1 - p0)
        else:  # latency is about proportional to the price near it: scale by the miss
            aim = price * mid / obs
        seen = [t[0].widths for t in tried]
        for _ in range(6):  # step on while the solver answers with a network already timed
            candidate = self._solve(scores, keep, aim, True)[0]
            if candidate.widths not in seen:
                return candidate
            # nothing new priced at most ``aim`` above what was timed: look further that way
            aim = 0.5 * (aim + over[0]) if under is not None and over is not None else aim * mid / obs
        return None

    def _narrowings(self, scores: dict[str, torch.Tensor], keep: dict[str, torch.Tensor],
                    tried: list[tuple[Attempt, float, str]], target: float, mid: float
                    ) -> tuple[list[Attempt], Callable[[Attempt], list[Attempt]]] | None:
        """Networks of the structure of the one measured closest over ``target`` (None if none
        did), narrower than it: its :func:`~.repair.trim_path`, long enough to reach a price that
        would measure well under the window, and every one-chunk narrowing of each network on it
        (:func:`~.repair.narrower`), none emptying a group it keeps; and the function that lists a
        network's one-chunk widenings (:func:`~.repair.wider`) at the same step."""
        over = [t for t in tried if t[1] > target * (1 + 1e-9)]
        if not over:
            return None
        start, ms, _ = min(over, key=lambda t: t[1])
        widths = {gid: int(m.sum()) for gid, m in keep.items()}
        items, order, _ = self._items(scores, keep, widths)
        values = {it.id: it.values for it in items}
        floor = {it.id: max(it.min_keep, 1 if start.kept.get(it.id, 0) > 0 else 0) for it in items}
        path = trim_path(self.cost, start, values, floor, order, 0.9 * start.predicted * mid / ms)
        found: dict[tuple, Attempt] = {}
        for a in path:
            for b in [a, *narrower(self.cost, a, values, floor, order)]:
                found.setdefault(_key(b.widths), b)
        return list(found.values()), lambda a: wider(self.cost, a, values, order)

    def _reaches_final(self, scores: dict[str, torch.Tensor], a: Attempt) -> bool:
        """Whether a final step from ``a`` (same scores) lands within the tolerance of the final budget."""
        final = self.final_target_ms
        if a.predicted < final * (1 - self.hcfg.budget_tolerance):
            return False
        return self._solve(scores, a.keep, final, True)[0].predicted >= final * (1 - self.hcfg.budget_tolerance)

    def _solve(self, scores: dict[str, torch.Tensor], keep: dict[str, torch.Tensor], target: float,
               last: bool) -> tuple[Attempt, int]:
        """The most valuable masks within ``target`` from ``keep`` (prefixes of the importance
        order), found by budget bisection, then repaired (:mod:`.repair`); on the ``last`` step
        importance is also traded for budget use. Returns the answer and the extra solver calls."""
        widths = {gid: int(m.sum()) for gid, m in keep.items()}
        items, order, items_cost = self._items(scores, keep, widths)
        fixed = self.cost.total_ms(widths) - items_cost  # latency not decided by this step
        floor = sum(_cheapest(it) for it in items)  # every group at its minimum: the solver's floor
        ceiling = items_cost  # every active channel kept
        ok = target * (1 + 1e-9)
        enough = target * (1 - self.hcfg.budget_tolerance)

        def attempt(budget: float) -> Attempt:
            try:
                sol = self.solver.solve(items, budget)
            except InfeasibleTarget as e:  # our floor and the solver's differ in the last bits
                sol = self.solver.solve(items, float(np.nextafter(e.floor, np.inf)))
            new_keep = dict(keep)
            for gid, k in sol.keep.items():
                m = torch.zeros_like(keep[gid])
                for piece in order[gid][:k]:
                    m[piece] = True
                new_keep[gid] = m
            new_widths = {gid: int(m.sum()) for gid, m in new_keep.items()}
            return Attempt(self.cost.total_ms(new_widths), sol.value, new_keep, new_widths, dict(sol.keep))

        # bisection on the solver's budget between one that fits the target and one that does not
        budget = min(max(target - fixed, floor), ceiling)
        fits: float | None = None
        over: float | None = None
        best: Attempt | None = None     # the most valuable attempt within the target
        lowest: Attempt | None = None   # the fallback when the target cannot be reached
        calls = 0
        for calls in range(1, self.hcfg.max_resolve + 2):
            a = attempt(budget)
            if lowest is None or a.predicted < lowest.predicted:
                lowest = a
            if a.predicted <= ok:
                if best is None or (a.value, a.predicted) > (best.value, best.predicted):
                    best = a
                fits = budget if fits is None else max(fits, budget)
                if a.predicted >= enough or budget >= ceiling:
                    break
            else:
                over = budget if over is None else min(over, budget)
                if budget <= floor:
                    break
            if fits is not None and over is not None:
                if over - fits <= 1e-3 * target:  # finer budgets than 0.1 % of the target buy nothing
                    break
                budget = 0.5 * (fits + over)
            elif fits is not None:  # spend the budget left: grow by the gap to the target
                budget = min(ceiling, budget + max(target - a.predicted, 1e-6 * target))
            else:  # cross-group effects pushed the prediction over: tighten by the excess, then faster
                budget = max(floor, budget - (a.predicted - target) * 2 ** (calls - 1))
        values = {it.id: it.values for it in items}
        mins = {it.id: it.min_keep for it in items}
        chosen = best if best is not None else trim(self.cost, lowest, values, mins, order, ok)
        if chosen.predicted <= ok:
            if chosen.predicted < enough:
                chosen = fill(self.cost, chosen, values, order, ok)
            chosen = exchange(self.cost, chosen, values, mins, order, ok, enough if last else 0.0)
        return chosen, calls - 1

    # ------------------------------------------------------------------ checkpoint
    def config_state(self) -> dict:
        return {**asdict(self.cfg), **asdict(self.hcfg)}

    def extra_state(self) -> dict:
        return {"saliency": self.saliency.state_dict()}

    def load_extra_state(self, state: dict) -> None:
        self.saliency.load_state_dict(state["saliency"])


def _cheapest(items: GroupItems) -> float:
    """Lowest cumulative cost a group may take (it keeps at least ``min_keep`` chunks)."""
    cum = np.concatenate([[0.0], np.cumsum(items.costs)])
    return float(cum[items.min_keep:].min())


def _narrowing_next(candidates: list[Attempt], widen: Callable[[Attempt], list[Attempt]],
                    tried: list[tuple[Attempt, float, str]], target: float, mid: float
                    ) -> tuple[Attempt | None, str]:
    """The next network to time once the solver's answers jumped across the window, and how it
    was found (``trim``: a narrowing; ``widen``: a widening).

    First the untimed one of ``candidates`` (narrowings of one network measured over ``target``,
    :meth:`HalpPruner._narrowings`) priced nearest the price that the timed ones of that structure
    aim at ``mid``, strictly between the cheapest measured over ``target`` and the priciest
    cheaper one measured under it (a secant through their measurements; with none under yet, the
    miss's scale). When no candidate is priced in between (within one structure, too, the table
    misprices some widths by more than the window), the untimed one-chunk widening (``widen``)
    of the network measured closest under the target priced nearest its scaled aim: from a
    timing just under the window, one small chunk more usually lands in it. None when neither
    exists."""
    timed = {_key(a.widths) for a, _, _ in tried}
    empty = {g for g, w in candidates[0].widths.items() if w == 0}  # the first is the network narrowed
    family = [(a.predicted, m) for a, m, _ in tried if {g for g, w in a.widths.items() if w == 0} == empty]
    p_hi, m_hi = min((p, m) for p, m in family if m > target * (1 + 1e-9))
    p_lo, m_lo = max(((p, m) for p, m in family if m <= target * (1 + 1e-9) and p < p_hi), default=(None, None))
    if p_lo is None:
        aim = p_hi * mid / m_hi
    else:
        aim = p_lo + (mid - m_lo) / (m_hi - m_lo) * (p_hi - p_lo) if m_hi > m_lo else 0.5 * (p_lo + p_hi)
    between = [a for a in candidates if _key(a.widths) not in timed
               and a.predicted < p_hi and (p_lo is None or a.predicted > p_lo)]
    if between:
        return min(between, key=lambda a: (abs(a.predicted - aim), -a.value)), "trim"
    under = [t for t in tried if t[1] <= target * (1 + 1e-9)]
    if not under:
        return None, "widen"
    closest, m_u, _ = max(under, key=lambda t: t[1])
    aim = closest.predicted * mid / m_u
    wider_ = [a for a in widen(closest) if _key(a.widths) not in timed]
    return (min(wider_, key=lambda a: (abs(a.predicted - aim), -a.value)) if wider_ else None), "widen"


def _key(widths: dict[str, int]) -> tuple:
    return tuple(sorted(widths.items()))
