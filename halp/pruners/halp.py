"""The HALP pruner: prune while training, toward a latency target, with a knapsack per step.

A training loop calls two hooks::

    loss.backward(); pruner.after_backward()      # accumulate saliency
    optimizer.step(); pruner.after_step(optimizer)  # prune if due; re-apply masks

Every ``interval`` iterations from ``start``, for ``steps`` steps, the pruner takes the mean
saliency since the last step, sorts each group's active channels by it, cuts them into chunks of
``chunk`` channels counted from the least important (so widths stay on the latency table's grid),
prices every chunk with the cost model at the current widths, and lets the solver keep, per group,
a prefix of the importance order that fits the step's latency target
``L_t = L_0^(1 - t/T) · L_T^(t/T)`` with ``L_T = target · L_0``. If the cost model (which
prices groups at the current widths of the others) says the result is still above the target, the
budget is tightened by the excess and the step re-solved. Pruned channels never return.
Its state (counters, saliency sums, masks, log) is part of a checkpoint.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from ..graph import ChannelGraph
from ..latency.cost import CostModel
from ..saliency import Saliency, SaliencyKind
from ..solver import SOLVERS, GroupItems, InfeasibleTarget, get_solver
from .base import PruneConfig, Pruner, PrunerContext, StepLog
from .registry import register_pruner

__all__ = ["HalpConfig", "HalpPruner", "PruneConfig", "StepLog"]


@dataclass
class HalpConfig:
    """HALP's own knobs: ``solver`` (``exact`` knapsack or ``greedy``, the paper's ablation),
    ``saliency`` (``taylor_bn``, the paper's; ``taylor_bn_sq``, ``l1``, ``l2``) and
    ``max_resolve`` (how often a step may tighten its budget when cross-group effects push the
    prediction over the target)."""

    solver: str = "exact"
    saliency: str = "taylor_bn"
    max_resolve: int = 8

    def __post_init__(self) -> None:
        SaliencyKind(self.saliency)
        if self.solver not in SOLVERS:
            raise ValueError(f"unknown solver {self.solver!r}; choose one of {', '.join(sorted(SOLVERS))}")
        if self.max_resolve < 0:
            raise ValueError(f"max_resolve must be >= 0, got {self.max_resolve}")


@register_pruner("halp", HalpConfig, label="HALP")
class HalpPruner(Pruner):
    """Latency-constrained channel pruning driven by a cost model (one per model and device)."""

    def __init__(self, graph: ChannelGraph, cost: CostModel, config: PruneConfig,
                 method_cfg: HalpConfig | None = None, context: PrunerContext | None = None,
                 chunk_sizes: dict[str, int] | None = None) -> None:
        super().__init__(graph, cost, config, chunk_sizes, context=context)
        self.hcfg = method_cfg or HalpConfig()
        self.saliency = Saliency(graph, self.groups, self.hcfg.saliency)
        self.solver = get_solver(self.hcfg.solver)

    def accumulate(self) -> None:
        self.saliency.accumulate()

    # ------------------------------------------------------------------ one step
    def _items(self, scores: dict[str, torch.Tensor], widths: dict[str, int]
               ) -> tuple[list[GroupItems], dict[str, list[torch.Tensor]], float]:
        items, order, kept_cost = [], {}, 0.0
        for g in self.groups:
            pieces = self.pieces(g.id, scores[g.id])
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
        widths = self.widths()
        target = self.target_ms(self.step + 1)
        items, order, items_cost = self._items(scores, widths)
        fixed = self.cost.total_ms(widths) - items_cost  # latency not decided by this step
        budget = target - fixed
        keep = dict(self.masks)
        floor = sum(_cheapest(it) for it in items)  # every group at its minimum: the solver's floor
        budget = max(budget, floor)  # an unreachable step target: go as low as allowed
        resolves = 0
        for resolves in range(self.hcfg.max_resolve + 1):
            try:
                sol = self.solver.solve(items, budget)
            except InfeasibleTarget as e:  # our floor and the solver's differ in the last bits
                budget = float(np.nextafter(e.floor, np.inf))
                sol = self.solver.solve(items, budget)
            new_keep = dict(keep)
            for gid, k in sol.keep.items():
                m = torch.zeros_like(keep[gid])
                for piece in order[gid][:k]:
                    m[piece] = True
                new_keep[gid] = m
            new_widths = {gid: int(m.sum()) for gid, m in new_keep.items()}
            predicted = self.cost.total_ms(new_widths)
            if predicted <= target * (1 + 1e-9) or budget <= floor:
                break
            # the per-group prices missed cross-group effects: tighten the budget by the excess
            budget = max(floor, budget - (predicted - target))
        removed = sum(int(keep[g].sum()) - w for g, w in new_widths.items())
        self.set_masks(new_keep)
        self.saliency.reset()
        return self.record(target, predicted, removed, resolves)

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
