"""Any CNN a user names: one model per family, from torchvision and timm, goes through the whole
library path on a small input: channel graph, random masks, slim round trip (masked outputs and
counted parameters against the slim model), and HALP pruning steps on a tiny synthetic cost model,
after which the slim model again matches the masked one. Constructs that cannot be pruned
(LayerNorm over channels, ghost modules' partial concatenations) leave their groups at full width
and must not stop the rest."""
from __future__ import annotations

import pytest
import torch

from halp.counting import count
from halp.graph import ChannelGraph
from halp.latency.cost import CostModel
from halp.masks import ChannelMasks
from halp.models import create_model
from halp.pruners import HalpConfig, HalpPruner, PruneConfig
from halp.roundtrip import roundtrip
from halp.slim import masked_copy, slim_model

from conftest import synthetic_table

# name, family, input (C, H, W), whether some group is expected to stay unprunable
ZOO = [
    ("torchvision:resnet18", "plain residual", (3, 32, 32), False),
    ("torchvision:resnet50", "bottleneck", (3, 32, 32), False),
    ("torchvision:mobilenet_v2", "depthwise-separable", (3, 32, 32), False),
    ("timm:mobilenetv3_small_100", "squeeze-excitation, hard-swish", (3, 32, 32), False),
    ("timm:regnetx_002", "grouped conv (RegNet)", (3, 32, 32), False),
    ("torchvision:resnext50_32x4d", "grouped conv (ResNeXt)", (3, 32, 32), False),
    ("timm:densenet121", "dense connections", (3, 32, 32), False),
    ("timm:convnext_atto", "ConvNeXt (LayerNorm, layer scale)", (3, 32, 32), True),
    ("timm:efficientnet_b0", "EfficientNet (SE, SiLU)", (3, 32, 32), False),
    ("timm:ghostnet_100", "ghost modules (partial concatenations)", (3, 32, 32), True),
]


def mac_cost(spec, ci, co):  # a cost model shaped like MACs, so that every layer's width matters
    k = spec.kernel[0] * spec.kernel[1]
    per_out = k if spec.depthwise else k * ci / max(spec.groups, 1)
    return 1e-4 * co * per_out * spec.input_hw[0] * spec.input_hw[1] / max(spec.stride[0] * spec.stride[1], 1) + 0.01


@pytest.mark.parametrize("name,family,shape,some_fixed", ZOO, ids=[z[0] for z in ZOO])
def test_family_prunes_end_to_end(name, family, shape, some_fixed):
    torch.manual_seed(0)
    model = create_model(name, num_classes=10, in_chans=shape[0]).eval()
    graph = ChannelGraph.build(model, shape)
    prunable = graph.prunable_groups(include_stem=False)
    assert prunable, f"{family}: nothing prunable"
    assert any(not g.prunable for g in graph.groups.values()) == some_fixed, \
        [(g.id, g.unsupported) for g in graph.groups.values() if not g.prunable][:3]
    assert count(graph).params == sum(p.numel() for p in model.parameters())

    rt = roundtrip(graph, seed=1)
    assert rt.ok, rt.problem()

    cost = CostModel.create(graph, synthetic_table(graph, mac_cost, step=8), overhead="none")
    pruner = HalpPruner(graph, cost, PruneConfig(target=0.6, steps=2, chunk=8, allow_vanish=True), HalpConfig())
    gen = torch.Generator().manual_seed(0)
    for _ in range(2):
        pruner.saliency.sums = {g.id: torch.rand(g.width, generator=gen, dtype=torch.float64) for g in pruner.groups}
        pruner.saliency.count = 1
        pruner.prune_step()
    last = pruner.log[-1]
    assert last.predicted_ms <= last.target_ms * (1 + 1e-9)
    masks = pruner.masks
    masks.validate(graph, exact=True)
    for g in graph.groups.values():  # fixed groups stay whole; grouped convs keep equal slices
        m = masks[g.id]
        assert g.prunable or bool(m.all())
        assert bool((m.view(g.slices, -1) == m.view(g.slices, -1)[0]).all())
    assert sum(masks.widths().values()) < sum(graph.full_widths().values())

    masked, _ = masked_copy(graph, masks)
    slim = slim_model(graph, masks).eval()
    x = torch.randn(2, *shape)
    with torch.no_grad():
        a, b = masked.eval()(x), slim(x)
    assert float((a - b).abs().max()) <= 1e-4 * max(1.0, float(a.abs().max()))
    assert sum(p.numel() for p in slim.parameters()) == count(graph, masks.widths()).params


def test_grouped_convs_keep_their_groups_and_prune_every_group_alike():
    torch.manual_seed(0)
    graph = ChannelGraph.build(create_model("timm:regnetx_002", num_classes=10).eval(), (3, 32, 32))
    sliced = [g for g in graph.groups.values() if g.slices > 1]
    assert sliced and all(g.prunable and g.width % g.slices == 0 for g in sliced)
    g = sliced[-1]
    per = g.width // g.slices
    keep = torch.zeros(g.slices, per, dtype=torch.bool)
    keep[:, : per // 2] = True
    masks = ChannelMasks({**ChannelMasks.full(graph), g.id: keep.flatten()})
    slim = slim_model(graph, masks)
    convs = [n for n in (*g.out_layers, *g.in_layers) if graph.layers[n].grouped]
    assert convs
    for conv in convs:
        mod = slim.get_submodule(conv)
        assert mod.groups == graph.layers[conv].groups  # the groups stay, each one narrower
        narrowed = mod.out_channels if conv in g.out_layers else mod.in_channels
        assert narrowed == g.slices * (per // 2)
    uneven = keep.clone()
    uneven[0, -1] = True  # one slice keeps more than the others
    with pytest.raises(ValueError, match=f"grouped conv .* same channels kept in each of its {g.slices} slices"):
        ChannelMasks({**ChannelMasks.full(graph), g.id: uneven.flatten()}).validate(graph)


def test_regnet_branches_can_vanish_and_slim_like_the_masked_model():
    """timm's RegNet bottleneck is a residual block (``downsample``: Identity = the input itself):
    emptying a group inside its branch leaves ``act3(shortcut(x) + constant)``, so the blocks that
    dominate a RegNet's latency on small inputs can go entirely."""
    from conftest import randomize_norms

    torch.manual_seed(0)
    model = randomize_norms(create_model("timm:regnetx_002", num_classes=10, in_chans=1).eval())
    graph = ChannelGraph.build(model, (1, 28, 28))
    vanishing = {gid for gid, g in graph.groups.items() if g.can_vanish}
    assert {graph.groups[gid].residual_block for gid in vanishing} >= {"s1.b1", "s3.b2", "s4.b7"}
    gen = torch.Generator().manual_seed(3)
    for _ in range(3):
        widths = graph.full_widths()
        for gid, g in graph.groups.items():
            if gid in vanishing and torch.rand(1, generator=gen) < 0.5:
                widths[gid] = 0
            elif g.prunable and not g.contains_stem:
                widths[gid] = max(g.slices, (g.width // 2) // g.slices * g.slices)
        assert any(w == 0 for w in widths.values())
        masks = ChannelMasks.prefix(graph, widths)
        masked, _ = masked_copy(graph, masks)
        slim = slim_model(graph, masks).eval()
        x = torch.randn(2, 1, 28, 28)
        with torch.no_grad():
            a, b = masked.eval()(x), slim(x)
        assert float((a - b).abs().max()) <= 1e-5 * float(a.abs().max())
        assert sum(p.numel() for p in slim.parameters()) == count(graph, widths).params
