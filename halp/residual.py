"""Residual blocks whose branch may be pruned away entirely.

When every channel of a group inside a residual branch is pruned, the branch no longer depends on
its input: the first layer after the empty group sees zeros, so the branch emits the constant its
last BatchNorm produces from zero input (propagated through the layers after it). The block then
becomes ``post_act(shortcut(x) + constant)`` (HALP.md §5). This module knows, per block type, where
the branch ends, what the shortcut is and which activation follows the addition; register more
block types with :func:`register_residual_block`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn


@dataclass(frozen=True)
class ResidualSpec:
    """Attribute names (dotted, relative to the block) of the branch's last layer, shortcut, act."""

    branch_end: str
    shortcut: str | None = None
    post_act: str | None = None


_ADAPTERS: dict[type, Callable[[nn.Module], ResidualSpec | None]] = {}


def register_residual_block(block_type: type, adapter: Callable[[nn.Module], ResidualSpec | None]) -> None:
    """Teach slimming a residual block type; ``adapter(block)`` returns ``None`` for no skip."""
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


def _register_builtin() -> None:
    from .models.cifar_resnet import BasicBlock as CifarBasic
    from .models.mobilenetv2 import InvertedResidual as CompactIR

    def plain(end: str, act: str | None) -> Callable[[nn.Module], ResidualSpec]:
        def adapter(block: nn.Module) -> ResidualSpec:
            return ResidualSpec(end, "downsample" if block.downsample is not None else None, act)
        return adapter

    def inverted(block: nn.Module) -> ResidualSpec | None:
        if not block.use_res_connect:
            return None
        return ResidualSpec(f"conv.{len(block.conv) - 1}" if isinstance(block.conv[-1], nn.BatchNorm2d)
                            else f"conv.{len(block.conv) - 1}.1")

    register_residual_block(CifarBasic, plain("bn2", "relu"))
    register_residual_block(CompactIR, inverted)
    try:
        from torchvision.models import mobilenetv2 as tv_mbv2
        from torchvision.models import resnet as tv_resnet

        register_residual_block(tv_resnet.BasicBlock, plain("bn2", "relu"))
        register_residual_block(tv_resnet.Bottleneck, plain("bn3", "relu"))
        register_residual_block(tv_mbv2.InvertedResidual, inverted)
    except ImportError:  # pragma: no cover - torchvision is a hard dependency
        pass
    try:
        from timm.models import resnet as timm_resnet
    except ImportError:  # pragma: no cover - timm is optional at import time
        return

    def timm_plain(end: str, act: str) -> Callable[[nn.Module], ResidualSpec | None]:
        def adapter(block: nn.Module) -> ResidualSpec | None:
            # Squeeze-excitation makes the branch depend on its input again: not a constant.
            if getattr(block, "se", None) is not None and not isinstance(block.se, nn.Identity):
                return None
            return ResidualSpec(end, "downsample" if block.downsample is not None else None, act)
        return adapter

    register_residual_block(timm_resnet.BasicBlock, timm_plain("bn2", "act2"))
    register_residual_block(timm_resnet.Bottleneck, timm_plain("bn3", "act3"))


_register_builtin()
