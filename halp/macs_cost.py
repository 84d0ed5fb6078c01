"""A cost model that prices widths in MACs instead of latency, for FLOPs-aware pruning.

The paper's central ablation compares a latency budget with a FLOPs budget at equal measured
latency, and EagleEye's original resource is FLOPs. :class:`MacsCost` has the interface the
pruners use (``total_ms``, ``chunk_costs``, ``table``), so every method prunes to a fraction of the
dense MACs with the same solver, schedule, groups and chunks; only the resource changes. Its
"ms" are millions of MACs (``unit``); the latency table is kept only for latency-aware chunk sizes.
"""
from __future__ import annotations

import numpy as np

from .counting import count
from .graph import ChannelGraph
from .latency.table import LatencyTable


class MacsCost:
    """Millions of multiply-accumulates (batch 1, conv + linear, :func:`halp.counting.count`) of
    ``graph`` at any widths; ``table`` (optional) is what ``chunk="auto"`` reads its sizes from."""

    unit = "MMAC"
    resource = "macs"

    def __init__(self, graph: ChannelGraph, table: LatencyTable | None = None) -> None:
        self.graph = graph
        self.table = table

    def total_ms(self, widths: dict[str, int]) -> float:
        """MACs (millions) of the network at group ``widths`` (emptied residual branches drop out)."""
        return count(self.graph, widths).macs / 1e6

    def chunk_costs(self, gid: str, widths: dict[str, int], chunk: int) -> np.ndarray:
        """MACs saved by each chunk of group ``gid`` (index 0 = removed first) at the current
        ``widths``: every layer the group's width changes, readers and vanishing branches included."""
        n = int(widths.get(gid, self.graph.groups[gid].width))
        hi = np.arange(n, 0, -chunk)
        lo = np.maximum(hi - chunk, 0)
        at = {int(w): self.total_ms({**widths, gid: int(w)}) for w in {*hi.tolist(), *lo.tolist()}}
        return np.array([at[h] - at[low] for h, low in zip(hi.tolist(), lo.tolist())])
