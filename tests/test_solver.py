"""The knapsack solvers: exactness against MILP and brute force, safety, edge cases, validation."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy.optimize import Bounds, LinearConstraint, milp

from halp import solver as S
from halp.solver import (DiscreteInstance, ExactSolver, GreedySolver, GroupItems, InfeasibleTarget,
                         Solution, discretise, get_solver)

TOL = 1e-9


def random_groups(rng: np.random.Generator, max_groups: int = 5, max_chunks: int = 6) -> list[GroupItems]:
    groups = []
    for i in range(int(rng.integers(2, max_groups + 1))):
        n = int(rng.integers(1, max_chunks + 1))
        values = rng.random(n) * rng.choice([1.0, 1e-6])
        values[rng.random(n) < 0.1] = 0.0
        costs = rng.normal(1.0, 1.0, n)  # about 16% negative
        costs[rng.random(n) < 0.1] = 0.0
        groups.append(GroupItems(f"g{i}", values, costs, min_keep=int(rng.integers(0, n + 1))))
    return groups


def combos(inst: DiscreteInstance):
    return itertools.product(*(range(len(k)) for k in inst.ks))


def random_budget(rng: np.random.Generator, inst: DiscreteInstance) -> float:
    """Budgets at the floor, just above it, at a selection's exact cost, in the middle, huge."""
    top = math.fsum(float(c.max()) for c in inst.costs)
    pick = [int(rng.integers(len(k))) for k in inst.ks]
    exact_cost = math.fsum(float(c[i]) for c, i in zip(inst.costs, pick))
    kind = int(rng.integers(6))
    return [inst.floor, inst.floor + 1e-12, max(exact_cost, inst.floor), top, top * 10 + 1e3,
            inst.floor + rng.random() * (top - inst.floor)][kind]


def milp_optimum(inst: DiscreteInstance) -> float:
    """Optimum of the integer instance: one binary per (group, option), one option per group."""
    values = np.concatenate(inst.values)
    costs = np.concatenate(inst.int_costs).astype(float)
    owner = np.repeat(np.arange(len(inst.ks)), [len(k) for k in inst.ks])
    one_each = (owner[None, :] == np.arange(len(inst.ks))[:, None]).astype(float)
    cons = [LinearConstraint(one_each, 1, 1), LinearConstraint(costs[None, :], -np.inf, inst.capacity)]
    scale = 1e6 / max(float(values.max()), 1e-300)  # HiGHS stops within an absolute gap of 1e-6
    res = milp(-values * scale, constraints=cons, integrality=np.ones(len(values)), bounds=Bounds(0, 1),
               options={"mip_rel_gap": 0.0})
    assert res.success, res.message
    x = np.round(res.x)
    assert (one_each @ x == 1).all() and costs @ x <= inst.capacity
    return math.fsum(values[x == 1])


def check_selection(groups: list[GroupItems], sol: Solution, budget: float) -> None:
    """The solution is a valid prefix selection whose reported value and cost are its true ones."""
    assert set(sol.keep) == {g.id for g in groups}
    for g in groups:
        assert g.min_keep <= sol.keep[g.id] <= len(g.values)
    assert sol.cost <= budget
    assert sol.cost == pytest.approx(sum(g.costs[:sol.keep[g.id]].sum() for g in groups), abs=1e-9)
    assert sol.value == pytest.approx(sum(g.values[:sol.keep[g.id]].sum() for g in groups), abs=1e-12)


def int_cost(inst: DiscreteInstance, sol: Solution) -> int:
    return sum(int(c[list(k).index(sol.keep[i])]) for i, k, c in zip(inst.ids, inst.ks, inst.int_costs))


@pytest.mark.parametrize("seed", range(4))
def test_exact_matches_milp_on_the_discretised_instance(seed, monkeypatch):
    rng = np.random.default_rng(seed)
    for trial in range(60):  # 240 instances in all
        groups = random_groups(rng)
        resolution = int(rng.choice([3, 16, 100, 8192]))
        inst0 = discretise(groups, math.inf, resolution)  # only for the floor and option costs
        budget = random_budget(rng, inst0)
        inst = discretise(groups, budget, resolution)
        best = milp_optimum(inst)
        for mode in (None, 0, 10**9):  # auto, always per option, always dense
            if mode is not None:
                monkeypatch.setattr(S, "_DENSE_PER_OPTION", mode)
            sol = ExactSolver(resolution, polish=False).solve(groups, budget)  # the DP alone
            check_selection(groups, sol, budget)
            assert int_cost(inst, sol) <= inst.capacity
            assert sol.value == pytest.approx(best, rel=TOL, abs=1e-15), (seed, trial, mode)
        monkeypatch.undo()
        greedy = GreedySolver().solve(groups, budget)
        check_selection(groups, greedy, budget)
        # the DP is optimal over the discretised-feasible selections; greedy works on true costs,
        # so it can only win with a selection the rounded-up integer costs rule out
        if greedy.value > sol.value + TOL * max(1.0, sol.value):
            assert int_cost(inst, greedy) > inst.capacity
        polished = ExactSolver(resolution).solve(groups, budget)  # the default: never below either
        check_selection(groups, polished, budget)
        assert polished.value >= max(sol.value, greedy.value)


def test_exact_matches_brute_force():
    rng = np.random.default_rng(100)
    for _ in range(150):
        groups = random_groups(rng, max_groups=4, max_chunks=4)
        resolution = int(rng.choice([5, 64, 8192]))
        budget = random_budget(rng, discretise(groups, math.inf, resolution))
        inst = discretise(groups, budget, resolution)
        disc_best, true_best, shrunk_best = -1.0, -1.0, -1.0
        shrunk = budget - (len(groups) + 1) * inst.unit  # every such selection survives rounding up
        for pick in combos(inst):
            value = math.fsum(float(v[i]) for v, i in zip(inst.values, pick))
            cost = math.fsum(float(c[i]) for c, i in zip(inst.costs, pick))
            if sum(int(c[i]) for c, i in zip(inst.int_costs, pick)) <= inst.capacity:
                disc_best = max(disc_best, value)
                assert cost <= budget  # rounding up is conservative, negative costs included
            if cost <= budget:
                true_best = max(true_best, value)
            if cost <= shrunk:
                shrunk_best = max(shrunk_best, value)
        sol = ExactSolver(resolution, polish=False).solve(groups, budget)  # the DP alone
        check_selection(groups, sol, budget)
        assert sol.value == pytest.approx(disc_best, rel=TOL, abs=1e-15)
        assert sol.value <= true_best * (1 + TOL) + 1e-15
        assert sol.value >= shrunk_best * (1 - TOL) - 1e-15
        greedy = GreedySolver().solve(groups, budget)
        assert greedy.value <= true_best * (1 + TOL) + 1e-15
        polished = ExactSolver(resolution).solve(groups, budget)
        check_selection(groups, polished, budget)
        assert max(sol.value, greedy.value) <= polished.value <= true_best * (1 + TOL) + 1e-15


def test_infeasible_target_names_the_floor():
    groups = [GroupItems("a", [1.0, 1.0], [2.5, 1.0], min_keep=1), GroupItems("b", [1.0], [1.6], min_keep=1)]
    for solver in (ExactSolver(), GreedySolver()):
        with pytest.raises(InfeasibleTarget, match=r"target 3\.2 ms is below the latency floor 4\.1 ms") as info:
            solver.solve(groups, 3.2)
        assert isinstance(info.value, ValueError) and info.value.floor == pytest.approx(4.1)
        assert "minimum width" in str(info.value)
    # with a latency cliff the floor is below the minimum width's cost
    cliff = [GroupItems("a", [1.0, 1.0, 1.0], [1.0, 2.0, -2.5], min_keep=1)]
    with pytest.raises(InfeasibleTarget, match=r"floor 0\.5 ms \(every group at its cheapest allowed width"):
        ExactSolver().solve(cliff, 0.4)
    assert ExactSolver().solve(cliff, 0.5) == Solution({"a": 3}, 3.0, 0.5)
    with pytest.raises(InfeasibleTarget):
        ExactSolver().solve([], -1e-9)


def test_budget_exactly_at_the_floor_and_between():
    groups = [GroupItems("a", [3.0, 2.0, 1.0], [0.3, 0.2, 0.0]), GroupItems("b", [1.0, 1.0], [0.1, 0.7], 0)]
    for solver in (ExactSolver(), GreedySolver()):
        # the floor: a at 1 chunk, b at 0; a's free third chunk needs its second
        assert solver.solve(groups, 0.3).keep == {"a": 1, "b": 0}
        assert solver.solve(groups, 0.5).keep == {"a": 3, "b": 0}
    # rounding up costs each group less than one unit: a selection within len(groups) units of the
    # budget may be missed, one further below may not
    inst = discretise(groups, 0.6, 8192)
    assert ExactSolver().solve(groups, 0.6 + 2 * inst.unit) == Solution({"a": 3, "b": 1}, 7.0, pytest.approx(0.6))


def test_float_rounding_at_the_budget():
    groups = [GroupItems("a", [1.0, 1.0], [0.1, 0.2], 0)]  # keeping both costs 0.30000000000000004
    for solver in (ExactSolver(), GreedySolver()):
        assert solver.solve(groups, 0.3) == Solution({"a": 1}, 1.0, 0.1)
        assert solver.solve(groups, 0.1 + 0.2).keep == {"a": 2}


def test_tiny_values_still_steer():
    groups = [GroupItems("a", [1e-12], [1.0], 0), GroupItems("b", [2e-12], [1.0], 0)]
    for solver in (ExactSolver(), GreedySolver()):
        sol = solver.solve(groups, 1.0)
        assert sol.keep == {"a": 0, "b": 1} and sol.value == 2e-12
    big = [GroupItems("a", [1.0], [1.0], 0), GroupItems("b", [1.0 + 1e-12], [1.0], 0)]
    assert ExactSolver().solve(big, 1.5).keep == {"a": 0, "b": 1}
    # a tiny value is still worth a free chunk
    assert ExactSolver().solve([GroupItems("a", [1.0, 1e-12], [1.0, 0.0])], 1.0).keep == {"a": 2}


def test_item_costlier_than_the_capacity():
    groups = [GroupItems("a", [1.0, 5.0], [1.0, 1e6], 0), GroupItems("b", [1.0], [0.5], 0)]
    for solver in (ExactSolver(), GreedySolver()):
        assert solver.solve(groups, 10.0).keep == {"a": 1, "b": 1}
    # a chunk costlier than the budget, followed by a cliff that makes the pair cheap
    cliff = [GroupItems("a", [1.0, 1.0], [100.0, -99.5], 0)]
    assert ExactSolver().solve(cliff, 1.0) == Solution({"a": 2}, 2.0, 0.5)
    # greedy ranks one chunk at a time: it cannot see through the cliff (a known weakness)
    assert GreedySolver().solve(cliff, 1.0).keep == {"a": 0}


def test_empty_groups_and_min_keep_equal_to_n():
    groups = [GroupItems("empty", np.zeros(0), np.zeros(0), min_keep=0),
              GroupItems("full", [1.0, 1.0], [5.0, 5.0], min_keep=2), GroupItems("c", [1.0], [1.0])]
    for solver in (ExactSolver(), GreedySolver()):
        assert solver.solve(groups, 11.0) == Solution({"empty": 0, "full": 2, "c": 1}, 3.0, 11.0)
        with pytest.raises(InfeasibleTarget):
            solver.solve(groups, 10.9)
        assert solver.solve([], 0.0) == Solution({}, 0.0, 0.0)


def test_all_negative_costs_and_huge_budgets():
    rng = np.random.default_rng(7)
    groups = [GroupItems(f"g{i}", rng.random(n), -rng.random(n), 1) for i, n in enumerate([3, 50, 700])]
    everything = {g.id: len(g.values) for g in groups}
    total = discretise(groups, math.inf).floor
    for solver in (ExactSolver(), GreedySolver()):
        sol = solver.solve(groups, total)  # the floor: every chunk pays back
        assert sol.keep == everything and sol.cost <= total
    pos = [GroupItems(g.id, g.values, -g.costs, 1) for g in groups]
    for budget in (1e300, math.inf, sum(g.costs.sum() for g in pos)):
        for solver in (ExactSolver(), GreedySolver()):
            assert solver.solve(pos, budget).keep == everything


def test_medium_instance_against_milp_and_greedy():
    rng = np.random.default_rng(3)
    groups = []
    for i, n in enumerate([16, 32, 64, 8, 40, 24]):
        costs = rng.uniform(0.2, 1.8, n) / n
        costs[rng.random(n) < 0.1] *= -0.5
        groups.append(GroupItems(f"g{i}", np.sort(rng.exponential(1.0, n))[::-1], costs, 1))
    budget = 0.5 * sum(g.costs.sum() for g in groups)
    for resolution in (64, 512):
        inst = discretise(groups, budget, resolution)
        sol = ExactSolver(resolution, polish=False).solve(groups, budget)
        check_selection(groups, sol, budget)
        assert sol.value == pytest.approx(milp_optimum(inst), rel=TOL)
        polished = ExactSolver(resolution).solve(groups, budget)
        check_selection(groups, polished, budget)
        assert polished.value >= sol.value
    greedy = GreedySolver().solve(groups, budget)
    check_selection(groups, greedy, budget)
    assert greedy.value <= sol.value * 1.01 <= polished.value * 1.01


def test_discretise_is_conservative_and_documented_shape():
    groups = [GroupItems("a", [1.0, 1.0, 1.0], [1.0, -3.0, 2.5], 0), GroupItems("b", [1.0], [0.7], 1)]
    inst = discretise(groups, 3.0, 10)
    assert inst.floor == pytest.approx(-2.0 + 0.7) and inst.offsets == [pytest.approx(-2.0), 0.7]
    assert inst.capacity == 10 and inst.unit == pytest.approx(3.0 / 10)  # a's options span 3 ms < 4.3 ms free
    for c, ic, off in zip(inst.costs, inst.int_costs, inst.offsets):
        assert ic.dtype == np.int64 and (ic >= 0).all() and ic.min() == 0
        assert (ic * inst.unit >= (c - off) - 1e-12).all()  # rounded up
        assert (ic <= inst.capacity + 1).all()
    assert [list(k) for k in inst.ks] == [[0, 1, 2, 3], [1]]


@pytest.mark.parametrize("bad, match", [
    (GroupItems("a", [1.0, np.nan], [1.0, 1.0]), "finite"),
    (GroupItems("a", [1.0, 1.0], [1.0, np.inf]), "finite"),
    (GroupItems("a", [1.0, 1.0], [1.0]), "same length"),
    (GroupItems("a", [[1.0]], [[1.0]]), "1-D"),
    (GroupItems("a", [1.0, -1.0], [1.0, 1.0]), "non-negative"),
    (GroupItems("a", [1.0], [1.0], min_keep=2), "min_keep"),
    (GroupItems("a", [1.0], [1.0], min_keep=-1), "min_keep"),
    (GroupItems("a", np.zeros(0), np.zeros(0)), "min_keep"),  # n = 0 needs min_keep = 0
])
def test_invalid_groups(bad, match):
    for solver in (ExactSolver(), GreedySolver()):
        with pytest.raises(ValueError, match=match):
            solver.solve([bad], 10.0)


def test_invalid_arguments():
    g = GroupItems("a", [1.0], [1.0])
    with pytest.raises(ValueError, match="duplicate"):
        ExactSolver().solve([g, g], 10.0)
    with pytest.raises(ValueError, match="budget"):
        ExactSolver().solve([g], float("nan"))
    with pytest.raises(ValueError, match="resolution"):
        ExactSolver(0)
    with pytest.raises(ValueError, match="exact, greedy"):
        get_solver("nope")
    assert isinstance(get_solver("greedy"), GreedySolver)
    assert get_solver("exact", resolution=64).resolution == 64
    assert set(S.SOLVERS) == {"exact", "greedy"}


def resnet50_sized_groups(rng: np.random.Generator, chunk: int = 32) -> list[GroupItems]:
    """50-60 groups with ResNet-50's widths (64..2048 channels) in ``chunk``-channel chunks (2-64
    per group); a group's latency spread over 0.05..3 ms, chunk costs +-80 % around it, about 5 %
    negative (latency cliffs) and a few free; heavy-tailed importances, most important first."""
    groups = []
    for i in range(int(rng.integers(50, 61))):
        n = int(rng.choice([64, 128, 256, 512, 1024, 2048])) // chunk
        scale = math.exp(rng.uniform(math.log(0.05), math.log(3.0))) / n
        costs = rng.uniform(0.2, 1.8, n) * scale
        cliff = rng.random(n) < 0.05
        costs[cliff] = -rng.uniform(0.1, 1.0, int(cliff.sum())) * scale
        costs[rng.random(n) < 0.02] = 0.0
        values = np.sort(rng.lognormal(0.0, 1.5, n * chunk) * 1e-3)[::-1].reshape(n, chunk).sum(axis=1)
        groups.append(GroupItems(f"g{i}", values, costs, min_keep=int(rng.integers(0, 3))))
    return groups


def test_exact_never_loses_to_greedy_on_resnet50_sized_instances():
    dp_lost = 0
    for seed in range(12):
        groups = resnet50_sized_groups(np.random.default_rng(seed))
        assert all(2 <= len(g.values) <= 64 for g in groups)
        full = math.fsum(float(g.costs.sum()) for g in groups)
        for fraction in (0.3, 0.5, 0.7):
            budget = fraction * full
            exact = ExactSolver().solve(groups, budget)
            greedy = GreedySolver().solve(groups, budget)
            dp = ExactSolver(polish=False).solve(groups, budget)
            for sol in (exact, greedy, dp):
                check_selection(groups, sol, budget)
            assert exact.cost <= budget
            assert exact.value >= greedy.value * (1 - 1e-12), (seed, fraction)
            assert exact.value >= dp.value
            dp_lost += greedy.value > dp.value * (1 + 1e-12)
    assert dp_lost > 0  # the instances do show the discretisation loss the polish repairs


def test_polish_spends_the_budget_rounding_left():
    # unit = 2/3 ms: each 1 ms chunk rounds up to 2 units, capacity 3 units: the DP keeps one chunk
    dear = GroupItems("c", [0.5], [5.0], 0)  # never fits: the budget is not above every selection
    groups = [GroupItems("a", [1.0], [1.0], 0), GroupItems("b", [2.0], [1.0], 0), dear]
    assert ExactSolver(3, polish=False).solve(groups, 2.0).keep == {"a": 0, "b": 1, "c": 0}
    assert ExactSolver(3).solve(groups, 2.0) == Solution({"a": 1, "b": 1, "c": 0}, 3.0, 2.0)
    # an extension sees through a latency cliff (greedy does not): a's second chunk pays back most
    # of its first, and b fits beside both
    cliff = [GroupItems("a", [1.0, 1.0], [1.0, -0.9], 0), GroupItems("b", [2.0], [1.0], 0), dear]
    assert ExactSolver(3, polish=False).solve(cliff, 1.1).keep == {"a": 2, "b": 0, "c": 0}
    assert GreedySolver().solve(cliff, 1.1).keep == {"a": 0, "b": 1, "c": 0}
    assert ExactSolver(3).solve(cliff, 1.1) == Solution({"a": 2, "b": 1, "c": 0}, 4.0, pytest.approx(1.1))
    # a DP on a coarse axis that extending cannot save: greedy's selection is returned
    groups = [GroupItems("a", [0.1, 0.7], [0.4, 0.6], 0), GroupItems("b", [1e-7], [1.1], 0),
              GroupItems("c", [0.2], [2.5], 0)]
    assert ExactSolver(3, polish=False).solve(groups, 3.5).keep == {"a": 2, "b": 1, "c": 0}
    assert GreedySolver().solve(groups, 3.5).keep == {"a": 2, "b": 0, "c": 1}
    assert ExactSolver(3).solve(groups, 3.5) == Solution({"a": 2, "b": 0, "c": 1}, 1.0, 3.5)
