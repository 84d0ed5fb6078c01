"""Speed, memory and quality of the knapsack solvers on ResNet-50-sized instances.

    python benchmarks/solver.py                   # synthetic instances (+ the real LUT if present)
    python benchmarks/solver.py --fraction 0.3 --chunk 32 --resolution 16384 --no-lut

The synthetic instance has ResNet-50's layout with every block output as its own group: 53 groups
of 64..2048 channels, cut into chunks of ``--chunk`` channels (1: 26,560 chunks; 32: 830 chunks,
2-64 per group). Chunk costs are random positive latencies (about 5% negative, as at latency
cliffs); values are sorted random importances (a chunk's is the sum of its channels'). If the
ResNet-50 latency table ``benchmarks/out/torchvision_resnet50_3x224x224_b1_t1_s32.lut.json`` exists,
another instance per chunk size uses its real chunk costs (the model's coupled channel groups,
step-like costs) with synthetic importances. The budget is each ``--fraction`` of the dense model's
total chunk cost; every (instance, chunk size, fraction) is one benchmark instance.
Times are medians of ``--repeats`` solves; memory is tracemalloc's peak during one solve.

The exact solver must never lose to greedy: for every instance the greedy/exact value ratio is
printed, and the script exits with status 1 if any ratio exceeds 1 by more than 1e-12 (relative).
"""
from __future__ import annotations

import argparse
import math
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
RATIO_TOL = 1e-12  # greedy may match exact up to float rounding, never beat it


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


def synthetic_groups(seed: int = 0, chunk: int = 1) -> list[GroupItems]:
    """ResNet-50's groups in ``chunk``-channel chunks (the width's remainder joins the last chunk)."""
    rng = np.random.default_rng(seed)
    groups = []
    for i, width in enumerate(resnet50_sizes()):
        n = max(1, width // chunk)
        scale = rng.uniform(0.3, 3.0) / n  # a group's total latency: 0.3 .. 3 ms
        costs = rng.uniform(0.2, 1.8, n) * scale
        cliff = rng.random(n) < 0.05
        costs[cliff] = -rng.uniform(0.1, 1.0, cliff.sum()) * scale
        channels = importances(rng, width)
        values = np.add.reduceat(channels, np.arange(n) * (width // n))  # most important chunk first
        groups.append(GroupItems(f"g{i}", values, costs, min_keep=1))
    return groups


def lut_groups(seed: int = 0, chunk: int = 1) -> list[GroupItems] | None:
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
        costs = model.chunk_costs(gid, widths, chunk=chunk)[::-1]  # most important chunk first
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


def report(name: str, groups: list[GroupItems], fraction: float, args: argparse.Namespace) -> float:
    """Benchmark one instance; its greedy/exact value ratio."""
    full = sum(float(g.costs.sum()) for g in groups)
    budget = fraction * full
    exact, greedy = ExactSolver(args.resolution), GreedySolver()
    t_exact, s_exact = timed(exact, groups, budget, args.repeats)
    t_greedy, s_greedy = timed(greedy, groups, budget, args.repeats)
    chunks = sum(len(g.values) for g in groups)
    print(f"== {name}: {len(groups)} groups, {chunks} chunks, "
          f"{sum(int((g.costs < 0).sum()) for g in groups)} negative-cost chunks")
    print(f"   budget {budget:.3f} ms = {fraction:.0%} of {full:.3f} ms; resolution {args.resolution}")
    print(f"   exact : median {t_exact * 1e3:8.1f} ms  value {s_exact.value:.6g}  cost {s_exact.cost:.4f} ms  "
          f"peak {peak_mib(exact, groups, budget):.1f} MiB")
    print(f"   greedy: median {t_greedy * 1e3:8.1f} ms  value {s_greedy.value:.6g}  cost {s_greedy.cost:.4f} ms  "
          f"peak {peak_mib(greedy, groups, budget):.1f} MiB")
    ratio = s_greedy.value / s_exact.value if s_exact.value > 0 else (1.0 if s_greedy.value == 0 else math.inf)
    print(f"   value ratio greedy/exact = {ratio:.12f}; "
          f"chunks kept exact {sum(s_exact.keep.values())}, greedy {sum(s_greedy.keep.values())}")
    if s_exact.cost > budget:
        print(f"   ERROR: exact is over budget ({s_exact.cost!r} > {budget!r})")
        return math.inf
    return ratio


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fraction", type=float, nargs="+", default=[0.3, 0.5, 0.7],
                    help="budgets as fractions of the dense cost (one instance each)")
    ap.add_argument("--chunk", type=int, nargs="+", default=[1, 32],
                    help="channels per chunk (one instance each)")
    ap.add_argument("--resolution", type=int, default=8192)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-lut", action="store_true", help="skip the real latency table")
    args = ap.parse_args()
    if min(args.chunk) < 1:
        ap.error("--chunk must be positive")
    ratios: dict[str, float] = {}
    for chunk in args.chunk:
        instances = [(f"synthetic ResNet-50, {chunk}-channel chunks", synthetic_groups(args.seed, chunk))]
        if not args.no_lut:
            real = lut_groups(args.seed, chunk)
            if real is None:
                print(f"(no latency table at {LUT}; real-cost instance skipped)")
            else:
                instances.append((f"ResNet-50 latency table (b1, step 32), {chunk}-channel chunks", real))
        for name, groups in instances:
            for fraction in args.fraction:
                ratios[f"{name}, {fraction:.0%}"] = report(name, groups, fraction, args)
    worst = max(ratios, key=ratios.get)
    print(f"== greedy/exact value ratio over {len(ratios)} instances: max {ratios[worst]:.12f} ({worst})")
    losses = [k for k, r in ratios.items() if not r <= 1 + RATIO_TOL]
    if losses:
        sys.exit(f"FAIL: the exact solver lost to greedy (value ratio > 1 + {RATIO_TOL:g}) or went over "
                 f"budget on {len(losses)} instance(s): " + "; ".join(losses))
    print(f"OK: exact >= greedy (within {RATIO_TOL:g}) and within budget on every instance")


if __name__ == "__main__":
    main()
