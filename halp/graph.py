"""Channel groups and layer geometry of a CNN, found from its traced graph.

A *channel group* is a set of output channels that must be kept or pruned together: all layers
writing into one residual stream, a depthwise conv and the conv feeding it, and so on. We let
Torch-Pruning's ``DependencyGraph`` trace the model and find the coupling, then keep our own small,
serialisable data model on top of it (``ChannelGroup``, ``LayerInfo``). Everything downstream
(masks, latency tables, saliency, solver, slimming) speaks in these terms.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch
import torch_pruning as tp
from torch import nn

from .residual import find_residual_blocks

NORM_TYPES = (nn.modules.batchnorm._BatchNorm,)
LAYER_TYPES = (nn.Conv2d, nn.Linear)


@dataclass(frozen=True)
class LayerInfo:
    """One conv or linear layer: its geometry and which channel groups set its widths.

    ``in_group``/``out_group`` are group ids, or ``None`` where the width is fixed (the image
    channels of the stem, the classifier's outputs). For a depthwise conv both are the same group.
    ``input_hw``/``output_hw`` come from one traced forward at the graph's input shape. A layer
    reading a concatenation of several groups (DenseNet) lists them all in ``in_groups``;
    its ``c_in`` is ``in_fixed`` plus their widths.
    """

    name: str
    kind: str  # "conv" or "linear"
    in_channels: int
    out_channels: int
    kernel: tuple[int, int] = (1, 1)
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1
    bias: bool = False
    input_hw: tuple[int, int] = (1, 1)
    output_hw: tuple[int, int] = (1, 1)
    in_group: str | None = None
    out_group: str | None = None
    in_groups: tuple[str, ...] = ()  # every group feeding the input, when it is a concatenation
    in_fixed: int = 0  # input channels from no group (e.g. the image), when it is a concatenation

    @property
    def depthwise(self) -> bool:
        return self.kind == "conv" and self.groups > 1 and self.groups == self.in_channels == self.out_channels

    @property
    def grouped(self) -> bool:
        """A grouped conv that is not depthwise (RegNet, ResNeXt): ``groups`` stays, widths shrink
        by the same amount in every group."""
        return self.kind == "conv" and self.groups > 1 and not self.depthwise

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Member:
    """One layer's share of a group: which tensor dimension, and the index map to group channels.

    ``positions[k]`` is an index along the layer's dimension and ``channels[k]`` the group channel it
    belongs to (they differ after a flatten or concat).
    """

    layer: str
    role: str  # "out" (conv/linear outputs, incl. depthwise), "in" (inputs), "norm" (BatchNorm)
    positions: torch.Tensor
    channels: torch.Tensor


@dataclass
class ChannelGroup:
    """A prunable set of coupled channels, identified by the name of its first writing layer."""

    id: str
    width: int
    out_layers: tuple[str, ...]
    in_layers: tuple[str, ...]
    norms: tuple[str, ...]
    contains_stem: bool = False
    residual_block: str | None = None  # set when the group lies inside one residual branch
    unsupported: tuple[str, ...] = ()  # member types our masks cannot handle
    members: tuple[Member, ...] = field(default=(), repr=False)
    slices: int = 1  # grouped convs read/write it in this many equal slices; masks repeat per slice

    @property
    def quantum(self) -> int:
        """Fewest channels that can go at once: one position in every slice."""
        return self.slices

    def grid_step(self, step: int) -> int:
        """This group's step on a grid of about ``step`` channels: a multiple of its quantum, at
        most its width; its whole width (one point: it stays) where it cannot be pruned."""
        if not self.prunable:
            return self.width
        q = self.quantum
        return min(self.width, q * max(1, round(step / q)))

    @property
    def can_vanish(self) -> bool:
        """Whether width 0 is allowed: the branch then becomes a constant (see ``slim.py``)."""
        return self.residual_block is not None

    @property
    def prunable(self) -> bool:
        return not self.unsupported

    def summary(self) -> dict:
        d = {k: getattr(self, k) for k in ("id", "width", "out_layers", "in_layers", "norms",
                                             "contains_stem", "residual_block", "unsupported", "slices")}
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def _pair(v: int | Sequence[int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


class ChannelGraph:
    """Channel groups and layer geometry of ``model`` at one input shape.

    Build it with :meth:`build`. The graph stays bound to ``model`` (masks are applied to it); to
    work on a copy of the model build a new graph on the copy.
    """

    def __init__(self, model: nn.Module, input_shape: tuple[int, ...], dg: tp.DependencyGraph,
                 groups: dict[str, ChannelGroup], layers: dict[str, LayerInfo]) -> None:
        self.model = model
        self.input_shape = tuple(input_shape)
        self.dg = dg
        self.groups = groups
        self.layers = layers

    # ------------------------------------------------------------------ construction
    @classmethod
    def build(cls, model: nn.Module, input_shape: Sequence[int]) -> "ChannelGraph":
        """Trace ``model`` on a random ``(1, *input_shape)`` input and collect its channel groups.

        ``input_shape`` is ``(C, H, W)``; the batch dimension is added here.
        """
        input_shape = tuple(int(s) for s in input_shape)
        if len(input_shape) != 3 or min(input_shape) < 1:
            raise ValueError(f"input_shape must be (C, H, W) with positive sizes, got {input_shape}")
        names = {m: n for n, m in model.named_modules()}
        params = {p: n for n, p in model.named_parameters()}
        order = {n: i for i, n in enumerate(names.values())}
        if not any(isinstance(m, nn.Conv2d) for m in model.modules()):
            raise ValueError(f"{type(model).__name__} has no Conv2d layer: halp prunes CNN channels")
        was_training = model.training
        model.eval()
        try:
            first = next(model.parameters(), None)  # trace where the model lives, in its precision
            example = torch.randn(1, *input_shape) if first is None else \
                torch.randn(1, *input_shape, device=first.device, dtype=first.dtype)
            shapes = _trace_shapes(model, example)
            try:
                with torch.enable_grad():
                    dg = tp.DependencyGraph().build_dependency(model, example_inputs=example, verbose=False)
            except Exception as e:  # Torch-Pruning's errors are deep; say what failed and where
                raise ValueError(f"cannot trace the channel dependencies of {type(model).__name__}: "
                                 f"{type(e).__name__}: {e}") from e
        finally:
            model.train(was_training)

        groups: dict[str, ChannelGroup] = {}
        for tp_group in dg.get_all_groups(root_module_types=LAYER_TYPES):
            g = _to_channel_group(dg, tp_group, names, order, params)
            if g is not None:
                groups[g.id] = g
        groups = dict(sorted(groups.items(), key=lambda kv: order[kv[0]]))

        out_of: dict[str, str] = {}
        for g in groups.values():
            for mem in g.members:  # a layer writing part of a group keeps its own width (fixed)
                if mem.role == "out" and len(mem.positions) == g.width:
                    out_of[mem.layer] = g.id
        parts = input_parts(groups)
        fed = {mem.layer for g in groups.values() for mem in g.members if mem.role == "in"}
        layers: dict[str, LayerInfo] = {}
        for name, mod in model.named_modules():
            if not isinstance(mod, LAYER_TYPES) or name not in shapes:
                continue
            feeding = parts.get(name, {})
            li = _layer_info(name, mod, shapes[name], next(iter(feeding), None), out_of.get(name))
            if li.depthwise:
                li = dataclasses.replace(li, in_group=out_of.get(name))
            elif len(feeding) > 1 or sum(feeding.values()) != li.in_channels and feeding:
                li = dataclasses.replace(li, in_groups=tuple(feeding),
                                         in_fixed=li.in_channels - sum(feeding.values()))
            layers[name] = li
        stems = {n for n, li in layers.items() if _reads_image(n, li, fed)}
        blocks = find_residual_blocks(model)
        for g in groups.values():
            g.contains_stem = any(n in stems for n in g.out_layers)
            g.residual_block = _enclosing_branch(g, blocks)
        return cls(model, input_shape, dg, groups, layers)

    # ------------------------------------------------------------------ queries
    def module(self, name: str) -> nn.Module:
        return self.model.get_submodule(name)

    @property
    def stem_layers(self) -> list[str]:
        """Convs reading the image: their input channels are never pruned."""
        fed = {mem.layer for g in self.groups.values() for mem in g.members if mem.role == "in"}
        return [n for n, li in self.layers.items() if _reads_image(n, li, fed)]

    @property
    def output_layers(self) -> list[str]:
        """Layers whose outputs are network outputs (e.g. the classifier): never pruned."""
        return [n for n, li in self.layers.items() if li.out_group is None]

    def full_widths(self) -> dict[str, int]:
        return {gid: g.width for gid, g in self.groups.items()}

    def prunable_groups(self, include_stem: bool = True) -> list[ChannelGroup]:
        return [g for g in self.groups.values()
                if g.prunable and (include_stem or not g.contains_stem)]

    def layer_widths(self, widths: dict[str, int]) -> dict[str, tuple[int, int]]:
        """(c_in, c_out) of every layer under group widths ``widths`` (missing ids: full width)."""
        def w(gid: str | None, full: int) -> int:
            return full if gid is None else int(widths.get(gid, self.groups[gid].width))

        def cin(li: LayerInfo) -> int:
            if li.in_groups:
                return li.in_fixed + sum(w(g, self.groups[g].width) for g in li.in_groups)
            return w(li.in_group, li.in_channels)

        return {n: (cin(li), w(li.out_group, li.out_channels)) for n, li in self.layers.items()}

    def norm_widths(self, widths: dict[str, int]) -> dict[str, int]:
        """Channels of every BatchNorm that a group touches, under group ``widths`` (a norm over a
        concatenation counts every group in it)."""
        out: dict[str, int] = {}
        for name, feeding in input_parts(self.groups, role="norm").items():
            full = self.model.get_submodule(name).num_features
            out[name] = full - sum(feeding.values()) + sum(
                int(widths.get(g, self.groups[g].width)) * n // self.groups[g].width for g, n in feeding.items())
        return out

    def describe(self) -> dict:
        """A JSON-ready description (groups and layers) for ``halp inspect --json`` and logs."""
        return {"input_shape": list(self.input_shape),
                "groups": [g.summary() for g in self.groups.values()],
                "layers": [li.to_dict() for li in self.layers.values()]}


# ---------------------------------------------------------------------- helpers
def input_parts(groups: dict[str, ChannelGroup], role: str = "in") -> dict[str, dict[str, int]]:
    """For every layer (``role="in"``: its input; ``"norm"``: a BatchNorm) the groups that feed
    it, in order of their first position, with how many of its channels each one sets."""
    found: dict[str, list[tuple[int, str, int]]] = {}
    for g in groups.values():
        for mem in g.members:  # only whole groups: a reader of a slice keeps its own width (fixed)
            if mem.role == role and len(mem.positions) == g.width:
                found.setdefault(mem.layer, []).append((int(mem.positions.min()), g.id, len(mem.positions)))
    out: dict[str, dict[str, int]] = {}
    for layer, v in found.items():
        parts = out.setdefault(layer, {})
        for _, gid, n in sorted(v):
            parts[gid] = parts.get(gid, 0) + n
    return out


def _trace_shapes(model: nn.Module, example: torch.Tensor) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
    """Input and output shapes of every conv/linear from one forward (first call if reused)."""
    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}
    hooks = []
    running: list[str] = []  # modules entered and not yet left: the innermost one failed

    def leave(*_: object) -> None:
        running.pop()

    for name, mod in model.named_modules():
        if name:
            hooks.append(mod.register_forward_pre_hook(lambda m, i, name=name: running.append(name)))
            hooks.append(mod.register_forward_hook(leave))
        if isinstance(mod, LAYER_TYPES):
            def hook(m: nn.Module, inp: tuple, out: torch.Tensor, name: str = name) -> None:
                if name not in shapes and isinstance(out, torch.Tensor):
                    shapes[name] = (tuple(inp[0].shape), tuple(out.shape))
            hooks.append(mod.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(example)
    except Exception as e:
        where = f"layer {running[-1]!r} ({type(model.get_submodule(running[-1])).__name__})" if running else "the model"
        raise ValueError(f"{where} failed on an input of shape {tuple(example.shape)}: "
                         f"{type(e).__name__}: {str(e).splitlines()[0]} (wrong --input-shape?)") from e
    finally:
        for h in hooks:
            h.remove()
    return shapes


def _layer_info(name: str, mod: nn.Module, shapes: tuple, in_group: str | None,
                out_group: str | None) -> LayerInfo:
    in_shape, out_shape = shapes
    if isinstance(mod, nn.Conv2d):
        return LayerInfo(name, "conv", mod.in_channels, mod.out_channels, _pair(mod.kernel_size),
                         _pair(mod.stride), _pair(mod.padding) if not isinstance(mod.padding, str)
                         else (mod.kernel_size[0] // 2, mod.kernel_size[1] // 2),
                         _pair(mod.dilation), mod.groups, mod.bias is not None,
                         (in_shape[-2], in_shape[-1]), (out_shape[-2], out_shape[-1]), in_group, out_group)
    assert isinstance(mod, nn.Linear)
    return LayerInfo(name, "linear", mod.in_features, mod.out_features, bias=mod.bias is not None,
                     in_group=in_group, out_group=out_group)


def _to_channel_group(dg: tp.DependencyGraph, tp_group, names: dict, order: dict,
                      params: dict | None = None) -> ChannelGroup | None:
    outs: list[str] = []
    ins: list[str] = []
    norms: list[str] = []
    unsupported: list[str] = []
    members: list[Member] = []
    slices = 1
    for item in tp_group:
        dep, idxs = item.dep, item.idxs
        mod = dep.target.module
        name = names.get(mod)
        if name is None:  # Torch-Pruning's own nodes (add, reshape, concat...) carry no weights
            if isinstance(mod, nn.Parameter):  # e.g. a layer scale: masks cannot follow it
                unsupported.append(f"nn.Parameter {(params or {}).get(mod, '?')}")
            continue
        is_out = dg.is_out_channel_pruning_fn(dep.handler)
        pos = torch.as_tensor(list(idxs), dtype=torch.long)
        chans = torch.as_tensor(list(item.root_idxs), dtype=torch.long)
        if isinstance(mod, NORM_TYPES):
            role = "norm"
            norms.append(name)
        elif isinstance(mod, LAYER_TYPES):
            role = "out" if is_out else "in"
            if isinstance(mod, nn.Conv2d) and mod.groups > 1 and not (
                    mod.groups == mod.in_channels == mod.out_channels):
                # a grouped conv: the same positions go in each of its groups (Torch-Pruning's way)
                if not torch.equal(pos, chans) or len(pos) != (mod.out_channels if is_out else mod.in_channels):
                    unsupported.append(f"grouped conv {name} on part of a concatenation")
                slices = math.lcm(slices, mod.groups)
            (outs if is_out else ins).append(name)
        else:
            if any(True for _ in mod.parameters(recurse=False)) or list(mod.buffers(recurse=False)):
                unsupported.append(f"{type(mod).__name__} {name}")
            continue
        members.append(Member(name, role, pos, chans))
    if not outs:
        return None
    if not ins:
        # Nothing reads these channels: they are network outputs (classifier, detection head).
        return None
    outs.sort(key=order.__getitem__)
    width = int(dg.get_out_channels(dg.model.get_submodule(outs[0])))
    if width % slices:
        unsupported.append(f"grouped convs need multiples of {slices} channels, the group has {width}")
    for mem in members:
        # every member must hold the whole group once: a layer writing part of it (a concatenated
        # output, as in GhostNet's ghost module) or reading a slice of it has widths of its own
        mod = dg.model.get_submodule(mem.layer)
        size = _dim_size(mod, mem.role)
        whole = len(mem.positions) == width and torch.equal(torch.sort(mem.channels).values, torch.arange(width))
        if not whole or (len(mem.positions) and int(mem.positions.max()) >= size):
            verb = {"out": "writes", "in": "reads", "norm": "normalises"}[mem.role]
            unsupported.append(f"{type(mod).__name__} {mem.layer} {verb} only part of the group's channels "
                               f"(a concatenation or slice, e.g. a ghost module)")
            break
    return ChannelGroup(id=outs[0], width=width, out_layers=tuple(outs),
                        in_layers=tuple(sorted(set(ins), key=order.__getitem__)),
                        norms=tuple(sorted(set(norms), key=order.__getitem__)),
                        unsupported=tuple(unsupported), members=tuple(members), slices=slices)


def _dim_size(mod: nn.Module, role: str) -> int:
    """Size of the dimension a member's positions index."""
    if role == "norm":
        return int(mod.num_features)
    if isinstance(mod, nn.Linear):
        return mod.out_features if role == "out" else mod.in_features
    return mod.out_channels if role == "out" else mod.in_channels


def _enclosing_branch(group: ChannelGroup, blocks: dict) -> str | None:
    """The residual block whose branch holds every layer of ``group``, if any."""
    layers: Iterable[str] = (*group.out_layers, *group.in_layers, *group.norms)
    for block_name, spec in blocks.items():
        prefix = block_name + "."
        shortcut = f"{block_name}.{spec.shortcut}." if spec.shortcut else None
        if all(n.startswith(prefix) and not (shortcut and n.startswith(shortcut)) for n in layers):
            return block_name
    return None


def _reads_image(name: str, li: LayerInfo, fed: set[str]) -> bool:
    """A conv that no channel group feeds (a depthwise conv is fed through the group it shares)."""
    return li.kind == "conv" and name not in fed and li.in_group is None and not li.in_groups
