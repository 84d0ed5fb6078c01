"""Shared test helpers."""
from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from halp.latency.backends import Setting, torch_version
from halp.latency.build import plan_build
from halp.latency.table import Entry, LatencyTable
from halp.latency.units import model_units

os.environ.setdefault("WANDB_MODE", "disabled")


@torch.no_grad()
def randomize_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial statistics and affine terms, so that outputs are O(1) and
    a wrongly kept or dropped channel shows up (fresh BNs are identity-like and hide mistakes)."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
            if m.affine:
                m.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(n, generator=gen) * 0.2 + 0.1)  # mostly alive after ReLU
    return model


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(1234)


def synthetic_table(graph, f, step=4) -> LatencyTable:
    """A table whose entries are f(layer unit, c_in, c_out) on the full grid."""
    units = model_units(graph)
    plan = plan_build(graph, "t", Setting(), step)
    t = LatencyTable(meta={"model": "t", "setting": {"batch": 1}, "versions": {"torch": torch_version()}},
                     layers={n: u.key for n, u in units.items()},
                     groups={gid: {"width": g.width, "step": plan.steps[gid]} for gid, g in graph.groups.items()},
                     calibration=None)
    for key, ci, co in plan.points:
        t.add(key, plan.specs[key], ci, co, Entry(f(plan.specs[key], ci, co), conv_ms=f(plan.specs[key], ci, co) / 2))
    return t
