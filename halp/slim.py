"""Physical slimming: turn a masked network into a smaller plain ``nn.Module``.

The slim model has the kept channels only, so its eval-mode outputs equal the masked model's (a
pruned channel is exactly zero there). Torch-Pruning's pruning functions do the tensor surgery;
residual blocks whose branch lost a whole group become :class:`~halp.residual.ConstantResidual`.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from .graph import ChannelGraph
from .masks import ChannelMasks, MaskApplier
from .residual import ConstantResidual, find_residual_blocks, vanished_blocks


@torch.no_grad()
def _branch_constants(model: nn.Module, blocks: list[str], input_shape: tuple[int, ...]
                      ) -> dict[str, torch.Tensor]:
    """Per-channel output of each vanished branch, read from the masked model in eval mode."""
    specs = find_residual_blocks(model)
    seen: dict[str, torch.Tensor] = {}
    hooks = []
    for name in blocks:
        end = model.get_submodule(f"{name}.{specs[name].branch_end}")

        def hook(_m: nn.Module, _i: tuple, out: torch.Tensor, name: str = name) -> None:
            seen[name] = out.detach().clone()  # the block may add to it in place
        hooks.append(end.register_forward_hook(hook))
    p = next(model.parameters())
    try:  # on the model's device and in its dtype (a pruner may slim a model that trains on a GPU)
        model(torch.randn(2, *input_shape, device=p.device, dtype=p.dtype))
    finally:
        for h in hooks:
            h.remove()
    constants = {}
    for name in blocks:
        out = seen[name]
        const = out[0, :, 0, 0]
        spread = (out - const.view(1, -1, 1, 1)).abs().max()
        if float(spread) > 1e-5 * max(1.0, float(const.abs().max())):
            raise RuntimeError(f"block {name}: its branch still depends on the input after pruning "
                               f"(spread {float(spread):.3g}); cannot replace it by a constant")
        constants[name] = const.clone()
    return constants


def masked_copy(graph: ChannelGraph, masks: ChannelMasks) -> tuple[nn.Module, ChannelGraph]:
    """A deep copy of ``graph.model`` with ``masks`` applied, and the copy's own graph."""
    masks.validate(graph)
    work = copy.deepcopy(graph.model)
    wgraph = ChannelGraph.build(work, graph.input_shape)
    MaskApplier(wgraph, masks).apply()
    return work, wgraph


def slim_model(graph: ChannelGraph, masks: ChannelMasks) -> nn.Module:
    """Return a new, physically smaller copy of ``graph.model`` keeping the channels in ``masks``.

    ``graph.model`` is not modified. The copy is in eval mode if the original was.
    """
    work, wgraph = masked_copy(graph, masks)
    widths = masks.widths()
    gone = vanished_blocks(wgraph, widths)
    was_training = work.training
    work.eval()
    constants = _branch_constants(work, gone, wgraph.input_shape) if gone else {}

    dg = wgraph.dg
    for gid, keep in masks.items():
        pruned = torch.nonzero(~keep).flatten().tolist()
        if not pruned:
            continue
        if len(pruned) == keep.numel():  # the block is replaced below; keep one channel for now
            pruned = pruned[1:]
        root = wgraph.module(gid)
        fn = dg.get_pruner_of_module(root).prune_out_channels
        dg.get_pruning_group(root, fn, pruned).prune()

    specs = find_residual_blocks(work)
    norm_group = {n: gid for gid, g in wgraph.groups.items() for n in g.norms}
    for name in gone:
        spec = specs[name]
        block = work.get_submodule(name)
        const = constants[name]
        stream = norm_group.get(f"{name}.{spec.branch_end}")
        if stream is not None:
            const = const[masks[stream]]
        shortcut = block.get_submodule(spec.shortcut) if spec.shortcut else None
        act = block.get_submodule(spec.post_act) if spec.post_act else None
        parent_name, _, child = name.rpartition(".")
        parent = work.get_submodule(parent_name) if parent_name else work
        setattr(parent, child, ConstantResidual(shortcut, const, act))
    work.train(was_training)
    return work
