"""A compact MobileNetV2 (Sandler et al. 2018) for 28-32 px inputs.

Same inverted-residual block as the ImageNet model, with a stride-1 stem and fewer, narrower
stages so that it trains in minutes on a CPU.
"""
from __future__ import annotations

import torch
from torch import nn

from ..residual import ResidualSpec, register_residual_block

# (expansion t, output channels c, repeats n, first stride s), as in the paper's Table 2.
COMPACT_SETTING: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 1),
    (6, 32, 2, 2),
    (6, 64, 2, 2),
    (6, 96, 1, 1),
)


def _conv_bn_act(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1,
                 act: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)
    ]
    if act:
        layers.append(nn.ReLU6(inplace=True))
    return nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    """1x1 expand - 3x3 depthwise - 1x1 linear projection, with identity skip when shapes match."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        self.use_res_connect = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if expand != 1:
            layers.append(_conv_bn_act(cin, hidden, 1))
        layers.append(_conv_bn_act(hidden, hidden, 3, stride, groups=hidden))
        layers.append(_conv_bn_act(hidden, cout, 1, act=False))
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class CompactMobileNetV2(nn.Module):
    """MobileNetV2 with ``width`` multiplier, ``in_chans`` input channels and ``num_classes``."""

    def __init__(self, num_classes: int = 10, in_chans: int = 3, width: float = 1.0,
                 last_channels: int = 512, dropout: float = 0.1) -> None:
        super().__init__()
        if width <= 0:
            raise ValueError(f"width multiplier must be positive, got {width}")

        def w(c: int) -> int:
            return max(8, int(round(c * width)))

        cin = w(32)
        features: list[nn.Module] = [_conv_bn_act(in_chans, cin, 3, 1)]
        for t, c, n, s in COMPACT_SETTING:
            for i in range(n):
                features.append(InvertedResidual(cin, w(c), s if i == 0 else 1, t))
                cin = w(c)
        features.append(_conv_bn_act(cin, w(last_channels), 1))
        self.features = nn.Sequential(*features)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(w(last_channels), num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


def _inverted_residual_spec(block: nn.Module) -> ResidualSpec | None:
    if not block.use_res_connect:
        return None
    return ResidualSpec(f"conv.{len(block.conv) - 1}" if isinstance(block.conv[-1], nn.BatchNorm2d)
                        else f"conv.{len(block.conv) - 1}.1")


register_residual_block(InvertedResidual, _inverted_residual_spec)
