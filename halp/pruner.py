"""The HALP pruner: prune while training, toward a latency target, with a knapsack per step.

A training loop calls two hooks::

    loss.backward(); pruner.after_backward()      # accumulate saliency
    optimizer.step(); pruner.after_step(optimizer)  # prune if due; re-apply masks

Every ``interval`` iterations from ``start``, for ``steps`` steps, the pruner takes the mean
saliency since the last step, sorts each group's active channels by it, cuts them into chunks of
``chunk`` channels counted from the least important (so widths stay on the latency table's grid),
prices every chunk with the cost model at the current widths, and lets the solver keep, per group,
a prefix of the importance order that fits the step's latency target
``L_t = L_0^(1 - t/T) · L_T^(t/T)`` with ``L_T = target_ratio · L_0``. If the cost model (which
prices groups at the current widths of the others) says the result is still above the target, the
budget is tightened by the excess and the step re-solved. Pruned channels never return.
Its state (counters, saliency sums, masks, log) is part of a checkpoint.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from .graph import ChannelGraph, ChannelGroup
from .latency.cost import CostModel
from .masks import ChannelMasks, MaskApplier
from .saliency import Saliency, SaliencyKind
from .solver import GroupItems, InfeasibleTarget, get_solver


@dataclass
class PruneConfig:
    """HALP's knobs. ``chunk``: channels per knapsack item, "auto" = from the latency table's
    staircase (see ``halp.latency.quality.chunk_sizes``) or a fixed number."""

    target_ratio: float = 0.5
    start: int = 0
    interval: int = 40
    steps: int = 30
    chunk: int | str = "auto"
    solver: str = "exact"
    saliency: str = "taylor_bn"
    min_width: int = 1
    min_fraction: float = 0.0
    prune_stem: bool = False
    allow_vanish: bool = False
    max_resolve: int = 8

    def __post_init__(self) -> None:
        if not 0 < self.target_ratio <= 1:
            raise ValueError(f"target ratio must be in (0, 1] (a fraction of the dense latency), got {self.target_ratio}")
        if self.interval < 1 or self.steps < 1 or self.start < 0:
            raise ValueError("prune interval and steps must be >= 1 and start >= 0")
        if isinstance(self.chunk, str) and self.chunk != "auto":
            raise ValueError(f"chunk must be a positive integer or 'auto', got {self.chunk!r}")
        if isinstance(self.chunk, int) and self.chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {self.chunk}")
        if not 0 <= self.min_fraction < 1:
            raise ValueError(f"min_fraction must be in [0, 1), got {self.min_fraction}")
        SaliencyKind(self.saliency)

    @property
    def end(self) -> int:
        """Iteration after which pruning is over."""
        return self.start + self.steps * self.interval


@dataclass
class StepLog:
    step: int
    iteration: int
    target_ms: float
    predicted_ms: float
    removed: int
    widths: dict[str, int] = field(default_factory=dict)
    resolves: int = 0


class HalpPruner:
    """Latency-constrained channel pruning driven by a cost model (one per model and device)."""

    def __init__(self, graph: ChannelGraph, cost: CostModel, config: PruneConfig,
                 chunk_sizes: dict[str, int] | None = None) -> None:
        self.graph = graph
        self.cost = cost
        self.cfg = config
        self.groups: list[ChannelGroup] = [g for g in graph.prunable_groups(include_stem=config.prune_stem)]
        if not self.groups:
            raise ValueError("the model has no prunable channel group")
        if isinstance(config.chunk, int):
            self.chunks = {g.id: min(config.chunk, g.width) for g in self.groups}
        else:
            if chunk_sizes is None:
                from .latency.quality import chunk_sizes as derive
                chunk_sizes = derive(graph, cost.table, cost=cost)
            self.chunks = {g.id: int(chunk_sizes[g.id]) for g in self.groups}
        self.saliency = Saliency(graph, self.groups, config.saliency)
        self.solver = get_solver(config.solver)
        self.masks = ChannelMasks.full(graph)
        self.applier = MaskApplier(graph, self.masks)
        self.iteration = 0
        self.step = 0
        self.dense_ms = cost.total_ms(graph.full_widths())
        self.log: list[StepLog] = []
        floor = self.floor_ms()
        if floor > self.target_ms(config.steps):
            raise ValueError(
                f"latency target {config.target_ratio:.0%} of dense ({self.target_ms(config.steps):.3f} ms "
                f"predicted) is below the latency floor {floor:.3f} ms = {floor / self.dense_ms:.0%} of "
                f"dense (every prunable group at its minimum width); raise the target or lower min_width")

    def floor_ms(self) -> float:
        """Predicted latency with every prunable group at its smallest allowed width."""
        widths = self.graph.full_widths()
        for g in self.groups:
            need, c = self._min_keep(g), self.chunks[g.id]
            widths[g.id] = g.width - c * ((g.width - need) // c) if need > 0 else 0
        return self.cost.total_ms(widths)

    # ------------------------------------------------------------------ schedule
    def target_ms(self, t: int) -> float:
        """Latency target after pruning step ``t`` of ``steps`` (geometric)."""
        final = self.cfg.target_ratio * self.dense_ms
        f = t / self.cfg.steps
        return self.dense_ms ** (1 - f) * final ** f

    @property
    def active(self) -> bool:
        return self.cfg.start <= self.iteration < self.cfg.end and self.step < self.cfg.steps

    @property
    def done(self) -> bool:
        return self.step >= self.cfg.steps

    def widths(self) -> dict[str, int]:
        return self.masks.widths()

    def predicted_ms(self) -> float:
        return self.cost.total_ms(self.widths())

    # ------------------------------------------------------------------ hooks
    def after_backward(self) -> None:
        if self.active:
            self.saliency.accumulate()

    def after_step(self, optimizer: torch.optim.Optimizer | None = None) -> StepLog | None:
        """Count the iteration, prune if due, and keep pruned channels at zero."""
        entry = None
        if self.active and (self.iteration + 1 - self.cfg.start) % self.cfg.interval == 0:
            entry = self.prune_step()
        self.iteration += 1
        self.applier.apply()
        if optimizer is not None:
            self.applier.clear_optimizer_state(optimizer)
        return entry

    # ------------------------------------------------------------------ one step
    def _min_keep(self, g: ChannelGroup) -> int:
        if self.cfg.allow_vanish and g.can_vanish:
            return 0
        return max(1, self.cfg.min_width, math.ceil(self.cfg.min_fraction * g.width))

    def _items(self, scores: dict[str, torch.Tensor], widths: dict[str, int]
               ) -> tuple[list[GroupItems], dict[str, list[torch.Tensor]], float]:
        items, order, kept_cost = [], {}, 0.0
        for g in self.groups:
            active = torch.nonzero(self.masks[g.id]).flatten()
            n = active.numel()
            if n == 0:
                continue
            chunk = self.chunks[g.id]
            # least important first; ties broken by channel index so the order is deterministic
            s = scores[g.id][active]
            rank = sorted(range(n), key=lambda i: (float(s[i]), int(active[i])))
            ranked = active[rank]
            pieces = [ranked[i:i + chunk] for i in range(0, n - n % chunk if n % chunk else n, chunk)]
            if n % chunk:
                pieces.append(ranked[n - n % chunk:])  # the partial chunk is the most important
            values = np.array([float(scores[g.id][p].sum()) for p in pieces])
            costs = self.cost.chunk_costs(g.id, widths, chunk)
            # chunk_costs[i] prices going from n - chunk*i down: index 0 = least important piece
            assert len(costs) == len(pieces), (g.id, len(costs), len(pieces))
            sizes = np.array([len(p) for p in pieces])
            need = self._min_keep(g)
            kept_top, min_keep = 0, 0
            for size in sizes[::-1]:
                if kept_top >= min(need, n):
                    break
                kept_top += int(size)
                min_keep += 1
            items.append(GroupItems(g.id, values[::-1].copy(), costs[::-1].copy(), min_keep))
            order[g.id] = pieces[::-1]
            kept_cost += float(costs.sum())
        return items, order, kept_cost

    def prune_step(self) -> StepLog:
        """Run one pruning step now (normally called by :meth:`after_step`)."""
        scores = self.saliency.scores()
        widths = self.widths()
        t = self.step + 1
        target = self.target_ms(t)
        items, order, items_cost = self._items(scores, widths)
        fixed = self.cost.total_ms(widths) - items_cost  # latency not decided by this step
        budget = target - fixed
        keep = dict(self.masks)
        floor = sum(_cheapest(it) for it in items)  # every group at its minimum: the solver's floor
        budget = max(budget, floor)  # an unreachable step target: go as low as allowed
        resolves = 0
        for resolves in range(self.cfg.max_resolve + 1):
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
        self.masks = ChannelMasks(new_keep)
        self.applier = MaskApplier(self.graph, self.masks)
        self.applier.apply()
        self.saliency.reset()
        self.step = t
        entry = StepLog(t, self.iteration, target, predicted, removed, new_widths, resolves)
        self.log.append(entry)
        return entry

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict:
        return {"iteration": self.iteration, "step": self.step,
                "masks": {k: v.clone() for k, v in self.masks.items()},
                "saliency": self.saliency.state_dict(), "log": [asdict(e) for e in self.log],
                "config": asdict(self.cfg), "chunks": dict(self.chunks), "dense_ms": self.dense_ms}

    def load_state_dict(self, state: dict) -> None:
        if state["config"] != asdict(self.cfg):
            raise ValueError("checkpoint was made with other pruning settings; use the same config to resume")
        self.iteration = int(state["iteration"])
        self.step = int(state["step"])
        self.masks = ChannelMasks(state["masks"])
        self.applier = MaskApplier(self.graph, self.masks)
        self.saliency.load_state_dict(state["saliency"])
        self.log = [StepLog(**e) for e in state["log"]]
        self.chunks = dict(state["chunks"])
        self.dense_ms = float(state["dense_ms"])


def _cheapest(items: GroupItems) -> float:
    """Lowest cumulative cost a group may take (it keeps at least ``min_keep`` chunks)."""
    cum = np.concatenate([[0.0], np.cumsum(items.costs)])
    return float(cum[items.min_keep:].min())
