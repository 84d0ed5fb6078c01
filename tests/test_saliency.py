"""Saliency: HALP's BN-Taylor score against autograd computed by hand on a tiny net."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from halp.graph import ChannelGraph
from halp.saliency import Saliency, SaliencyKind, filter_norms


class TwoBranch(nn.Module):
    """Two convs + BNs add into one stream (one channel group with two BNs), then a reader."""

    def __init__(self):
        super().__init__()
        self.conv_a, self.bn_a = nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.conv_b, self.bn_b = nn.Conv2d(3, 4, 1, bias=False), nn.BatchNorm2d(4)
        self.conv_c = nn.Conv2d(4, 5, 3, padding=1)  # no BN: its group uses the weight form
        self.fc = nn.Linear(5, 3)

    def forward(self, x):
        y = torch.relu(self.bn_a(self.conv_a(x)) + self.bn_b(self.conv_b(x)))
        return self.fc(torch.relu(self.conv_c(y)).mean((2, 3)))


@pytest.fixture
def net():
    torch.manual_seed(0)
    m = TwoBranch()
    with torch.no_grad():
        for bn in (m.bn_a, m.bn_b):
            bn.weight.uniform_(-1, 1)
            bn.bias.uniform_(-1, 1)
    return m


def batch(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(6, 3, 8, 8, generator=g), torch.randint(0, 3, (6,), generator=g)


def test_bn_taylor_matches_hand_computation(net):
    graph = ChannelGraph.build(net, (3, 8, 8))
    stream = graph.groups["conv_a"]
    assert set(stream.norms) == {"bn_a", "bn_b"}
    sal = Saliency(graph, [stream, graph.groups["conv_c"]], SaliencyKind.TAYLOR_BN)
    expected_a = torch.zeros(4, dtype=torch.float64)
    expected_c = torch.zeros(5, dtype=torch.float64)
    sign_differs = False
    for seed in range(3):
        x, y = batch(seed)
        net.zero_grad()
        loss = nn.functional.cross_entropy(net(x), y)
        loss.backward()
        assert sal.accumulate()
        # by hand, with autograd on an independent forward
        params = [net.bn_a.weight, net.bn_a.bias, net.bn_b.weight, net.bn_b.bias, net.conv_c.weight, net.conv_c.bias]
        ga_w, ga_b, gb_w, gb_b, gc_w, gc_b = torch.autograd.grad(nn.functional.cross_entropy(net(x), y), params)
        ta = net.bn_a.weight * ga_w + net.bn_a.bias * ga_b
        tb = net.bn_b.weight * gb_w + net.bn_b.bias * gb_b
        sign_differs |= bool(((ta * tb) < 0).any())
        expected_a += (ta + tb).abs().double().detach()  # sum over coupled BNs, then |.|
        expected_c += ((net.conv_c.weight * gc_w).sum((1, 2, 3)) + net.conv_c.bias * gc_b).abs().double().detach()
    assert sign_differs, "pick data where the two BNs disagree, so |a+b| != |a|+|b| is tested"
    scores = sal.scores()
    torch.testing.assert_close(scores["conv_a"], expected_a / 3)
    torch.testing.assert_close(scores["conv_c"], expected_c / 3)
    sal.reset()
    assert sal.count == 0 and float(sal.sums["conv_a"].abs().sum()) == 0


def test_squared_variant_and_nan_skip(net):
    graph = ChannelGraph.build(net, (3, 8, 8))
    sq = Saliency(graph, [graph.groups["conv_a"]], "taylor_bn_sq")
    x, y = batch(0)
    nn.functional.cross_entropy(net(x), y).backward()
    sq.accumulate()
    raw = (net.bn_a.weight * net.bn_a.weight.grad + net.bn_a.bias * net.bn_a.bias.grad
           + net.bn_b.weight * net.bn_b.weight.grad + net.bn_b.bias * net.bn_b.bias.grad).double().detach()
    torch.testing.assert_close(sq.scores()["conv_a"], raw ** 2)
    net.bn_a.weight.grad[0] = float("nan")
    assert not sq.accumulate()
    assert sq.skipped == 1 and sq.count == 1
    torch.testing.assert_close(sq.scores()["conv_a"], raw ** 2)


def test_filter_norms(net):
    graph = ChannelGraph.build(net, (3, 8, 8))
    g = graph.groups["conv_a"]
    wa, wb = net.conv_a.weight.detach().double(), net.conv_b.weight.detach().double()
    torch.testing.assert_close(filter_norms(graph, g, 1), wa.abs().sum((1, 2, 3)) + wb.abs().sum((1, 2, 3)))
    torch.testing.assert_close(filter_norms(graph, g, 1, reduce="first"), wa.abs().sum((1, 2, 3)))
    torch.testing.assert_close(filter_norms(graph, g, 2),
                               (wa.pow(2).sum((1, 2, 3)) + wb.pow(2).sum((1, 2, 3))).sqrt())
    sal = Saliency(graph, [g], "l1")
    assert sal.accumulate()  # nothing to accumulate for norms
    torch.testing.assert_close(sal.scores()["conv_a"], filter_norms(graph, g, 1))
    with pytest.raises(ValueError):
        Saliency(graph, [g], "bogus")
    with pytest.raises(RuntimeError, match="no finite saliency"):
        Saliency(graph, [g], "taylor_bn").scores()
