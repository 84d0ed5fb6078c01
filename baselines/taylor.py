"""Taylor pruning (Molchanov et al., CVPR 2019; first order on BatchNorm) to a latency budget.

Score per channel: (Σ over the group's BNs of γ·∂γ + β·∂β)², averaged over each pruning interval
(``halp.saliency`` with ``taylor_bn_sq``), then smoothed across pruning steps with an exponential
moving average ``ema ← m·ema + (1 − m)·mean`` (m = 0.9; the first step takes the mean itself).
Every ``prune.interval`` iterations from ``prune.start`` the ``neurons`` lowest-ranked channels over
all layers (one global ranking, no per-layer normalisation) are removed, stopping as soon as the
predicted latency meets the final target. If ``prune.steps`` steps are used up first, the last
step removes as many as the budget needs. Pruned channels' momentum is cleared by the shared
mask applier. The reference schedule is 100 neurons every 30 iterations, at most 32 steps, then 25
epochs of fine-tuning at lr 1e-3 with step decay every 10 epochs (``TrainConfig.schedule="step"``).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from halp.graph import ChannelGraph
from halp.latency.cost import CostModel
from halp.pruners import PruneConfig, Pruner, PrunerContext, StepLog, register_pruner
from halp.pruners.base import check_chunk
from halp.saliency import Saliency, SaliencyKind


@dataclass
class TaylorConfig:
    neurons: int = 100        # channels removed per pruning step
    momentum: float = 0.9     # EMA of the interval-mean scores across steps
    chunk: int | str = 1      # 1 = single neurons, as in the reference; "auto" = latency staircase

    def __post_init__(self) -> None:
        if self.neurons < 1:
            raise ValueError(f"taylor.neurons must be >= 1, got {self.neurons}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"taylor.momentum must be in [0, 1), got {self.momentum}")
        check_chunk(self.chunk)


@register_pruner("taylor", TaylorConfig, label="Taylor")
class TaylorPruner(Pruner):
    uses_feedback = True  # the last removal is timed and re-planned (Pruner.remove_in_order_measured)

    def __init__(self, graph: ChannelGraph, cost: CostModel, config: PruneConfig,
                 method_cfg: TaylorConfig | None = None, context: PrunerContext | None = None,
                 chunk_sizes: dict[str, int] | None = None) -> None:
        self.tcfg = method_cfg or TaylorConfig()
        super().__init__(graph, cost, config, chunk_sizes, chunk=self.tcfg.chunk, context=context)
        self.saliency = Saliency(graph, self.groups, SaliencyKind.TAYLOR_BN_SQ)
        self.ema: dict[str, torch.Tensor] | None = None

    def accumulate(self) -> None:
        self.saliency.accumulate()

    def ready(self) -> bool:
        return self.saliency.ready

    def update_ema(self, means: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Fold one interval's mean scores into the moving average and return it."""
        m = self.tcfg.momentum
        if self.ema is None:
            self.ema = {k: v.clone() for k, v in means.items()}
        else:
            self.ema = {k: m * self.ema[k] + (1 - m) * means[k] for k in self.ema}
        return self.ema

    def prune_step(self) -> StepLog:
        scores = self.update_ema(self.saliency.scores())
        self.saliency.reset()
        target = self.final_target_ms
        last = self.step + 1 >= self.steps_total
        # measured feedback (when set) on the step that reaches the target, the one that finishes
        removed, predicted, measured, rounds = self.remove_in_order_measured(
            self.ranked_units(scores), target, limit=None if last else self.tcfg.neurons)
        entry = self.record(target, predicted, removed, measured_ms=measured, feedback_rounds=rounds)
        self.finished = predicted <= target
        return entry

    def config_state(self) -> dict:
        return {**asdict(self.cfg), "taylor": asdict(self.tcfg)}

    def extra_state(self) -> dict:
        return {"saliency": self.saliency.state_dict(),
                "ema": None if self.ema is None else {k: v.clone() for k, v in self.ema.items()}}

    def load_extra_state(self, state: dict) -> None:
        self.saliency.load_state_dict(state["saliency"])
        self.ema = state["ema"]
