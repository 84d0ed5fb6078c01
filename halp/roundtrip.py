"""The slim round trip: random masks -> physically slimmed copy -> same outputs and counts.

It proves, on a model nobody has pruned before, that everything downstream of the channel graph
holds: masks zero exactly what slimming removes, emptied residual branches become constants, and
MACs/parameters counted from widths (what FLOPs budgets and reports use) are the slim model's.
``halp inspect`` prints it; the experiment suite runs it before any training.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch

from .counting import count
from .graph import ChannelGraph
from .masks import ChannelMasks
from .residual import vanished_blocks
from .slim import masked_copy, slim_model

__all__ = ["RoundTrip", "roundtrip"]


@dataclass
class RoundTrip:
    """What one round trip found; ``ok`` when outputs and parameter counts agree."""
    seed: int
    max_abs_diff: float
    max_abs_output: float
    emptied_branches: int
    kept_channels: int
    total_channels: int
    slim_params: int
    predicted_params: int
    slim_macs: int
    seconds: float
    first_mismatch: str | None = None  # the first layer whose slim widths differ from the counted ones

    @property
    def ok(self) -> bool:
        return self.max_abs_diff <= 1e-4 * max(1.0, self.max_abs_output) and self.slim_params == self.predicted_params

    def problem(self) -> str | None:
        """Why it failed, in one line (None when it did not)."""
        if self.ok:
            return None
        if self.slim_params != self.predicted_params:
            return (f"the slim model has {self.slim_params} parameters but {self.predicted_params} are counted "
                    f"from the group widths (the channel graph gets the widths of layer {self.first_mismatch or '?'} "
                    "wrong)")
        return (f"masked and slim outputs differ by {self.max_abs_diff:.3g} (outputs up to "
                f"{self.max_abs_output:.3g}): slimming removes something the masks do not zero")

    def to_dict(self) -> dict:
        return {**asdict(self), "ok": self.ok}


def flat_output(out: torch.Tensor | tuple | list) -> torch.Tensor:
    """A network's output as one ``(batch, -1)`` tensor (detectors return a tuple of maps)."""
    if isinstance(out, torch.Tensor):
        return out.flatten(1)
    return torch.cat([o.flatten(1) for o in out], 1)


def roundtrip(graph: ChannelGraph, seed: int = 0, vanish_prob: float = 0.2,
              include_stem: bool = True) -> RoundTrip:
    """Random masks (every group at least one channel, some residual branches emptied with
    ``vanish_prob``), slimmed, compared with the masked model on a random batch of two."""
    gen = torch.Generator().manual_seed(seed)
    masks = ChannelMasks.random(graph, gen, vanish_prob=vanish_prob, include_stem=include_stem)
    t0 = time.perf_counter()
    masked, _ = masked_copy(graph, masks)
    slim = slim_model(graph, masks)
    x = torch.randn(2, *graph.input_shape, generator=gen)
    with torch.no_grad():
        a, b = flat_output(masked.eval()(x)), flat_output(slim.eval()(x))
    predicted = count(graph, masks.widths())
    io = graph.layer_widths(masks.widths())
    mismatch = next((n for n, (ci, co) in io.items() if _io(slim, n) not in (None, (ci, co))), None)
    return RoundTrip(seed, float((a - b).abs().max()), float(a.abs().max()),
                     len(vanished_blocks(graph, masks.widths())), sum(masks.widths().values()),
                     sum(g.width for g in graph.groups.values()), sum(p.numel() for p in slim.parameters()),
                     predicted.params, predicted.macs, round(time.perf_counter() - t0, 3), mismatch)


def _io(model: torch.nn.Module, name: str) -> tuple[int, int] | None:
    """(in, out) channels of layer ``name`` of the slim model (None where it was removed)."""
    try:
        mod = model.get_submodule(name)
    except AttributeError:
        return None
    if isinstance(mod, torch.nn.Conv2d):
        return mod.in_channels, mod.out_channels
    if isinstance(mod, torch.nn.Linear):
        return mod.in_features, mod.out_features
    return None
