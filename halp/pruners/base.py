"""What every pruner shares: the latency budget, the schedule, masks, training hooks and state.

HALP (``halp.pruners.halp``) and the baselines (``baselines/``) are subclasses of :class:`Pruner`. The
training loop sees only the interface::

    pruner.setup(model, train_set, holdout)          # once, before training (one-shot methods prune here)
    loss.backward(); pruner.after_backward()         # gradient-based criteria accumulate
    optimizer.step(); pruner.after_step(optimizer)   # prune if due; keep pruned channels at zero

A subclass implements :meth:`Pruner.prune_step` (and, if it needs gradients, :meth:`accumulate`).
The budget is always a fraction ``target`` of the dense latency predicted by the cost model, so a
sweep can vary the method and the target and nothing else.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import nn
from torch.utils.data import Dataset

from ..graph import ChannelGraph, ChannelGroup
from ..latency.cost import CostModel
from ..masks import ChannelMasks, MaskApplier


@dataclass
class PruneConfig:
    """The budget and schedule, shared by every method (each method's own knobs are its config).

    ``target``: fraction of the dense latency to keep. ``start``/``interval``/``steps``: prune every
    ``interval`` iterations from ``start``, ``steps`` times. ``chunk``: channels per pruning unit,
    "auto" = from the latency table's staircase (``halp.latency.quality.chunk_sizes``) or a number.
    ``min_width``/``min_fraction``: the least a group keeps; ``allow_vanish`` lets a residual
    branch go to zero channels."""

    target: float = 0.5
    start: int = 0
    interval: int = 40
    steps: int = 30
    chunk: int | str = "auto"
    min_width: int = 1
    min_fraction: float = 0.0
    prune_stem: bool = False
    allow_vanish: bool = False

    def __post_init__(self) -> None:
        if not 0 < self.target <= 1:
            raise ValueError(f"target ratio must be in (0, 1] (a fraction of the dense latency), got {self.target}")
        if self.interval < 1 or self.steps < 1 or self.start < 0:
            raise ValueError("prune interval and steps must be >= 1 and start >= 0")
        check_chunk(self.chunk)
        if not 0 <= self.min_fraction < 1:
            raise ValueError(f"min_fraction must be in [0, 1), got {self.min_fraction}")

    @property
    def end(self) -> int:
        """Iteration after which pruning is over."""
        return self.start + self.steps * self.interval


def percent(fraction: float) -> str:
    """``fraction`` as a percentage with three significant digits (0.001 -> '0.1%', 0.5 -> '50%')."""
    return f"{fraction * 100:.3g}%"


@dataclass(frozen=True)
class PrunerContext:
    """What the driver of a run tells every pruner: the run's seed (methods that draw random
    numbers use it), the CPU threads it may use, whether to show progress bars, and the device
    that methods which run the model themselves (EagleEye's scoring) should run it on, and the
    quality such methods maximise: ``score(model, dataset, batch_size) -> float``, higher is better
    (``None``: top-1 accuracy; a detection job passes mAP). It must be a module-level function:
    scoring processes receive it pickled by name."""
    seed: int = 0
    threads: int = 1
    progress: bool = False
    device: str = "cpu"
    score: Callable[[nn.Module, Any, int], float] | None = None


def check_chunk(chunk: int | str) -> None:
    """Raise ValueError unless ``chunk`` is a positive integer or ``"auto"``."""
    if isinstance(chunk, str) and chunk != "auto":
        raise ValueError(f"chunk must be a positive integer or 'auto', got {chunk!r}")
    if isinstance(chunk, int) and chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")


@dataclass
class StepLog:
    step: int
    iteration: int
    target_ms: float
    predicted_ms: float
    removed: int
    widths: dict[str, int] = field(default_factory=dict)
    resolves: int = 0
    achieved: float | None = None  # predicted / target: how much of the step's budget is used
    measured_ms: float | None = None  # measured feedback: the chosen network timed (dense anchor × ratio)
    feedback_rounds: int = 0  # measure-and-re-solve rounds the step made (0: no feedback)
    # every network the feedback timed, in order: {"predicted_ms": the table's price before any
    # correction, "measured_ms", and for HALP "widths" and "search" (``solver``: the knapsack's
    # answer at an aimed price; ``trim`` / ``widen``: a network narrowed / widened by chunks, its
    # branches unchanged)}; shows whether the chunk grid held a network inside the window, and
    # which structures the timings split into
    feedback_trials: list[dict] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.achieved is None and self.target_ms > 0:
            self.achieved = self.predicted_ms / self.target_ms


Unit = tuple[str, torch.Tensor]  # (group id, channel indices removed together)


def min_keep(g: ChannelGroup, cfg: PruneConfig) -> int:
    """Fewest channels group ``g`` may keep under ``cfg`` (0 only for a residual branch allowed to
    vanish)."""
    if cfg.allow_vanish and g.can_vanish:
        return 0
    return max(1, cfg.min_width, math.ceil(cfg.min_fraction * g.width))


def floor_widths(graph: ChannelGraph, groups: Sequence[ChannelGroup], cfg: PruneConfig,
                 chunks: dict[str, int]) -> dict[str, int]:
    """Every group in ``groups`` at the smallest width its ``chunks`` grid reaches under
    ``cfg``'s minimum (the others at full width): the configuration of the resource floor."""
    widths = graph.full_widths()
    for g in groups:
        need, c = min_keep(g, cfg), chunks[g.id]
        widths[g.id] = g.width - c * ((g.width - need) // c) if need > 0 else 0
    return widths


class Pruner:
    """Base class: budget, schedule, masks and checkpoint state over a cost model.

    ``chunk`` overrides ``config.chunk`` (baselines choose their own granularity); ``chunk_sizes``
    gives the "auto" sizes when the caller already computed them. ``method`` is the name the
    class is registered under (:func:`halp.pruners.register_pruner` sets it)."""

    method = "base"
    uses_feedback = False  # whether prune_step closes the loop through ``self.feedback`` when set

    def __init__(self, graph: ChannelGraph, cost: CostModel, config: PruneConfig,
                 chunk_sizes: dict[str, int] | None = None, chunk: int | str | None = None,
                 context: PrunerContext | None = None) -> None:
        self.context = context or PrunerContext()
        self.graph = graph
        self.cost = cost
        self.cfg = config
        self.groups: list[ChannelGroup] = list(graph.prunable_groups(include_stem=config.prune_stem))
        if not self.groups:
            raise ValueError("the model has no prunable channel group")
        chunk = config.chunk if chunk is None else chunk
        check_chunk(chunk)
        if isinstance(chunk, int):
            self.chunks = {g.id: g.grid_step(chunk) for g in self.groups}
        else:
            if chunk_sizes is None:
                from ..latency.quality import chunk_sizes as derive
                if getattr(cost, "table", None) is None:
                    raise ValueError("chunk='auto' reads chunk sizes off a latency table, and this cost "
                                     "model has none; give a chunk size or a table")
                # a latency model prices the staircase itself; another resource reads the table's
                chunk_sizes = derive(graph, cost.table, cost=cost if isinstance(cost, CostModel) else None)
            self.chunks = {g.id: g.grid_step(int(chunk_sizes[g.id])) for g in self.groups}
        self.masks = ChannelMasks.full(graph)
        self.applier = MaskApplier(graph, self.masks)
        self.iteration = 0
        self.step = 0
        self.steps_total = config.steps
        self.finished = False  # a method may finish before its last step (budget met)
        # iterations the schedule was put off: a due step waits while its criterion has nothing to
        # go on (fp16: every iteration since the last step overflowed), and the later steps move with it
        self.delay = 0
        self.dense_ms = cost.total_ms(graph.full_widths())
        self.log: list[StepLog] = []
        # measured feedback (halp.latency.feedback.Feedback), set by the driver when this machine is
        # the deployment device; ``observed`` holds what it fed the cost model (part of the state)
        self.feedback = None
        self.observed: list[dict] = []
        floor = self.floor_ms()
        if floor > self.final_target_ms:
            unit, what = cost.unit, cost.resource
            raise ValueError(
                f"{what} target {percent(config.target)} of dense ({self.final_target_ms:.4g} {unit} "
                f"predicted) is below the {what} floor {floor:.4g} {unit} = {percent(floor / self.dense_ms)} of "
                f"dense (every prunable group at its minimum width); raise the target or lower min_width")

    # ------------------------------------------------------------------ budget and schedule
    def min_keep(self, g: ChannelGroup) -> int:
        """Fewest channels group ``g`` may keep (0 only for a residual branch allowed to vanish)."""
        return min_keep(g, self.cfg)

    def floor_ms(self) -> float:
        """Predicted latency with every prunable group at its smallest allowed width."""
        return self.cost.total_ms(floor_widths(self.graph, self.groups, self.cfg, self.chunks))

    @property
    def final_target_ms(self) -> float:
        return self.cfg.target * self.dense_ms

    def target_ms(self, t: int) -> float:
        """Latency target after step ``t`` of ``steps_total``: geometric from dense to the final one."""
        f = min(1.0, t / self.steps_total)
        return self.dense_ms ** (1 - f) * self.final_target_ms ** f

    @property
    def done(self) -> bool:
        return self.finished or self.step >= self.steps_total

    @property
    def active(self) -> bool:
        return not self.done and self.cfg.start <= self.iteration < self.cfg.end + self.delay

    def widths(self) -> dict[str, int]:
        return self.masks.widths()

    def predicted_ms(self) -> float:
        return self.cost.total_ms(self.widths())

    # ------------------------------------------------------------------ hooks
    def holdout_size(self) -> int:
        """Training samples the method wants held out of training for :meth:`setup` (0: none)."""
        return 0

    def setup(self, model: nn.Module, train_set: Dataset, holdout: Dataset | None = None) -> None:
        """Called once before training on the (dense) ``model``; one-shot methods prune here."""

    def accumulate(self) -> None:
        """Called after every backward pass while pruning is active (gradient criteria)."""

    def ready(self) -> bool:
        """Whether a due step can be taken now (gradient criteria: see :attr:`Saliency.ready`)."""
        return True

    def after_backward(self) -> None:
        if self.active:
            self.accumulate()

    def after_step(self, optimizer: torch.optim.Optimizer | None = None) -> StepLog | None:
        """Count the iteration, prune if due, and keep pruned channels at zero."""
        entry = None
        if self.active and (self.iteration + 1 - self.cfg.start - self.delay) % self.cfg.interval == 0:
            if self.ready():
                entry = self.prune_step()
            else:
                self.delay += 1
        self.iteration += 1
        self.applier.apply()
        if optimizer is not None:
            self.applier.clear_optimizer_state(optimizer)
        return entry

    def prune_step(self) -> StepLog:
        raise NotImplementedError

    # ------------------------------------------------------------------ shared mechanics
    def pieces(self, gid: str, scores: torch.Tensor, mask: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Active channels of group ``gid`` (in ``mask``, by default the current masks) cut into
        units of ``chunks[gid]``, least important first (ties by channel index); a remainder is the
        last, most important unit, so removing whole units from the front keeps widths on the
        chunk grid."""
        mask = self.masks[gid] if mask is None else mask
        q = self.graph.groups[gid].slices
        if q > 1:  # grouped convs: rank positions by their score over every slice, cut whole positions
            per = mask.numel() // q
            pos = self._cut(torch.nonzero(mask[:per]).flatten(), scores.reshape(q, per).sum(0), self.chunks[gid] // q)
            return [(p.view(1, -1) + per * torch.arange(q).view(-1, 1)).flatten() for p in pos]
        return self._cut(torch.nonzero(mask).flatten(), scores, self.chunks[gid])

    @staticmethod
    def _cut(active: torch.Tensor, scores: torch.Tensor, chunk: int) -> list[torch.Tensor]:
        n = active.numel()
        if n == 0:
            return []
        s = scores[active]
        ranked = active[sorted(range(n), key=lambda i: (float(s[i]), int(active[i])))]
        full = n - n % chunk
        out = [ranked[i:i + chunk] for i in range(0, full, chunk)]
        if n % chunk:
            out.append(ranked[full:])
        return out

    def ranked_units(self, scores: dict[str, torch.Tensor]) -> list[Unit]:
        """Every group's units in one global order by mean channel score (lowest first). A group's
        units keep their own order: their means never decrease."""
        keyed = []
        for gi, g in enumerate(self.groups):
            for pi, p in enumerate(self.pieces(g.id, scores[g.id])):
                keyed.append(((float(scores[g.id][p].mean()), gi, pi), (g.id, p)))
        keyed.sort(key=lambda kv: kv[0])
        return [u for _, u in keyed]

    def remove_in_order(self, units: Sequence[Unit], target_ms: float, limit: int | None = None) -> tuple[int, float]:
        """Remove ``units`` in order until the predicted latency is at most ``target_ms`` or
        ``limit`` channels are gone, skipping a group's remaining units once the next one would
        take it below :meth:`min_keep`. Returns (channels removed, predicted latency)."""
        keep, removed, predicted = self._plan_removal(units, target_ms, limit)
        self.set_masks(keep)
        return removed, predicted

    def _plan_removal(self, units: Sequence[Unit], target_ms: float, limit: int | None
                      ) -> tuple[dict[str, torch.Tensor], int, float]:
        """What :meth:`remove_in_order` would keep, without applying it."""
        keep = {gid: m.clone() for gid, m in self.masks.items()}
        widths = {gid: int(m.sum()) for gid, m in keep.items()}
        mins = {g.id: self.min_keep(g) for g in self.groups}
        blocked: set[str] = set()
        removed = 0
        predicted = self.cost.total_ms(widths)
        for gid, idx in units:
            if predicted <= target_ms or (limit is not None and removed >= limit):
                break
            if gid in blocked:
                continue
            if widths[gid] - len(idx) < mins[gid]:
                blocked.add(gid)
                continue
            keep[gid][idx] = False
            widths[gid] -= len(idx)
            removed += len(idx)
            predicted = self.cost.total_ms(widths)
        return keep, removed, predicted

    def remove_in_order_measured(self, units: Sequence[Unit], target_ms: float, limit: int | None = None
                                 ) -> tuple[int, float, float | None, int]:
        """:meth:`remove_in_order`, closing the loop through ``self.feedback`` (when set) once the
        removal reaches ``target_ms``: the result is timed against the dense network, the cost model
        takes the measurement in, and the step's removal is planned again under the corrected
        prices, until the measurement is within the feedback's tolerance below the target. Keeps the
        measured plan within the target that removes fewest channels (else the fastest measured).
        Returns (channels removed, predicted, measured or None, measurements made)."""
        keep, removed, predicted = self._plan_removal(units, target_ms, limit)
        fb = self.feedback
        if fb is None or predicted > target_ms * (1 + 1e-9):
            self.set_masks(keep)
            return removed, predicted, None, 0
        tried: list[tuple[dict[str, torch.Tensor], int, float]] = []
        for r in range(fb.max_rounds):
            widths = {gid: int(m.sum()) for gid, m in keep.items()}
            ms = fb.ratio(self.graph, widths) * self.dense_ms
            tried.append((keep, removed, ms))
            try:
                self.observe(widths, ms)
            except ValueError:  # measured as slow as the dense network: nothing to correct with
                break
            if fb.accepts(ms, target_ms) or r + 1 == fb.max_rounds:
                break
            keep, removed, _ = self._plan_removal(units, target_ms * (1 - fb.tolerance / 2), limit)
        fitting = [t for t in tried if t[2] <= target_ms * (1 + 1e-9)]
        keep, removed, ms = min(fitting, key=lambda t: t[1]) if fitting else min(tried, key=lambda t: t[2])
        self.set_masks(keep)
        return removed, self.cost.total_ms(self.widths()), ms, len(tried)

    def observe(self, widths: dict[str, int], ms: float) -> None:
        """Feed an end-to-end measurement at ``widths`` to the cost model (and the state)."""
        self.cost.observe(widths, ms)
        self.observed.append({"widths": dict(widths), "ms": float(ms)})

    def set_masks(self, keep: dict[str, torch.Tensor]) -> None:
        self.masks = ChannelMasks(keep)
        self.applier = MaskApplier(self.graph, self.masks)
        self.applier.apply()

    def record(self, target_ms: float, predicted_ms: float, removed: int, resolves: int = 0,
               measured_ms: float | None = None, feedback_rounds: int = 0,
               feedback_trials: list[dict] | None = None) -> StepLog:
        self.step += 1
        entry = StepLog(self.step, self.iteration, target_ms, predicted_ms, removed, self.widths(), resolves,
                        measured_ms=measured_ms, feedback_rounds=feedback_rounds,
                        feedback_trials=list(feedback_trials or []))
        self.log.append(entry)
        return entry

    # ------------------------------------------------------------------ checkpoint
    def extra_state(self) -> dict:
        """Method-specific state (saliency sums, moving averages, ...)."""
        return {}

    def load_extra_state(self, state: dict) -> None:
        pass

    def config_state(self) -> dict:
        """What must match for a checkpoint to be resumed with this pruner."""
        return asdict(self.cfg)

    def state_dict(self) -> dict:
        return {"method": self.method, "iteration": self.iteration, "step": self.step,
                "finished": self.finished, "delay": self.delay, "masks": {k: v.clone() for k, v in self.masks.items()},
                "log": [asdict(e) for e in self.log], "config": self.config_state(),
                "chunks": dict(self.chunks), "dense_ms": self.dense_ms, "extra": self.extra_state(),
                "observed": [dict(o) for o in self.observed]}

    def load_state_dict(self, state: dict) -> None:
        if state.get("method", self.method) != self.method or state["config"] != self.config_state():
            raise ValueError("checkpoint was made with other pruning settings; use the same config to resume")
        self.iteration = int(state["iteration"])
        self.step = int(state["step"])
        self.finished = bool(state.get("finished", False))
        self.delay = int(state.get("delay", 0))
        self.set_masks(state["masks"])
        self.log = [StepLog(**e) for e in state["log"]]
        self.chunks = dict(state["chunks"])
        self.dense_ms = float(state["dense_ms"])
        self.load_extra_state(state.get("extra", {}))
        self.observed = []
        for o in state.get("observed", []):  # measured feedback the cost model had taken in
            self.observe(o["widths"], o["ms"])
