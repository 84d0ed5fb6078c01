"""Channel importance per channel group (HALP.md §2).

``taylor_bn`` (HALP): per minibatch, after backward, for channel c of group G
    s_c = | Σ_{BN in G} (γ_c ∂L/∂γ_c + β_c ∂L/∂β_c) |
(the sum over coupled BNs is taken before the absolute value). A group without BatchNorm uses the
weight form | Σ_{layers writing G} Σ w ⊙ ∂L/∂w | over each channel's filter. Scores are summed
every iteration and averaged over the interval; iterations whose scores are not finite are
skipped. ``taylor_bn_sq`` squares instead of taking the absolute value (Molchanov et al. 2019).
``l1`` / ``l2`` are filter norms (no gradients): the sum over the group's writing layers, or only
the first writer with ``reduce="first"`` (Li et al. 2017's criterion for coupled layers).
"""
from __future__ import annotations

from enum import Enum

import torch

from .graph import ChannelGraph, ChannelGroup


class SaliencyKind(str, Enum):
    TAYLOR_BN = "taylor_bn"
    TAYLOR_BN_SQ = "taylor_bn_sq"
    L1 = "l1"
    L2 = "l2"

    @property
    def needs_gradients(self) -> bool:
        return self in (SaliencyKind.TAYLOR_BN, SaliencyKind.TAYLOR_BN_SQ)


_INDEX_COPIES: dict[tuple[int, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}


def _on(index: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``index`` on ``device``, copied there once: saliency runs every iteration, and a host-to-GPU
    copy per layer per iteration would cost a synchronisation each (on the CPU this is ``index``)."""
    if index.device == device:
        return index
    key = (id(index), device)
    hit = _INDEX_COPIES.get(key)
    if hit is None or hit[0] is not index:  # the entry keeps its source alive, so ids are not reused
        hit = _INDEX_COPIES[key] = (index, index.to(device))
    return hit[1]


def _taylor_sum(graph: ChannelGraph, g: ChannelGroup, role: str) -> torch.Tensor:
    """Σ over the group's members of ``role`` of Σ p·∂p per group channel: BN γ and β
    (``role="norm"``), or each output channel's filter and bias (``role="out"``). Computed in
    float64 on the parameters' device (no host round trip per layer on a GPU)."""
    total = None
    for mem in g.members:
        if mem.role != role:
            continue
        mod = graph.module(mem.layer)
        dev = mod.weight.device
        per_channel = torch.zeros(mod.weight.shape[0], dtype=torch.float64, device=dev)
        for p in (mod.weight, mod.bias):
            if p is not None and p.grad is not None:
                prod = (p.detach() * p.grad.detach()).double()  # product in the parameter's dtype, as always
                per_channel += prod.flatten(1).sum(1) if prod.dim() > 1 else prod
        if total is None:
            total = torch.zeros(g.width, dtype=torch.float64, device=dev)
        total.index_add_(0, _on(mem.channels, dev), per_channel[_on(mem.positions, dev)])
    return total if total is not None else torch.zeros(g.width, dtype=torch.float64)


def filter_norms(graph: ChannelGraph, g: ChannelGroup, p: int = 1, reduce: str = "sum") -> torch.Tensor:
    """L1/L2 norm of each channel's filters over the group's writing layers (``reduce``: sum or
    first = only the first writer)."""
    if reduce not in ("sum", "first"):
        raise ValueError(f"reduce must be 'sum' or 'first', got {reduce!r}")
    total = torch.zeros(g.width, dtype=torch.float64)
    outs = [m for m in g.members if m.role == "out"]
    if reduce == "first":
        outs = [m for m in outs if m.layer == g.out_layers[0]]
    for mem in outs:
        w = graph.module(mem.layer).weight.detach().double().flatten(1).cpu()
        norms = w.abs().sum(1) if p == 1 else w.pow(2).sum(1)
        total.index_add_(0, mem.channels, norms[mem.positions])
    return total if p == 1 else total.sqrt()


class Saliency:
    """Accumulates per-channel scores of ``groups`` between pruning steps."""

    def __init__(self, graph: ChannelGraph, groups: list[ChannelGroup], kind: SaliencyKind | str =
                 SaliencyKind.TAYLOR_BN, reduce: str = "sum") -> None:
        self.graph = graph
        self.groups = list(groups)
        self.kind = SaliencyKind(kind)
        self.reduce = reduce
        self.sums = {g.id: torch.zeros(g.width, dtype=torch.float64) for g in self.groups}
        self.count = 0
        self.skipped = 0

    def accumulate(self) -> bool:
        """Add this iteration's scores (call after backward). Returns False if skipped (NaN/Inf)."""
        if not self.kind.needs_gradients:
            return True
        step = {}
        for g in self.groups:
            raw = _taylor_sum(self.graph, g, "norm" if g.norms else "out")
            step[g.id] = raw.abs() if self.kind is SaliencyKind.TAYLOR_BN else raw.pow(2)
        # one finiteness check for all groups: a single device synchronisation per iteration
        if step and not bool(torch.isfinite(torch.cat(list(step.values()))).all()):
            self.skipped += 1
            return False
        for gid, v in step.items():
            if self.sums[gid].device != v.device:  # the model moved (e.g. to a GPU) after we were built
                self.sums[gid] = self.sums[gid].to(v.device)
            self.sums[gid] += v
        self.count += 1
        return True

    @property
    def ready(self) -> bool:
        """Scores exist: a criterion without gradients, or one finite iteration since the last reset."""
        return not self.kind.needs_gradients or self.count > 0

    def scores(self) -> dict[str, torch.Tensor]:
        """Mean score per channel since the last reset (filter norms for ``l1``/``l2``)."""
        if not self.kind.needs_gradients:
            p = 1 if self.kind is SaliencyKind.L1 else 2
            return {g.id: filter_norms(self.graph, g, p, self.reduce) for g in self.groups}
        if self.count == 0:
            raise RuntimeError("no finite saliency was accumulated since the last pruning step "
                               "(every iteration had NaN/Inf gradients?)")
        return {gid: (s / self.count).cpu() for gid, s in self.sums.items()}

    def reset(self) -> None:
        for s in self.sums.values():
            s.zero_()
        self.count = 0

    def state_dict(self) -> dict:
        return {"sums": {k: v.detach().cpu().clone() for k, v in self.sums.items()}, "count": self.count,
                "skipped": self.skipped}

    def load_state_dict(self, state: dict) -> None:
        for k, v in state["sums"].items():
            self.sums[k].copy_(v)
        self.count = int(state["count"])
        self.skipped = int(state.get("skipped", 0))
