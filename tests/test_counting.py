"""MACs/params from widths vs an independent count on the slim model's real forward."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from halp.counting import count
from halp.graph import ChannelGraph
from halp.masks import ChannelMasks
from halp.models import create_model
from halp.slim import slim_model


def measured_macs(model: nn.Module, shape) -> int:
    """Count conv/linear MACs from the shapes a forward really produces (batch 1)."""
    total = 0

    def hook(m, inp, out):
        nonlocal total
        if isinstance(m, nn.Conv2d):
            total += out.numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]
        else:
            total += m.in_features * m.out_features
    hs = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        model.eval()(torch.randn(1, *shape))
    for h in hs:
        h.remove()
    return total


def test_resnet50_dense_macs_match_the_literature():
    graph = ChannelGraph.build(create_model("torchvision:resnet50"), (3, 224, 224))
    c = count(graph)
    assert c.params == 25_557_032  # torchvision's documented parameter count
    assert round(c.macs / 1e9, 2) == 4.09  # the usual "4.1 GFLOPs" (multiply-adds)


@pytest.mark.parametrize("spec,shape", [("halp:resnet56", (1, 28, 28)), ("halp:mobilenetv2", (1, 28, 28)),
                                        ("torchvision:mobilenet_v2", (3, 64, 64))])
def test_counts_match_slim_model(spec, shape):
    torch.manual_seed(0)
    graph = ChannelGraph.build(create_model(spec, num_classes=10, in_chans=shape[0]), shape)
    assert count(graph).macs == measured_macs(graph.model, shape)
    for seed in range(3):
        masks = ChannelMasks.random(graph, torch.Generator().manual_seed(seed), vanish_prob=0.3)
        slim = slim_model(graph, masks)
        c = count(graph, masks.widths())
        assert c.macs == measured_macs(slim, shape)
        assert c.params == sum(p.numel() for p in slim.parameters())
        assert c.macs < count(graph).macs
