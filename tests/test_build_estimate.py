"""The table build's time forecast against the build itself, on a device-time clock.

A fake backend whose workloads advance a shared clock by a formula of their shape stands in for
the CPU; the build module reads that clock. Then the forecast and the build's recorded wall time
are both exact functions of the formula, and the forecast must come within a few per cent of what
the build spent (the old MACs-only forecast was 1.3-1.7x short on real builds).
"""
from __future__ import annotations

import pytest
import torch

from halp.graph import ChannelGraph
from halp.latency import backends as B
from halp.latency import build as build_mod
from halp.latency.backends import Setting
from halp.latency.build import build_table, describe_plan, estimate_build, plan_build
from halp.latency.refine import Refinement
from halp.latency.timing import Protocol
from halp.models import create_model

from test_latency import FakeBackend


class Clock:
    def __init__(self) -> None:
        self.ms = 0.0

    def __call__(self) -> float:  # seconds, like time.perf_counter
        return self.ms / 1000


CLOCK = Clock()


class ClockedBackend(FakeBackend):
    """Each call of a workload takes its formula's milliseconds of clock time, plus a fixed
    0.5 ms to build and prepare it (what a real build pays per workload in Python)."""

    def prepare(self, module, x, weight_pool=None):
        CLOCK.ms += 0.5
        value = super().prepare(module, x)()

        def run():
            CLOCK.ms += value
            return value
        return run

    def time_ms(self, run, n):
        return sum(run() for _ in range(n)) / n


@pytest.fixture
def clocked(monkeypatch):
    monkeypatch.setitem(B.BACKENDS, "clocked", ClockedBackend)
    monkeypatch.setattr(build_mod, "_clock", CLOCK)
    return Setting(backend="clocked", batch=2)


@pytest.fixture(scope="module")
def graph() -> ChannelGraph:
    torch.manual_seed(0)
    return ChannelGraph.build(create_model("halp:resnet20", num_classes=10, in_chans=1, width=0.5), (1, 12, 12))


@pytest.mark.parametrize("refine", [False, True], ids=["full", "refined"])
def test_the_forecast_matches_the_build_on_a_device_time_clock(graph, clocked, tmp_path, refine):
    plan = plan_build(graph, "halp:resnet20", clocked, step=4,
                      refine=Refinement() if refine else Refinement.off())
    protocol = Protocol(rounds=3)
    forecast = estimate_build(plan, protocol)
    table = build_table(plan, tmp_path / "t.json", protocol, progress=False, time_limit_s=None)
    spent = table.meta["wall_s"]
    assert forecast.samples == plan.announced * protocol.rounds
    if refine:  # refinement measures at most the announced points: the forecast is an upper estimate
        assert table.meta["points"]["measured"] <= plan.announced
        assert 0.9 * spent <= forecast.seconds <= spent * plan.announced / table.meta["points"]["measured"] * 1.1
    else:
        assert forecast.seconds == pytest.approx(spent, rel=0.05)
    assert sum(s for _, s in forecast.top) <= 1.0
    assert {k for k, _ in forecast.top} <= set(plan.specs)


def test_the_plan_says_when_the_time_limit_will_cut_the_build(graph, clocked):
    plan = plan_build(graph, "halp:resnet20", clocked, step=4, refine=Refinement.off())
    forecast = estimate_build(plan, Protocol(rounds=3))
    text = describe_plan(plan, forecast, time_limit_s=forecast.seconds / 2)
    assert "past the build's time limit" in text
    assert "past the build's time limit" not in describe_plan(plan, forecast, time_limit_s=forecast.seconds * 2)
