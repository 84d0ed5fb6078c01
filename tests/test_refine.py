"""Coarse-then-refine table builds: the points chosen, the interpolation, the budget and the time
limit, against exact oracles (the function being sampled, and a build that measures every point)."""
from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from halp.graph import ChannelGraph
from halp.latency import backends as B
from halp.latency import build as build_mod
from halp.latency.backends import Setting
from halp.latency.build import BuildTimeLimit, build_table, describe_plan, plan_build
from halp.latency.refine import Refinement, Refiner
from halp.latency.timing import Protocol, measure
from halp.models import create_model

from test_latency import FakeBackend


def sample(refiner: Refiner, f, spread: float = 0.0) -> dict:
    """Drive a refiner on a function: what a build does with a backend."""
    value: dict = {}
    todo = refiner.first()
    while todo:
        value.update({p: f(*p) for p in todo})
        todo = refiner.next(value, {p: spread for p in value}, len(value))
    return value


GRID = {"u": [(ci, co) for ci in range(8, 369, 8) for co in range(8, 369, 8)]}


def test_a_bilinear_surface_is_measured_on_a_coarse_lattice_and_interpolated_exactly():
    f = lambda k, ci, co: 0.01 + 2e-5 * ci * co + 1e-4 * ci  # noqa: E731
    r = Refiner(GRID, Refinement())
    value = sample(r, f)
    assert len(value) <= r.budget < 0.35 * r.full
    filled = r.fill(value)
    assert set(filled) == {("u", ci, co) for ci, co in GRID["u"]}
    assert all(abs(ms - f(*p)) < 1e-12 for p, (ms, _) in filled.items())
    assert sum(m for _, m in filled.values()) == len(value)
    assert r.unchecked == 0


def test_a_cliff_is_refined_down_to_the_grid_and_only_there():
    f = lambda k, ci, co: 1e-4 * ci * co * (1.5 if co > 200 else 1.0)  # noqa: E731
    r = Refiner(GRID, Refinement(budget=1.0))
    value = sample(r, f)
    filled = r.fill(value)
    err = max(abs(ms - f(*p)) / f(*p) for p, (ms, _) in filled.items())
    assert err < 1e-9  # the cells across the cliff split until both sides are measured
    cos = [co for _, _, co in value]
    assert {200, 208} <= set(cos)  # both sides of the cliff
    assert len(value) < r.full / 2


def test_the_budget_bounds_what_is_measured_and_the_rest_is_interpolated():
    rng = random.Random(0)
    noise = {p: rng.uniform(0.5, 1.5) for p in GRID["u"]}
    f = lambda k, ci, co: noise[(ci, co)]  # noqa: E731  (nothing is predictable)
    r = Refiner(GRID, Refinement(budget=0.2))
    value = sample(r, f)
    assert len(value) <= r.budget == math.ceil(0.2 * r.full)
    filled = r.fill(value)
    assert r.unchecked > 0
    assert len(filled) == r.full and sum(m for _, m in filled.values()) == len(value)
    # noise that the measurement itself reports (its spread) does not force refinement
    r2 = Refiner(GRID, Refinement(budget=1.0))
    flat = lambda k, ci, co: 1.0 + 0.02 * (noise[(ci, co)] - 1)  # noqa: E731
    assert len(sample(r2, flat, spread=0.05)) == len(r2.first())


def test_depthwise_units_refine_along_their_one_width_and_off_measures_exactly_the_grid():
    pts = {"dw": [(c, c) for c in range(8, 369, 8)]}
    f = lambda k, ci, co: 0.01 + 1e-4 * ci  # noqa: E731
    r = Refiner(pts, Refinement())
    value = sample(r, f)
    assert all(ci == co for _, ci, co in value) and len(value) < len(pts["dw"]) / 2
    assert all(abs(ms - f(*p)) < 1e-12 for p, (ms, _) in r.fill(value).items())
    off = Refiner(GRID, Refinement.off())
    assert sorted(sample(off, f)) == sorted(("u", ci, co) for ci, co in GRID["u"])


def test_stop_closes_open_cells_and_every_point_still_gets_a_value():
    f = lambda k, ci, co: 1e-4 * ci * math.ceil(co / 32)  # noqa: E731
    r = Refiner(GRID, Refinement(budget=1.0))
    value = {p: f(*p) for p in r.first()}
    assert r.next(value, {}, len(value), stop=True) == []
    filled = r.fill(value)
    assert len(filled) == r.full and r.unchecked == r.full - sum(m for _, m in filled.values())


@pytest.mark.parametrize("bad", [dict(start=3), dict(budget=0.0), dict(budget=1.5), dict(tol=-0.1)])
def test_bad_refinement_settings(bad):
    with pytest.raises(ValueError, match="refine"):
        Refinement(**bad)


@pytest.fixture
def fake(monkeypatch):
    monkeypatch.setitem(B.BACKENDS, "fake", FakeBackend)
    return Setting(backend="fake", batch=2)


@pytest.fixture(scope="module")
def wide() -> ChannelGraph:
    torch.manual_seed(0)
    return ChannelGraph.build(create_model("halp:resnet20", num_classes=10, in_chans=1, width=2.0), (1, 12, 12))


def test_refined_build_against_a_build_that_measures_every_point(wide, fake, tmp_path):
    full = build_table(plan_build(wide, "m", fake, 4, refine=Refinement.off()), tmp_path / "f.json",
                       Protocol(rounds=1), progress=False)
    plan = plan_build(wide, "m", fake, 4)
    refined = build_table(plan, tmp_path / "r.json", Protocol(rounds=1), progress=False)
    pts = refined.meta["points"]
    assert pts["measured"] <= pts["announced"] == plan.announced < pts["reachable"] == full.n_points
    assert pts["interpolated"] > 0 and refined.n_points == full.n_points
    # the fake's 16-channel staircase on a 4-channel grid: the profiles carry it into the lattice's cells
    err = [(abs(refined.entries[k][p].ms - e.ms), e.ms) for k, v in full.entries.items() for p, e in v.items()]
    rel = np.array([d / ms for d, ms in err])
    assert np.median(rel) < 0.01 and np.percentile(rel, 95) < 0.05 and rel.max() < 0.25
    interp = [e for v in refined.entries.values() for e in v.values() if e.samples == 0]
    assert len(interp) == pts["interpolated"] and all(e.conv_ms is not None for e in interp)
    assert "reachable points" in describe_plan(plan) and str(plan.announced) in describe_plan(plan)


def test_time_limit_before_the_lattice_keeps_the_partial_and_says_how_to_go_on(graph_small, fake, tmp_path):
    plan = plan_build(graph_small, "m", fake, 4)
    out = tmp_path / "t.json"
    with pytest.raises(BuildTimeLimit, match=r"time limit \(0 s\) after measuring 0 of \d+ coarse points.*resumes"):
        build_table(plan, out, Protocol(rounds=1), progress=False, time_limit_s=0)
    assert out.with_name("t.json.partial").exists() and not out.exists()
    table = build_table(plan, out, Protocol(rounds=1), progress=False)  # the rerun resumes and finishes
    assert table.meta["points"]["stopped"] is None


def test_time_limit_during_refinement_interpolates_the_rest(wide, fake, tmp_path, monkeypatch):
    plan = plan_build(wide, "m", fake, 4, refine=Refinement(tol=0.0, budget=1.0, atol_ms=0.0))  # refine a lot
    first = len(plan.refiner().first())
    clock = {"t": 0.0, "points": 0}
    real = build_mod.measure

    def slow_measure(backend, runners, protocol, tick=None):
        if clock["points"] >= first:  # time runs out once the lattice is measured
            clock["t"] += 100.0
        clock["points"] += len(runners) // 2  # fused units are timed twice
        return real(backend, runners, protocol, tick)
    monkeypatch.setattr(build_mod, "measure", slow_measure)
    monkeypatch.setattr(build_mod, "_clock", lambda: clock["t"])
    table = build_table(plan, tmp_path / "t.json", Protocol(rounds=1), progress=False, time_limit_s=150)
    pts = table.meta["points"]
    assert pts["stopped"] == "time limit" and pts["unchecked"] > 0
    assert table.n_points == pts["reachable"]


@pytest.fixture(scope="module")
def graph_small() -> ChannelGraph:
    torch.manual_seed(0)
    return ChannelGraph.build(create_model("halp:resnet20", num_classes=10, in_chans=1, width=0.5), (1, 12, 12))


class NoisyBackend(FakeBackend):
    """Every other workload is far noisier than any protocol accepts."""

    def prepare(self, module, x, weight_pool=None):
        # seeded by call order, not id(module): ids of dropped modules are reused, which once made
        # every workload quiet
        self.prepared = getattr(self, "prepared", 0) + 1
        rng = random.Random(self.prepared)
        noisy = self.prepared % 2 == 0
        self.samples = getattr(self, "samples", 0)

        def run():
            return rng.uniform(0.2, 5.0) if noisy else 1.0
        return run

    def time_ms(self, run, n):
        self.samples += 1
        return run()


def test_remeasuring_is_bounded_and_still_noisy_points_are_flagged():
    backend = NoisyBackend("noisy", Setting())
    runners = [backend.prepare(torch.nn.Identity(), None) for _ in range(40)]
    protocol = Protocol(rounds=5, extra_budget=0.2)
    backend.samples = 0
    timings = measure(backend, runners, protocol)
    timed = backend.samples - len(runners)  # one sizing call each
    assert timed <= 1.2 * 5 * len(runners)
    assert any(t.noisy for t in timings) and not any(t.noisy for t in timings if t.spread == 0)
    assert all(t.noisy == (t.spread > protocol.max_spread) for t in timings)


class RecordingBar:
    """Stands in for the tqdm bar: keeps every update."""

    def __init__(self, total: int = 0, **_: object) -> None:
        self.total, self.n, self.steps = total, 0, []

    def update(self, n: float = 1) -> None:
        self.steps.append(n)
        self.n += n

    def write(self, _: str) -> None:
        pass

    def close(self) -> None:
        pass


def test_the_progress_bar_counts_whole_samples(wide, fake, tmp_path, monkeypatch):
    """A chunk's samples are shared over its points; the bar must still move by whole samples (it
    once read '34280.49641319943/34280') and end within one sample per chunk of what was taken."""
    bars: list[RecordingBar] = []
    monkeypatch.setattr(build_mod, "progress_bar", lambda **kw: bars.append(RecordingBar(**kw)) or bars[-1])
    build_table(plan_build(wide, "m", fake, 4), tmp_path / "t.json", Protocol(rounds=3), chunk=5)
    (bar,) = bars
    assert bar.steps and all(isinstance(n, int) and n >= 0 for n in bar.steps)
    assert isinstance(bar.total, int) and 0 < bar.n <= bar.total
