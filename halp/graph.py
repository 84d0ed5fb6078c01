"""Channel groups and layer geometry of a CNN, found from its traced graph.

A *channel group* is a set of output channels that must be kept or pruned together: all layers
writing into one residual stream, a depthwise conv and the conv feeding it, and so on. We let
Torch-Pruning's ``DependencyGraph`` trace the model and find the coupling, then keep our own small,
serialisable data model on top of it (``ChannelGroup``, ``LayerInfo``). Everything downstream
(masks, latency tables, saliency, solver, slimming) speaks in these terms.
"""
from __future__ import annotations

import dataclasses
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
    ``input_hw``/``output_hw`` come from one traced forward at the graph's input shape.
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

    @property
    def depthwise(self) -> bool:
        return self.kind == "conv" and self.groups > 1 and self.groups == self.in_channels == self.out_channels

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

    @property
    def can_vanish(self) -> bool:
        """Whether width 0 is allowed: the branch then becomes a constant (see ``slim.py``)."""
        return self.residual_block is not None

    @property
    def prunable(self) -> bool:
        return not self.unsupported

    def summary(self) -> dict:
        d = {k: getattr(self, k) for k in ("id", "width", "out_layers", "in_layers", "norms",
                                             "contains_stem", "residual_block", "unsupported")}
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
        order = {n: i for i, n in enumerate(names.values())}
        if not any(isinstance(m, nn.Conv2d) for m in model.modules()):
            raise ValueError(f"{type(model).__name__} has no Conv2d layer: halp prunes CNN channels")
        was_training = model.training
        model.eval()
        try:
            example = torch.randn(1, *input_shape)
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
            g = _to_channel_group(dg, tp_group, names, order)
            if g is not None:
                groups[g.id] = g
        groups = dict(sorted(groups.items(), key=lambda kv: order[kv[0]]))

        in_of: dict[str, str] = {}
        out_of: dict[str, str] = {}
        for g in groups.values():
            for n in g.out_layers:
                out_of[n] = g.id
            for n in g.in_layers:
                in_of[n] = g.id
        layers: dict[str, LayerInfo] = {}
        for name, mod in model.named_modules():
            if not isinstance(mod, LAYER_TYPES) or name not in shapes:
                continue
            layers[name] = _layer_info(name, mod, shapes[name], in_of.get(name), out_of.get(name))
            if layers[name].depthwise:
                layers[name] = dataclasses.replace(layers[name], in_group=out_of.get(name))
        stems = {n for n, li in layers.items() if li.kind == "conv" and li.in_group is None}
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
        return [n for n, li in self.layers.items() if li.kind == "conv" and li.in_group is None]

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

        return {n: (w(li.in_group, li.in_channels), w(li.out_group, li.out_channels))
                for n, li in self.layers.items()}

    def describe(self) -> dict:
        """A JSON-ready description (groups and layers) for ``halp inspect --json`` and logs."""
        return {"input_shape": list(self.input_shape),
                "groups": [g.summary() for g in self.groups.values()],
                "layers": [li.to_dict() for li in self.layers.values()]}


# ---------------------------------------------------------------------- helpers
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


def _to_channel_group(dg: tp.DependencyGraph, tp_group, names: dict, order: dict) -> ChannelGroup | None:
    outs: list[str] = []
    ins: list[str] = []
    norms: list[str] = []
    unsupported: list[str] = []
    members: list[Member] = []
    for item in tp_group:
        dep, idxs = item.dep, item.idxs
        mod = dep.target.module
        name = names.get(mod)
        if name is None:  # Torch-Pruning's own nodes (add, reshape, concat...) carry no weights
            if isinstance(mod, nn.Parameter):
                unsupported.append("nn.Parameter")
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
                unsupported.append(f"grouped conv {name}")
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
    return ChannelGroup(id=outs[0], width=width, out_layers=tuple(outs),
                        in_layers=tuple(sorted(set(ins), key=order.__getitem__)),
                        norms=tuple(sorted(set(norms), key=order.__getitem__)),
                        unsupported=tuple(unsupported), members=tuple(members))


def _enclosing_branch(group: ChannelGroup, blocks: dict) -> str | None:
    """The residual block whose branch holds every layer of ``group``, if any."""
    layers: Iterable[str] = (*group.out_layers, *group.in_layers, *group.norms)
    for block_name, spec in blocks.items():
        prefix = block_name + "."
        shortcut = f"{block_name}.{spec.shortcut}." if spec.shortcut else None
        if all(n.startswith(prefix) and not (shortcut and n.startswith(shortcut)) for n in layers):
            return block_name
    return None
