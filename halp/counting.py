"""MACs and parameter counts of a (pruned) network, computed from group widths alone.

MACs are multiply-accumulates of convolutions and linear layers (the "FLOPs" of most pruning
papers, HALP's included). Parameters count every ``nn.Parameter``: conv/linear/BatchNorm from
widths, anything else as in the dense model.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .graph import ChannelGraph, LayerInfo
from .residual import removed_modules


@dataclass(frozen=True)
class Counts:
    macs: int
    params: int


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
    removed = removed_modules(graph, widths)
    macs = 0
    params = sum(p.numel() for p in graph.model.parameters())
    for name, li in graph.layers.items():
        mod = graph.module(name)
        params -= sum(p.numel() for p in mod.parameters(recurse=False))
        if name in removed:
            continue
        cin, cout = io[name]
        macs += layer_macs(li, cin, cout)
        params += layer_params(li, cin, cout)
    norm_width = graph.norm_widths(widths)
    for name, mod in graph.model.named_modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm) and mod.affine:
            if name in norm_width:
                params -= 2 * mod.num_features
                if name not in removed:
                    params += 2 * norm_width[name]
    return Counts(macs=int(macs), params=int(params))
