"""The units a latency table measures, and the (c_in, c_out) points each can reach.

A *unit* is what really runs for one conv layer: the conv, plus the BatchNorm and activation that
directly follow it in execution order (measured together, as the device runs them). Linear layers
are units too. A unit's ``UnitSpec`` holds everything but the two widths, so layers with the same
geometry share measurements.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from ..graph import ChannelGraph, LayerInfo

ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.SiLU, nn.Hardswish, nn.GELU, nn.LeakyReLU, nn.Sigmoid,
               nn.Hardsigmoid, nn.Mish, nn.ELU, nn.Tanh)


@dataclass(frozen=True)
class UnitSpec:
    """Geometry of a measured unit; widths are the table's coordinates, not part of the spec."""

    kind: str  # "conv" | "linear"
    kernel: tuple[int, int] = (1, 1)
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    depthwise: bool = False
    bias: bool = False
    input_hw: tuple[int, int] = (1, 1)
    norm: bool = False
    act: str | None = None

    @property
    def key(self) -> str:
        """A readable stable id, e.g. ``conv3x3_s1_p1_hw56x56_bn_ReLU``."""
        if self.kind == "linear":
            return f"linear{'_b' if self.bias else ''}"
        k, s, p, d, hw = self.kernel, self.stride, self.padding, self.dilation, self.input_hw
        parts = [f"{'dw' if self.depthwise else ''}conv{k[0]}x{k[1]}", f"s{s[0]}x{s[1]}" if s[0] != s[1] else f"s{s[0]}",
                 f"p{p[0]}x{p[1]}" if p[0] != p[1] else f"p{p[0]}"]
        if d != (1, 1):
            parts.append(f"d{d[0]}x{d[1]}")
        parts.append(f"hw{hw[0]}x{hw[1]}")
        if self.bias:
            parts.append("b")
        if self.norm:
            parts.append("bn")
        if self.act:
            parts.append(self.act)
        return "_".join(parts)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "UnitSpec":
        d = dict(d)
        for k in ("kernel", "stride", "padding", "dilation", "input_hw"):
            if k in d:
                d[k] = tuple(d[k])
        return cls(**d)

    def build(self, cin: int, cout: int, fused: bool = True) -> nn.Module:
        """The module to time at widths (cin, cout); ``fused=False`` times the conv alone."""
        if self.kind == "linear":
            return nn.Linear(cin, cout, bias=self.bias)
        if self.depthwise and cin != cout:
            raise ValueError(f"depthwise unit needs c_in == c_out, got {cin}, {cout}")
        layers: list[nn.Module] = [nn.Conv2d(cin, cout, self.kernel, self.stride, self.padding,
                                             self.dilation, groups=cin if self.depthwise else 1,
                                             bias=self.bias)]
        if fused and self.norm:
            bn = nn.BatchNorm2d(cout)
            with torch.no_grad():  # non-trivial statistics, like a trained network
                bn.running_var.uniform_(0.5, 1.5)
                bn.running_mean.normal_(0, 0.1)
            layers.append(bn)
        if fused and self.act:
            layers.append(getattr(nn, self.act)())
        return nn.Sequential(*layers).eval()

    def example_input(self, batch: int, cin: int) -> torch.Tensor:
        if self.kind == "linear":
            return torch.randn(batch, cin)
        return torch.randn(batch, cin, *self.input_hw)


def _execution_order(model: nn.Module, input_shape: tuple[int, ...]) -> list[nn.Module]:
    """Convs, linears, BNs and activations in the order a forward calls them."""
    order: list[nn.Module] = []
    kinds = (nn.Conv2d, nn.Linear, nn.modules.batchnorm._BatchNorm) + ACTIVATIONS
    hooks = [m.register_forward_pre_hook(lambda mod, inp: order.append(mod))
             for m in model.modules() if isinstance(m, kinds)]
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(torch.randn(1, *input_shape))
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return order


def model_units(graph: ChannelGraph) -> dict[str, UnitSpec]:
    """The unit of every conv/linear layer of ``graph`` (BN and activation detected by order)."""
    order = _execution_order(graph.model, graph.input_shape)
    follows: dict[int, tuple[bool, str | None]] = {}
    for i, mod in enumerate(order):
        if not isinstance(mod, nn.Conv2d) or id(mod) in follows:
            continue
        norm, act = False, None
        j = i + 1
        if j < len(order) and isinstance(order[j], nn.modules.batchnorm._BatchNorm) \
                and order[j].num_features == mod.out_channels:
            norm, j = True, j + 1
        if j < len(order) and isinstance(order[j], ACTIVATIONS):
            act = type(order[j]).__name__
        follows[id(mod)] = (norm, act)
    units = {}
    for name, li in graph.layers.items():
        norm, act = follows.get(id(graph.module(name)), (False, None))
        units[name] = unit_of(li, norm, act)
    return units


def unit_of(li: LayerInfo, norm: bool = False, act: str | None = None) -> UnitSpec:
    if li.kind == "linear":
        return UnitSpec("linear", bias=li.bias)
    return UnitSpec("conv", li.kernel, li.stride, li.padding, li.dilation, li.depthwise, li.bias,
                    li.input_hw, norm, act)


def reachable_widths(width: int, step: int) -> list[int]:
    """Widths a group of ``width`` channels can take when pruned ``step`` channels at a time:
    ``width, width - step, ...`` down to the smallest positive one (ascending)."""
    if step < 1:
        raise ValueError(f"step must be a positive number of channels, got {step}")
    return sorted(range(width, 0, -step))


def layer_grid(graph: ChannelGraph, name: str, steps: dict[str, int]) -> list[tuple[int, int]]:
    """All (c_in, c_out) points of layer ``name`` when every group moves by its step."""
    li = graph.layers[name]

    def axis(gid: str | None, full: int) -> list[int]:
        return [full] if gid is None else reachable_widths(graph.groups[gid].width, steps[gid])

    if li.depthwise:
        return [(c, c) for c in axis(li.out_group, li.out_channels)]
    return [(ci, co) for ci in axis(li.in_group, li.in_channels) for co in axis(li.out_group, li.out_channels)]


def enumerate_points(graph: ChannelGraph, units: dict[str, UnitSpec], steps: dict[str, int]
                     ) -> dict[str, list[tuple[int, int]]]:
    """Unit key -> sorted distinct (c_in, c_out) points reachable by any layer using it."""
    points: dict[str, set[tuple[int, int]]] = {}
    for name in graph.layers:
        points.setdefault(units[name].key, set()).update(layer_grid(graph, name, steps))
    return {k: sorted(v) for k, v in sorted(points.items())}
