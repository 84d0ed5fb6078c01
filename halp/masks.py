"""Per-group channel keep-masks: apply them while training, and save/load them.

``ChannelMasks`` is plain data (group id -> bool keep vector) and serialises to a small versioned
JSON file keyed by group ids (layer names), so another process can load it onto a fresh model.
``MaskApplier`` binds masks to a :class:`~halp.graph.ChannelGraph` and zeroes the pruned channels'
conv/linear weights and biases and BatchNorm weight, bias, running mean and running variance, and
the matching optimizer state (SGD momentum, Adam moments), so a pruned channel stays exactly zero.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator, Mapping

import torch
from torch import nn

from .fileio import atomic_write_text
from .graph import ChannelGraph

MASK_FORMAT = "halp-channel-masks"
MASK_VERSION = 1


def _ranges(idx: list[int]) -> str:
    """[0,1,2,5,7,8] -> "0-2,5,7-8" (readable and short)."""
    parts: list[str] = []
    start = prev = None
    for i in idx:
        if start is None:
            start = prev = i
        elif i == prev + 1:
            prev = i
        else:
            parts.append(f"{start}-{prev}" if prev != start else f"{start}")
            start = prev = i
    if start is not None:
        parts.append(f"{start}-{prev}" if prev != start else f"{start}")
    return ",".join(parts)


def _parse_ranges(text: str, width: int, where: str) -> list[int]:
    out: list[int] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        a, _, b = part.partition("-")
        lo, hi = int(a), int(b or a)
        if not 0 <= lo <= hi < width:
            raise ValueError(f"{where}: channel range {part!r} outside 0..{width - 1}")
        out.extend(range(lo, hi + 1))
    return out


class ChannelMasks(Mapping[str, torch.Tensor]):
    """Keep-masks by group id. ``masks[gid]`` is a bool tensor of the group's full width."""

    def __init__(self, keep: Mapping[str, torch.Tensor], model: str | None = None) -> None:
        self._keep = {k: torch.as_tensor(v, dtype=torch.bool).clone() for k, v in keep.items()}
        self.model = model  # the model they were made for, where known (a mask file's "model")

    # Mapping protocol
    def __getitem__(self, gid: str) -> torch.Tensor:
        return self._keep[gid]

    def __iter__(self) -> Iterator[str]:
        return iter(self._keep)

    def __len__(self) -> int:
        return len(self._keep)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ChannelMasks):
            return NotImplemented
        return self._keep.keys() == other._keep.keys() and all(
            torch.equal(self._keep[k], other._keep[k]) for k in self._keep)

    @classmethod
    def full(cls, graph: ChannelGraph) -> "ChannelMasks":
        """Everything kept."""
        return cls({gid: torch.ones(g.width, dtype=torch.bool) for gid, g in graph.groups.items()})

    @classmethod
    def prefix(cls, graph: ChannelGraph, widths: dict[str, int]) -> "ChannelMasks":
        """Masks keeping the first ``widths[gid]`` channels of every group (for timing only; the
        first ``widths[gid] / slices`` of every slice where grouped convs slice the group)."""
        keep = {}
        for gid, g in graph.groups.items():
            m = torch.zeros(g.slices, g.width // g.slices, dtype=torch.bool)
            m[:, : widths[gid] // g.slices] = True
            keep[gid] = m.flatten()
        return cls(keep)

    @classmethod
    def random(cls, graph: ChannelGraph, generator: torch.Generator, min_width: int = 1,
               vanish_prob: float = 0.0, include_stem: bool = True) -> "ChannelMasks":
        """Random masks for tests and ``halp inspect``: each group keeps a uniform random count
        in ``[min_width, width]`` of randomly chosen channels; a group inside a residual branch is
        emptied instead with probability ``vanish_prob``.
        """
        keep = {}
        for gid, g in graph.groups.items():
            if not g.prunable or (g.contains_stem and not include_stem):
                keep[gid] = torch.ones(g.width, dtype=torch.bool)
                continue
            per = g.width // g.slices  # positions per slice; the same ones go in every slice
            n = int(torch.randint(min(-(-min_width // g.slices), per), per + 1, (1,), generator=generator))
            if g.can_vanish and float(torch.rand((), generator=generator)) < vanish_prob:
                n = 0
            m = torch.zeros(per, dtype=torch.bool)
            m[torch.randperm(per, generator=generator)[:n]] = True
            keep[gid] = m.repeat(g.slices)
        return cls(keep)

    @classmethod
    def top_k(cls, graph: ChannelGraph, scores: Mapping[str, torch.Tensor], widths: Mapping[str, int]
              ) -> "ChannelMasks":
        """Keep the ``widths[gid]`` highest-scoring channels of each group in ``widths`` (ties go to
        the lower channel index); other groups keep everything."""
        keep = {}
        for gid, g in graph.groups.items():
            m = torch.ones(g.width, dtype=torch.bool)
            if gid in widths:
                k = int(widths[gid])
                if not 0 <= k <= g.width or k % g.slices:
                    raise ValueError(f"group {gid}: cannot keep {k} of {g.width} channels"
                                     + (f" (a multiple of its {g.slices} conv groups)" if g.slices > 1 else ""))
                s = scores[gid].reshape(g.slices, -1).sum(0)  # a position's score over every slice
                order = sorted(range(len(s)), key=lambda i: (-float(s[i]), i))
                m = torch.zeros(len(s), dtype=torch.bool)
                m[order[:k // g.slices]] = True
                m = m.repeat(g.slices)
            keep[gid] = m
        return cls(keep)

    def widths(self) -> dict[str, int]:
        return {gid: int(m.sum()) for gid, m in self._keep.items()}

    def pruned(self, gid: str) -> list[int]:
        return torch.nonzero(~self._keep[gid]).flatten().tolist()

    def validate(self, graph: ChannelGraph, exact: bool = False) -> None:
        """Raise ``ValueError`` unless these masks fit ``graph`` (ids, widths, empty groups).
        With ``exact``, they must also name every group of ``graph`` (a mask set for a whole model)."""
        whose = f" (masks for {self.model})" if self.model else " (masks from another model?)"
        unknown = sorted(set(self._keep) - set(graph.groups))
        if unknown:
            raise ValueError(f"masks name groups the model does not have: {unknown[:5]}"
                             f"{' ...' if len(unknown) > 5 else ''}{whose}")
        missing = [gid for gid in graph.groups if gid not in self._keep] if exact else []
        if missing:
            raise ValueError(f"masks lack {len(missing)} group(s) the model has: {missing[:5]}"
                             f"{' ...' if len(missing) > 5 else ''}{whose}")
        for gid, m in self._keep.items():
            g = graph.groups[gid]
            if m.numel() != g.width:
                raise ValueError(f"group {gid}: mask has {m.numel()} channels, model has {g.width}"
                                 + (whose if exact else ""))
            if not bool(m.any()) and not g.can_vanish:
                raise ValueError(f"group {gid} would keep no channel; only groups inside a residual "
                                 "branch may be pruned to zero")
            if not g.prunable and not bool(m.all()):
                raise ValueError(f"group {gid} cannot be pruned: {', '.join(g.unsupported)}")
            if g.slices > 1 and not bool((m.view(g.slices, -1) == m.view(g.slices, -1)[0]).all()):
                convs = [n for n in (*g.out_layers, *g.in_layers) if _grouped(graph.module(n))]
                raise ValueError(f"group {gid}: grouped conv {convs[0] if convs else '?'} needs the same channels "
                                 f"kept in each of its {g.slices} slices of {g.width // g.slices}")

    def check_model(self, graph: ChannelGraph, model_name: str) -> None:
        """Raise ``ValueError`` unless these masks were made for ``model_name`` (where their file
        names a model; ``resnet20`` is ``halp:resnet20``) and match ``graph``'s groups exactly."""
        def canon(name: str) -> str:
            return name if ":" in name else f"halp:{name}"
        if self.model and canon(self.model) != canon(model_name):
            raise ValueError(f"these masks belong to {self.model}, not {model_name}: "
                             f"use them with {self.model}")
        self.validate(graph, exact=True)

    # ------------------------------------------------------------------ files
    def to_dict(self, model_name: str | None = None) -> dict:
        """``model_name`` defaults to the model these masks were loaded for."""
        return {"format": MASK_FORMAT, "version": MASK_VERSION, "model": model_name or self.model,
                "groups": {gid: {"width": int(m.numel()), "kept": int(m.sum()),
                                 "pruned": _ranges(self.pruned(gid))}
                           for gid, m in self._keep.items()}}

    @classmethod
    def from_dict(cls, data: dict) -> "ChannelMasks":
        if data.get("format") != MASK_FORMAT:
            raise ValueError(f"not a halp mask file (format={data.get('format')!r})")
        if data.get("version") != MASK_VERSION:
            raise ValueError(f"mask file version {data.get('version')} is not supported "
                             f"(this halp reads version {MASK_VERSION})")
        keep = {}
        for gid, g in data["groups"].items():
            m = torch.ones(int(g["width"]), dtype=torch.bool)
            m[_parse_ranges(g.get("pruned", ""), int(g["width"]), f"group {gid}")] = False
            if "kept" in g and int(m.sum()) != int(g["kept"]):
                raise ValueError(f"group {gid}: 'kept'={g['kept']} disagrees with 'pruned'")
            keep[gid] = m
        model = data.get("model")
        return cls(keep, model=str(model) if model else None)

    def save(self, path: str | os.PathLike, model_name: str | None = None) -> Path:
        """Write atomically (temp file + rename): a crash never leaves half a mask file."""
        return atomic_write_text(path, json.dumps(self.to_dict(model_name), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ChannelMasks":
        try:
            with open(path) as f:
                data = json.load(f)
            return cls.from_dict(data)
        except FileNotFoundError:
            raise FileNotFoundError(f"mask file {path} does not exist") from None
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError, ValueError) as e:
            raise ValueError(f"corrupt or foreign mask file {path}: {e}") from None


class MaskApplier:
    """Zeroes pruned channels in a graph's model (and optimizer state) for the given masks."""

    def __init__(self, graph: ChannelGraph, masks: ChannelMasks) -> None:
        masks.validate(graph)
        self.graph = graph
        self.masks = masks
        # (module, tensor name, dim, indices): tensors are looked up when used, because moving the
        # model to another device replaces its buffers (parameters keep their identity)
        self._targets: list[tuple[nn.Module, str, int, torch.Tensor]] = []
        for gid, keep in masks.items():
            if bool(keep.all()):
                continue
            pruned = ~keep
            for mem in graph.groups[gid].members:
                sel = pruned[mem.channels]
                if not bool(sel.any()):
                    continue
                idx = mem.positions[sel]
                mod = graph.module(mem.layer)
                if mem.role == "in" and _grouped(mod):  # weight dim 1 holds one conv group's inputs
                    idx = torch.unique(idx % (mod.in_channels // mod.groups))
                for name, dim in _tensors_for(mod, mem.role):
                    self._targets.append((mod, name, dim, idx))
        self._on_device: dict[tuple[int, torch.device], torch.Tensor] = {}

    def _index(self, k: int, device: torch.device) -> torch.Tensor:
        """Target ``k``'s indices on ``device``, copied there once (not once per iteration)."""
        key = (k, device)
        if key not in self._on_device:
            self._on_device[key] = self._targets[k][3].to(device)
        return self._on_device[key]

    def tensors(self) -> list[tuple[torch.Tensor, int, torch.Tensor]]:
        """(tensor, dim, pruned indices on the tensor's device) for every masked tensor."""
        out = []
        for k, (mod, name, dim, _) in enumerate(self._targets):
            tensor = getattr(mod, name)
            out.append((tensor, dim, self._index(k, tensor.device)))
        return out

    @torch.no_grad()
    def apply(self) -> None:
        """Zero the pruned channels; call after every optimizer step."""
        for tensor, dim, idx in self.tensors():
            tensor.index_fill_(dim, idx, 0)

    @torch.no_grad()
    def clear_optimizer_state(self, optimizer: torch.optim.Optimizer) -> None:
        """Zero momentum / moment buffers of pruned channels so they cannot drift back."""
        for tensor, dim, idx in self.tensors():
            state = optimizer.state.get(tensor) if isinstance(tensor, nn.Parameter) else None
            if not state:
                continue
            for value in state.values():
                if isinstance(value, torch.Tensor) and value.shape == tensor.shape:
                    value.index_fill_(dim, idx.to(value.device), 0)


def _grouped(mod: nn.Module) -> bool:
    return isinstance(mod, nn.Conv2d) and mod.groups > 1 and not mod.groups == mod.in_channels == mod.out_channels


def _tensors_for(mod: nn.Module, role: str) -> list[tuple[str, int]]:
    """(tensor name, channel dim) of the tensors of ``mod`` that a member of ``role`` masks."""
    if role == "norm":
        names = ("weight", "bias", "running_mean", "running_var")
        return [(n, 0) for n in names if getattr(mod, n, None) is not None]
    if role == "out":
        return [("weight", 0)] + ([("bias", 0)] if mod.bias is not None else [])
    return [("weight", 1)]
