"""HALP spends its budget: chunk prices add up to the cost model's own totals (readers and emptied
branches included), each step lands within its tolerance below the target where the grid allows,
and the FLOPs-aware variant prunes to a fraction of the dense MACs."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from halp.counting import count
from halp.graph import ChannelGraph
from halp.latency.cost import CostModel
from halp.macs_cost import MacsCost
from halp.models import create_model
from halp.pruners import HalpConfig, HalpPruner, PruneConfig
from halp.pruners.base import percent

from conftest import synthetic_table


def lin(spec, ci, co):
    return 0.01 * ci * co * spec.kernel[0] * spec.kernel[1] / 9 + 0.05


def graph_and_cost(width: float = 1.0, two_sided: bool = True):
    torch.manual_seed(0)
    model = create_model("halp:resnet20", num_classes=10, in_chans=1, width=width)
    graph = ChannelGraph.build(model, (1, 12, 12))
    return graph, CostModel.create(graph, synthetic_table(graph, lin, step=2), overhead="none", two_sided=two_sided)


def random_widths(graph, rng):
    return {gid: int(rng.integers(0, g.width + 1)) if g.can_vanish else int(rng.integers(1, g.width + 1))
            for gid, g in graph.groups.items()}


def test_chunk_prices_add_up_to_the_total_they_change():
    graph, cost = graph_and_cost()
    rng = np.random.default_rng(0)
    for _ in range(5):
        widths = random_widths(graph, rng)
        for gid in graph.groups:
            for chunk in (1, 3, 8):
                n = widths[gid]
                prices = cost.chunk_costs(gid, widths, chunk)
                # oracle: the cost model's own total, with the group alone shrunk to zero
                assert prices.sum() == pytest.approx(cost.units_ms(widths) - cost.units_ms({**widths, gid: 0}),
                                                     rel=1e-9, abs=1e-9), (gid, n, chunk)
                if n > chunk:  # the first chunk alone, too
                    assert prices[0] == pytest.approx(cost.units_ms(widths) - cost.units_ms({**widths, gid: n - chunk}),
                                                      rel=1e-9, abs=1e-9)


def test_one_sided_prices_count_only_the_writers():
    graph, cost = graph_and_cost(two_sided=False)
    gid = "layer2.0.conv1"  # inside a branch, read by layer2.0.conv2
    full = graph.full_widths()
    writers = sum(cost.layer_ms(n, *graph.layer_widths(full)[n]) - cost.layer_ms(n, graph.layer_widths(full)[n][0], 0)
                  for n in graph.groups[gid].out_layers)
    assert cost.chunk_costs(gid, full, 4).sum() == pytest.approx(writers)
    two = CostModel.create(graph, cost.table, overhead="none").chunk_costs(gid, full, 4).sum()
    assert two > writers  # the reader's c_in and the emptied block's other layers count too


def run_steps(pruner: HalpPruner, seed: int = 0) -> list:
    gen = torch.Generator().manual_seed(seed)
    for _ in range(pruner.cfg.steps):
        pruner.saliency.sums = {g.id: torch.rand(g.width, generator=gen, dtype=torch.float64) for g in pruner.groups}
        pruner.saliency.count = 1
        pruner.prune_step()
    return pruner.log


@pytest.mark.parametrize("target", [0.3, 0.5, 0.7])
def test_steps_use_their_budget(target):
    graph, cost = graph_and_cost()
    pruner = HalpPruner(graph, cost, PruneConfig(target=target, steps=4, chunk=2, allow_vanish=True), HalpConfig())
    log = run_steps(pruner)
    for e in log:
        assert e.predicted_ms <= e.target_ms * (1 + 1e-9)
        assert e.achieved >= 0.98, [round(x.achieved, 4) for x in log]
    assert log[-1].target_ms == pytest.approx(target * pruner.dense_ms)


@pytest.mark.parametrize("target", [0.3, 0.5, 0.7])
def test_coarse_chunks_still_spend_the_final_budget(target):
    """8-channel chunks on a 16/32/64-wide ResNet-20, skewed importances: the knapsack's answer
    alone often ends 3-7 % under the final budget (the chunk grid, emptied branches); the repair
    passes and the lookahead bring every run within 2 %, and never over."""
    graph, cost = graph_and_cost()
    for seed in range(3):
        pruner = HalpPruner(graph, cost, PruneConfig(target=target, steps=10, chunk=8, allow_vanish=True), HalpConfig())
        gen = torch.Generator().manual_seed(seed)
        for _ in range(pruner.cfg.steps):
            pruner.saliency.sums = {g.id: torch.rand(g.width, generator=gen, dtype=torch.float64) ** 3
                                    for g in pruner.groups}
            pruner.saliency.count = 1
            pruner.prune_step()
        *middle, last = pruner.log
        assert 0.98 <= last.achieved <= 1 + 1e-9, (seed, [round(e.achieved, 3) for e in pruner.log])
        assert all(e.achieved <= 1 + 1e-9 or e.removed == 0 for e in middle)  # over its target only by waiting
        assert cost.total_ms(pruner.widths()) == pytest.approx(last.predicted_ms)


def test_greedy_solver_also_stays_within_budget():
    graph, cost = graph_and_cost()
    pruner = HalpPruner(graph, cost, PruneConfig(target=0.5, steps=3, chunk=2), HalpConfig(solver="greedy"))
    *middle, last = run_steps(pruner)
    assert last.predicted_ms <= last.target_ms * (1 + 1e-9)
    assert all(e.predicted_ms <= e.target_ms * (1 + 1e-9) or e.removed == 0 for e in middle)


def test_macs_cost_prices_and_prunes_to_a_fraction_of_dense_macs():
    graph, cost = graph_and_cost()
    macs = MacsCost(graph, cost.table)
    full = graph.full_widths()
    assert macs.total_ms(full) == pytest.approx(count(graph).macs / 1e6)
    gid = "layer3.0.conv1"
    assert macs.chunk_costs(gid, full, 8).sum() == pytest.approx(
        (count(graph).macs - count(graph, {**full, gid: 0}).macs) / 1e6)
    pruner = HalpPruner(graph, macs, PruneConfig(target=0.5, steps=3, chunk="auto", allow_vanish=True), HalpConfig())
    run_steps(pruner)
    ratio = count(graph, pruner.widths()).macs / count(graph).macs
    assert 0.49 <= ratio <= 0.5 + 1e-9


def test_infeasible_targets_say_enough_digits():
    graph, cost = graph_and_cost(width=0.5)
    with pytest.raises(ValueError, match=r"latency target 0\.1% of dense"):
        HalpPruner(graph, cost, PruneConfig(target=0.001, chunk=4))
    with pytest.raises(ValueError, match=r"macs target 0\.1% of dense .* MMAC"):
        HalpPruner(graph, MacsCost(graph, cost.table), PruneConfig(target=0.001, chunk=4))
    assert [percent(x) for x in (0.001, 0.5, 0.555, 1 / 3)] == ["0.1%", "50%", "55.5%", "33.3%"]
