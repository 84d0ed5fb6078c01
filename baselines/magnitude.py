"""Magnitude pruning (Li et al., ICLR 2017) to a latency budget.

The paper's criterion, which is the default: a channel's score is the L1 norm of its filter (for a
coupled group, the first writing layer's, ``reduce="first"``), and all channels are ranked in one
global order by that raw norm (``normalize="none"``). Channels are removed, lowest score first,
until the latency predicted by the cost model meets the target: once before fine-tuning
(``schedule="one_shot"``). Variants: ``reduce="sum"`` adds the norms over the group;
``normalize="mean"`` divides each group's scores by their mean before the ranking (raw norms grow
with a layer's fan-in, so this makes the ranking scale-free across layers); ``schedule="iterative"``
prunes along HALP's geometric schedule during training (``prune.start/interval/steps``). Method
and variants: ``baselines/README.md``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from enum import Enum

import torch
from torch import nn
from torch.utils.data import Dataset

from halp.graph import ChannelGraph
from halp.latency.cost import CostModel
from halp.pruners import PruneConfig, Pruner, PrunerContext, StepLog, register_pruner
from halp.pruners.base import check_chunk
from halp.saliency import filter_norms


class Schedule(str, Enum):
    ONE_SHOT = "one_shot"
    ITERATIVE = "iterative"


class Normalize(str, Enum):
    NONE = "none"  # the paper's: raw L1 norms in one global ranking
    MEAN = "mean"  # variant: divide a group's scores by their mean (scale-free across layers)


@dataclass
class MagnitudeConfig:
    reduce: str = "first"     # first (the paper's) | sum: which writing layers of a coupled group are scored
    normalize: str = "none"   # none (the paper's) | mean
    schedule: str = "one_shot"
    chunk: int | str = 1      # channels removed together; "auto" = the latency staircase (like HALP)

    def __post_init__(self) -> None:
        if self.reduce not in ("first", "sum"):
            raise ValueError(f"magnitude.reduce must be 'first' or 'sum', got {self.reduce!r}")
        Normalize(self.normalize)
        Schedule(self.schedule)
        check_chunk(self.chunk)


def magnitude_scores(graph: ChannelGraph, groups, reduce: str = "first",
                     normalize: str = "none") -> dict[str, torch.Tensor]:
    """L1 filter norm per channel of each group, optionally divided by the group's mean."""
    out = {}
    for g in groups:
        s = filter_norms(graph, g, p=1, reduce=reduce)
        if Normalize(normalize) is Normalize.MEAN:
            s = s / s.mean().clamp_min(1e-12)
        out[g.id] = s
    return out


@register_pruner("magnitude", MagnitudeConfig, label="Magnitude")
class MagnitudePruner(Pruner):
    uses_feedback = True  # the last removal is timed and re-planned (Pruner.remove_in_order_measured)

    def __init__(self, graph: ChannelGraph, cost: CostModel, config: PruneConfig,
                 method_cfg: MagnitudeConfig | None = None, context: PrunerContext | None = None,
                 chunk_sizes: dict[str, int] | None = None) -> None:
        self.mcfg = method_cfg or MagnitudeConfig()
        super().__init__(graph, cost, config, chunk_sizes, chunk=self.mcfg.chunk, context=context)
        self.one_shot = Schedule(self.mcfg.schedule) is Schedule.ONE_SHOT
        if self.one_shot:
            self.steps_total = 1

    @property
    def active(self) -> bool:
        return not self.one_shot and super().active

    def scores(self) -> dict[str, torch.Tensor]:
        return magnitude_scores(self.graph, self.groups, self.mcfg.reduce, self.mcfg.normalize)

    def setup(self, model: nn.Module, train_set: Dataset, holdout: Dataset | None = None) -> None:
        if self.one_shot and not self.done:
            self.prune_step()

    def prune_step(self) -> StepLog:
        target = self.target_ms(self.step + 1)
        units = self.ranked_units(self.scores())
        if self.step + 1 < self.steps_total:
            removed, predicted = self.remove_in_order(units, target)
            return self.record(target, predicted, removed)
        removed, predicted, measured, rounds = self.remove_in_order_measured(units, target)  # the last step
        return self.record(target, predicted, removed, measured_ms=measured, feedback_rounds=rounds)

    def config_state(self) -> dict:
        return {**asdict(self.cfg), "magnitude": asdict(self.mcfg)}
