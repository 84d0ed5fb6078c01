"""Residual block types of the third-party zoos this package builds models from.

Slimming and pricing need to know where a residual block's branch ends, what its shortcut is and
which activation follows the addition (see :mod:`halp.residual`); the core knows no model, so the
zoo teaches it torchvision's and timm's blocks here, on import of :mod:`halp.models`.
"""
from __future__ import annotations

from typing import Callable

from torch import nn

from ..residual import ResidualSpec, register_residual_block


def _plain(end: str, act: str | None) -> Callable[[nn.Module], ResidualSpec]:
    def adapter(block: nn.Module) -> ResidualSpec:
        return ResidualSpec(end, "downsample" if block.downsample is not None else None, act)
    return adapter


def _inverted(block: nn.Module) -> ResidualSpec | None:
    if not block.use_res_connect:
        return None
    return ResidualSpec(f"conv.{len(block.conv) - 1}" if isinstance(block.conv[-1], nn.BatchNorm2d)
                        else f"conv.{len(block.conv) - 1}.1")


def _timm_plain(end: str, act: str) -> Callable[[nn.Module], ResidualSpec | None]:
    def adapter(block: nn.Module) -> ResidualSpec | None:
        # Squeeze-excitation makes the branch depend on its input again: not a constant.
        if getattr(block, "se", None) is not None and not isinstance(block.se, nn.Identity):
            return None
        return ResidualSpec(end, "downsample" if block.downsample is not None else None, act)
    return adapter


def _timm_regnet(block: nn.Module) -> ResidualSpec | None:
    # timm's RegNet bottleneck: ``downsample`` is the shortcut (None: no skip at all, Identity:
    # the input itself); conv3 is a ConvNormAct without activation, act3 follows the addition
    if block.downsample is None or not isinstance(block.se, nn.Identity):
        return None
    shortcut = None if isinstance(block.downsample, nn.Identity) else "downsample"
    return ResidualSpec("conv3.bn", shortcut, "act3")


def _register() -> None:
    try:
        from torchvision.models import mobilenetv2 as tv_mbv2
        from torchvision.models import resnet as tv_resnet

        register_residual_block(tv_resnet.BasicBlock, _plain("bn2", "relu"))
        register_residual_block(tv_resnet.Bottleneck, _plain("bn3", "relu"))
        register_residual_block(tv_mbv2.InvertedResidual, _inverted)
    except ImportError:  # pragma: no cover - torchvision is a hard dependency
        pass
    try:
        from timm.models import resnet as timm_resnet
    except ImportError:  # pragma: no cover - timm is optional at import time
        return
    register_residual_block(timm_resnet.BasicBlock, _timm_plain("bn2", "act2"))
    register_residual_block(timm_resnet.Bottleneck, _timm_plain("bn3", "act3"))
    from timm.models import regnet as timm_regnet

    register_residual_block(timm_regnet.Bottleneck, _timm_regnet)


_register()
