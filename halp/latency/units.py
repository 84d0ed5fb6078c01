"""The units a latency table measures, and the (c_in, c_out) points each can reach.

A *unit* is what really runs for one conv layer: the conv, plus the BatchNorm, activation and
pooling layer that directly follow it in execution order (measured together, as the device runs
them; a ResNet's stem max-pool alone costs several ms on a CPU and scales with the stem's width).
Linear layers are units too. A unit's ``UnitSpec`` holds everything but the two widths, so layers with the same
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
POOLS = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)


def pool_code(m: nn.Module) -> str:
    """A pooling layer as a short string, e.g. ``MaxPool2d:3:2:1`` or ``AdaptiveAvgPool2d:1``."""
    if isinstance(m, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)):
        size = m.output_size if isinstance(m.output_size, int) else "x".join(map(str, m.output_size))
        return f"{type(m).__name__}:{size}"
    k, s, p = (v if isinstance(v, int) else v[0] for v in (m.kernel_size, m.stride, m.padding))
    return f"{type(m).__name__}:{k}:{s}:{p}"


def pool_module(code: str) -> nn.Module:
    kind, *args = code.split(":")
    if kind.startswith("Adaptive"):
        size = tuple(int(v) for v in args[0].split("x"))
        return getattr(nn, kind)(size[0] if len(size) == 1 else size)
    k, s, p = (int(v) for v in args)
    return getattr(nn, kind)(k, s, p)


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
    pool: str | None = None
    groups: int = 1  # a grouped conv (not depthwise) keeps its groups; widths are multiples of it

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
        if self.groups > 1:
            parts.append(f"g{self.groups}")
        parts.append(f"hw{hw[0]}x{hw[1]}")
        if self.bias:
            parts.append("b")
        if self.norm:
            parts.append("bn")
        if self.act:
            parts.append(self.act)
        if self.pool:
            parts.append(self.pool.replace(":", "-"))
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
        if cin % self.groups or cout % self.groups:
            raise ValueError(f"a unit with {self.groups} groups needs widths divisible by it, got {cin}, {cout}")
        layers: list[nn.Module] = [nn.Conv2d(cin, cout, self.kernel, self.stride, self.padding,
                                             self.dilation, groups=cin if self.depthwise else self.groups,
                                             bias=self.bias)]
        if fused and self.norm:
            bn = nn.BatchNorm2d(cout)
            with torch.no_grad():  # non-trivial statistics, like a trained network
                bn.running_var.uniform_(0.5, 1.5)
                bn.running_mean.normal_(0, 0.1)
            layers.append(bn)
        if fused and self.act:
            layers.append(getattr(nn, self.act)())
        if fused and self.pool:
            layers.append(pool_module(self.pool))
        return nn.Sequential(*layers).eval()

    @property
    def fused(self) -> bool:
        """Whether the unit is more than the conv alone."""
        return bool(self.norm or self.act or self.pool)

    def example_input(self, batch: int, cin: int) -> torch.Tensor:
        if self.kind == "linear":
            return torch.randn(batch, cin)
        return torch.randn(batch, cin, *self.input_hw)


def _execution_order(model: nn.Module, input_shape: tuple[int, ...]) -> list[nn.Module]:
    """Convs, linears, BNs and activations in the order a forward calls them."""
    order: list[nn.Module] = []
    kinds = (nn.Conv2d, nn.Linear, nn.modules.batchnorm._BatchNorm) + ACTIVATIONS + POOLS
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
    follows: dict[int, tuple[bool, str | None, str | None]] = {}
    for i, mod in enumerate(order):
        if not isinstance(mod, nn.Conv2d) or id(mod) in follows:
            continue
        norm, act, pool = False, None, None
        j = i + 1
        if j < len(order) and isinstance(order[j], nn.modules.batchnorm._BatchNorm) \
                and order[j].num_features == mod.out_channels:
            norm, j = True, j + 1
        if j < len(order) and isinstance(order[j], ACTIVATIONS):
            act, j = type(order[j]).__name__, j + 1
        if j < len(order) and isinstance(order[j], POOLS):
            pool = pool_code(order[j])
        follows[id(mod)] = (norm, act, pool)
    units = {}
    for name, li in graph.layers.items():
        units[name] = unit_of(li, *follows.get(id(graph.module(name)), (False, None, None)))
    return units


def unit_of(li: LayerInfo, norm: bool = False, act: str | None = None, pool: str | None = None) -> UnitSpec:
    if li.kind == "linear":
        return UnitSpec("linear", bias=li.bias)
    return UnitSpec("conv", li.kernel, li.stride, li.padding, li.dilation, li.depthwise, li.bias,
                    li.input_hw, norm, act, pool, groups=li.groups if li.grouped else 1)


def reachable_widths(width: int, step: int) -> list[int]:
    """Widths a group of ``width`` channels can take when pruned ``step`` channels at a time:
    ``width, width - step, ...`` down to the smallest positive one (ascending)."""
    if step < 1:
        raise ValueError(f"step must be a positive number of channels, got {step}")
    return sorted(range(width, 0, -step))


def smallest_widths(graph: ChannelGraph, steps: dict[str, int]) -> dict[str, int]:
    """Every group at the smallest width its grid reaches."""
    return {gid: reachable_widths(g.width, steps[gid])[0] for gid, g in graph.groups.items()}


def layer_grid(graph: ChannelGraph, name: str, steps: dict[str, int]) -> list[tuple[int, int]]:
    """All (c_in, c_out) points of layer ``name`` when every group moves by its step."""
    li = graph.layers[name]

    def axis(gid: str | None, full: int) -> list[int]:
        return [full] if gid is None else reachable_widths(graph.groups[gid].width, steps[gid])

    if li.depthwise:
        return [(c, c) for c in axis(li.out_group, li.out_channels)]
    if li.in_groups:  # a concatenation: every sum of its groups' reachable widths
        sums = {li.in_fixed}
        for gid in li.in_groups:
            sums = {a + b for a in sums for b in axis(gid, 0)}
        cins = sorted(sums)
    else:
        cins = axis(li.in_group, li.in_channels)
    return [(ci, co) for ci in cins for co in axis(li.out_group, li.out_channels)]


def enumerate_points(graph: ChannelGraph, units: dict[str, UnitSpec], steps: dict[str, int]
                     ) -> dict[str, list[tuple[int, int]]]:
    """Unit key -> sorted distinct (c_in, c_out) points reachable by any layer using it."""
    points: dict[str, set[tuple[int, int]]] = {}
    for name in graph.layers:
        points.setdefault(units[name].key, set()).update(layer_grid(graph, name, steps))
    return {k: sorted(v) for k, v in sorted(points.items())}
