"""Measured feedback: time the network a pruner chose, and price the next choice from that.

A latency table prices a configuration from units timed alone plus end-to-end anchors at uniform
widths. A pruned network is not uniform, and on a noisy host the anchors drift, so the prediction
can miss the measured latency by several per cent (``results/lut_accuracy.md``). When the machine
that prunes is the deployment device (a CPU job priced with this CPU's table, a GPU job on the
target GPU), the pruner can close the loop: slim the configuration it chose, time it interleaved
with the dense network in the table's setting, feed the measured ratio back into the cost model
(:meth:`~halp.latency.cost.CostModel.observe`) and choose again under the corrected prices.

Only ratios are used (slim ÷ dense, both timed in the same rounds), scaled by the cost model's
dense prediction, so a host that is uniformly slower today than when the table was built does not
move the budget. This module measures; the pruner decides (``HalpPruner``).
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, replace

import numpy as np
import torch

from ..graph import ChannelGraph
from ..masks import ChannelMasks
from ..slim import slim_model
from .backends import Setting, get_backend
from .timing import Protocol, measure

FEEDBACK_PROTOCOL = Protocol(rounds=9, sample_ms=50.0)


@dataclass
class Feedback:
    """Times the networks a pruner chooses end to end, against the dense one, in ``setting``.

    ``tolerance``: a configuration is accepted when its measured latency is within this fraction
    below the step's target (and never above it); ``max_rounds``: the most measure-and-re-solve
    rounds a pruning step makes; ``repeats`` × ``protocol``: how each configuration is timed (the
    ratio is the median over the repeats of the per-repeat median ratios)."""

    setting: Setting
    tolerance: float = 0.02
    max_rounds: int = 8
    repeats: int = 3
    protocol: Protocol = FEEDBACK_PROTOCOL

    @classmethod
    def for_table(cls, table, **kw) -> "Feedback":
        """Feedback in the setting ``table`` (a :class:`~halp.latency.table.LatencyTable`) was measured in."""
        recorded = table.meta.get("setting") or {}
        names = {f.name for f in dataclasses.fields(Setting)}
        return cls(Setting(**{k: v for k, v in recorded.items() if k in names}), **kw)

    def __post_init__(self) -> None:
        if not 0 < self.tolerance < 1:
            raise ValueError(f"feedback tolerance must be in (0, 1), got {self.tolerance}")
        if self.max_rounds < 1 or self.repeats < 1:
            raise ValueError("feedback max_rounds and repeats must be >= 1")

    def ratio(self, graph: ChannelGraph, widths: dict[str, int]) -> float:
        """Measured latency of ``graph``'s model at ``widths`` ÷ that of the full-width model."""
        dense = copy.deepcopy(graph.model).float().cpu().eval()
        slim = slim_model(graph, ChannelMasks.prefix(graph, widths)).float().cpu().eval()
        backend = get_backend(self.setting)
        with backend, torch.no_grad():
            x = torch.randn(self.setting.batch, *graph.input_shape)
            runners = [backend.prepare(dense, x), backend.prepare(slim, x)]
            ratios = []
            for r in range(self.repeats):
                d, s = measure(backend, runners, replace(self.protocol, seed=self.protocol.seed + r))
                ratios.append(s.ms / d.ms)
        return float(np.median(ratios))

    def accepts(self, measured_ms: float, target_ms: float) -> bool:
        """Whether a measurement uses the step's budget: within ``tolerance`` below ``target_ms``."""
        return target_ms * (1 - self.tolerance) <= measured_ms <= target_ms * (1 + 1e-9)
