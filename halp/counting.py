"""MACs and parameter counts of a (pruned) network, computed from group widths alone.

MACs are multiply-accumulates of convolutions and linear layers (the "FLOPs" of most pruning
papers, HALP's included). Parameters count every ``nn.Parameter``: conv/linear/BatchNorm from
widths, anything else as in the dense model.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .graph import ChannelGraph, LayerInfo
from .slim import vanished_blocks
from .residual import find_residual_blocks


@dataclass(frozen=True)
class Counts:
    macs: int
    params: int


def _removed_prefixes(graph: ChannelGraph, widths: dict[str, int]) -> list[tuple[str, str | None]]:
    specs = find_residual_blocks(graph.model)
    return [(f"{b}.", f"{b}.{specs[b].shortcut}." if specs[b].shortcut else None)
            for b in vanished_blocks(graph, widths)]


def _is_removed(name: str, removed: list[tuple[str, str | None]]) -> bool:
    return any(name.startswith(p) and not (s and name.startswith(s)) for p, s in removed)


def layer_macs(li: LayerInfo, cin: int, cout: int) -> int:
    """MACs of one layer at widths (cin, cout) for a batch of one."""
    if li.kind == "linear":
        return cin * cout
    groups = cin if li.depthwise else li.groups
    return cout * (cin // groups) * li.kernel[0] * li.kernel[1] * li.output_hw[0] * li.output_hw[1]


def layer_params(li: LayerInfo, cin: int, cout: int) -> int:
    groups = cin if li.depthwise else li.groups
    k = li.kernel[0] * li.kernel[1] if li.kind == "conv" else 1
    return cout * (cin // groups) * k + (cout if li.bias else 0)


def count(graph: ChannelGraph, widths: dict[str, int] | None = None) -> Counts:
    """MACs (batch 1, conv + linear) and parameters of the model pruned to group ``widths``."""
    widths = widths if widths is not None else graph.full_widths()
    io = graph.layer_widths(widths)
    removed = _removed_prefixes(graph, widths)
    macs = 0
    params = sum(p.numel() for p in graph.model.parameters())
    for name, li in graph.layers.items():
        mod = graph.module(name)
        params -= sum(p.numel() for p in mod.parameters(recurse=False))
        if _is_removed(name, removed):
            continue
        cin, cout = io[name]
        macs += layer_macs(li, cin, cout)
        params += layer_params(li, cin, cout)
    norm_width = {n: widths.get(gid, g.width) for gid, g in graph.groups.items() for n in g.norms}
    for name, mod in graph.model.named_modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm) and mod.affine:
            if name in norm_width:
                params -= 2 * mod.num_features
                if not _is_removed(name, removed):
                    params += 2 * norm_width[name]
    return Counts(macs=int(macs), params=int(params))
