"""Speed, memory and quality of the knapsack solvers on a ResNet-50-sized instance.

    python benchmarks/solver.py                   # synthetic instance (+ the real LUT if present)
    python benchmarks/solver.py --fraction 0.3 --resolution 16384 --no-lut

The synthetic instance has ResNet-50's layout with every block output as its own group: 53 groups,
26,560 chunks of one channel. Chunk costs are random positive latencies (about 5% negative, as at
latency cliffs); values are sorted random importances. If the ResNet-50 latency table
``benchmarks/out/torchvision_resnet50_3x224x224_b1_t1_s32.lut.json`` exists, a second instance uses
its real per-channel costs (the model's coupled channel groups, step-like costs) with synthetic
importances. The budget is ``--fraction`` of the dense model's total chunk cost.
Times are medians of ``--repeats`` solves; memory is tracemalloc's peak during one solve.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout

from halp.solver import ExactSolver, GreedySolver, GroupItems  # noqa: E402

LUT = Path(__file__).resolve().parent / "out" / "torchvision_resnet50_3x224x224_b1_t1_s32.lut.json"
STAGES = [(64, 3), (128, 4), (256, 6), (512, 3)]  # ResNet-50: bottleneck width, blocks per stage


def resnet50_sizes() -> list[int]:
    """Group widths of ResNet-50 with uncoupled block outputs: stem, then per block conv1, conv2,
    conv3 (4x expansion), plus the downsample of each stage's first block."""
    sizes = [64]
    for width, blocks in STAGES:
        for b in range(blocks):
            sizes += [width, width, 4 * width] + ([4 * width] if b == 0 else [])
    return sizes


def importances(rng: np.random.Generator, n: int) -> np.ndarray:
    """Sorted (most important first) heavy-tailed importance scores."""
    return np.sort(rng.lognormal(0.0, 1.5, n) * 1e-3)[::-1]


def synthetic_groups(seed: int = 0) -> list[GroupItems]:
    rng = np.random.default_rng(seed)
    groups = []
    for i, n in enumerate(resnet50_sizes()):
        scale = rng.uniform(0.3, 3.0) / n  # a group's total latency: 0.3 .. 3 ms
        costs = rng.uniform(0.2, 1.8, n) * scale
        cliff = rng.random(n) < 0.05
        costs[cliff] = -rng.uniform(0.1, 1.0, cliff.sum()) * scale
        groups.append(GroupItems(f"g{i}", importances(rng, n), costs, min_keep=1))
    return groups


def lut_groups(seed: int = 0) -> list[GroupItems] | None:
    """Real ResNet-50 chunk costs from the latency table, or None when it is not available."""
    if not LUT.exists():
        return None
    try:
        from halp.graph import ChannelGraph
        from halp.latency.cost import CostModel
        from halp.latency.table import LatencyTable
        from halp.models import create_model

        graph = ChannelGraph.build(create_model("torchvision:resnet50"), (3, 224, 224))
        model = CostModel.create(graph, LatencyTable.load(LUT), overhead="none")
        widths = graph.full_widths()
    except Exception as exc:  # a stale or partial table must not break the benchmark
        print(f"(latency table not usable, skipped: {type(exc).__name__}: {exc})")
        return None
    rng = np.random.default_rng(seed)
    groups = []
    for gid in graph.groups:
        costs = model.chunk_costs(gid, widths, chunk=1)[::-1]  # most important chunk first
        groups.append(GroupItems(gid, importances(rng, len(costs)), costs.copy(), min_keep=1))
    return groups


def timed(solver, groups: list[GroupItems], budget: float, repeats: int):
    times, sol = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        sol = solver.solve(groups, budget)
        times.append(time.perf_counter() - t)
    return statistics.median(times), sol


def peak_mib(solver, groups: list[GroupItems], budget: float) -> float:
    tracemalloc.start()
    try:
        solver.solve(groups, budget)
        return tracemalloc.get_traced_memory()[1] / 2**20
    finally:
        tracemalloc.stop()


def report(name: str, groups: list[GroupItems], args: argparse.Namespace) -> None:
    full = sum(float(g.costs.sum()) for g in groups)
    budget = args.fraction * full
    exact, greedy = ExactSolver(args.resolution), GreedySolver()
    t_exact, s_exact = timed(exact, groups, budget, args.repeats)
    t_greedy, s_greedy = timed(greedy, groups, budget, args.repeats)
    chunks = sum(len(g.values) for g in groups)
    print(f"== {name}: {len(groups)} groups, {chunks} chunks, "
          f"{sum(int((g.costs < 0).sum()) for g in groups)} negative-cost chunks")
    print(f"   budget {budget:.3f} ms = {args.fraction:.0%} of {full:.3f} ms; resolution {args.resolution}")
    print(f"   exact : median {t_exact * 1e3:8.1f} ms  value {s_exact.value:.6g}  cost {s_exact.cost:.4f} ms  "
          f"peak {peak_mib(exact, groups, budget):.1f} MiB")
    print(f"   greedy: median {t_greedy * 1e3:8.1f} ms  value {s_greedy.value:.6g}  cost {s_greedy.cost:.4f} ms  "
          f"peak {peak_mib(greedy, groups, budget):.1f} MiB")
    print(f"   value ratio greedy/exact = {s_greedy.value / s_exact.value:.5f}; "
          f"channels kept exact {sum(s_exact.keep.values())}, greedy {sum(s_greedy.keep.values())}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fraction", type=float, default=0.5, help="budget as a fraction of the dense cost")
    ap.add_argument("--resolution", type=int, default=8192)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-lut", action="store_true", help="skip the real latency table")
    args = ap.parse_args()
    report("synthetic ResNet-50", synthetic_groups(args.seed), args)
    if not args.no_lut:
        real = lut_groups(args.seed)
        if real is None:
            print(f"(no latency table at {LUT}; real-cost instance skipped)")
        else:
            report("ResNet-50 latency table (b1, step 32)", real, args)


if __name__ == "__main__":
    main()
