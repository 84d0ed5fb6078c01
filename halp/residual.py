"""Residual blocks whose branch may be pruned away entirely.

When every channel of a group inside a residual branch is pruned, the branch no longer depends on
its input: the first layer after the empty group sees zeros, so the branch emits the constant its
last BatchNorm produces from zero input (propagated through the layers after it). The block then
becomes ``post_act(shortcut(x) + constant)`` (HALP.md §5). This module knows, per block type, where
the branch ends, what the shortcut is and which activation follows the addition, and which blocks
and modules a width configuration empties — bookkeeping that pricing (counting, latency) shares
with slimming without depending on it. It knows no block type of its own: the zoo in
:mod:`halp.models` registers torchvision's and timm's block types (so import it before building a
graph of such a model); register your own for other models with :func:`register_residual_block`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch
from torch import nn

if TYPE_CHECKING:
    from .graph import ChannelGraph


@dataclass(frozen=True)
class ResidualSpec:
    """Attribute names (dotted, relative to the block) of the branch's last layer, shortcut, act."""

    branch_end: str
    shortcut: str | None = None
    post_act: str | None = None


_ADAPTERS: dict[type, Callable[[nn.Module], ResidualSpec | None]] = {}


def register_residual_block(block_type: type, adapter: Callable[[nn.Module], ResidualSpec | None]) -> None:
    """Teach slimming a residual block type; ``adapter(block)`` returns ``None`` for no skip.

    The zoo in :mod:`halp.models` registers torchvision's and timm's block types; register your
    own for other models.
    """
    _ADAPTERS[block_type] = adapter


def residual_spec(block: nn.Module) -> ResidualSpec | None:
    adapter = _ADAPTERS.get(type(block))
    return adapter(block) if adapter is not None else None


def find_residual_blocks(model: nn.Module) -> dict[str, ResidualSpec]:
    """Every registered residual block in ``model`` (name -> spec)."""
    out = {}
    for name, mod in model.named_modules():
        spec = residual_spec(mod)
        if spec is not None and name:
            out[name] = spec
    return out


def vanished_blocks(graph: ChannelGraph, widths: dict[str, int]) -> list[str]:
    """Residual blocks whose branch loses a whole group under ``widths``."""
    return sorted({graph.groups[gid].residual_block for gid, w in widths.items()
                   if w == 0 and graph.groups[gid].residual_block is not None})


def removed_modules(graph: ChannelGraph, widths: dict[str, int]) -> set[str]:
    """Names of the modules that an emptied residual branch takes out of the slim model."""
    gone = vanished_blocks(graph, widths)
    if not gone:
        return set()
    specs = find_residual_blocks(graph.model)
    out = set()
    for b in gone:
        shortcut = f"{b}.{specs[b].shortcut}." if specs[b].shortcut else None
        out.update(n for n, _ in graph.model.named_modules()
                   if n.startswith(f"{b}.") and not (shortcut and n.startswith(shortcut)))
    return out


class ConstantResidual(nn.Module):
    """``post_act(shortcut(x) + constant)``: a residual block whose branch was pruned to nothing."""

    def __init__(self, shortcut: nn.Module | None, constant: torch.Tensor,
                 post_act: nn.Module | None) -> None:
        super().__init__()
        self.shortcut = shortcut if shortcut is not None else nn.Identity()
        self.register_buffer("constant", constant.detach().reshape(1, -1, 1, 1).clone())
        self.post_act = post_act if post_act is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.post_act(self.shortcut(x) + self.constant)
