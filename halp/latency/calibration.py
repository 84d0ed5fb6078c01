"""End-to-end anchors that calibrate what the units miss (adds, dispatch, cache effects).

A few whole networks are timed end to end — the dense model, every group at about half its
width, and the grid's smallest model — interleaved in one run. The cost model then maps its sum
of unit latencies to an end-to-end prediction through these anchors (``overhead="anchors"``,
piecewise linear in the units' sum), or through the dense anchor alone (``offset``/``scale``, the
one-measurement forms) or the dense and smallest ones (``affine``); that math lives in
:mod:`.anchors`, this module only measures.

Anchors take seconds to measure and drift between runs by several per cent on our machines, so
they are measured apart from the table (:func:`recalibrate`); the experiment suite measures them
once per table and setting and prices every job of a sweep with the same ones (one budget).
"""
from __future__ import annotations

import copy
import datetime as _dt

import torch

from ..graph import ChannelGraph
from ..masks import ChannelMasks
from ..slim import slim_model
from .anchors import anchor_widths
from .backends import Backend, Setting, get_backend
from .timing import Protocol, measure

ANCHOR_PROTOCOL = Protocol(rounds=9, sample_ms=50.0)


def calibrate(graph: ChannelGraph, steps: dict[str, int], backend: Backend,
              protocol: Protocol = ANCHOR_PROTOCOL) -> dict:
    """Time the anchors end to end (interleaved) with an entered ``backend``."""
    x = torch.randn(backend.setting.batch, *graph.input_shape)
    anchors = anchor_widths(graph, steps)
    models = [copy.deepcopy(graph.model).eval() if name == "dense" else
              slim_model(graph, ChannelMasks.prefix(graph, w)).eval() for name, w in anchors.items()]
    timings = measure(backend, [backend.prepare(m, x) for m in models], protocol)
    return {"anchors": [{"name": name, "ms": t.ms, "spread": t.spread, "widths": anchors[name]}
                        for name, t in zip(anchors, timings)],
            "batch": backend.setting.batch,
            "measured": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}


def recalibrate(graph: ChannelGraph, table, setting: Setting) -> dict:
    """Fresh anchors for ``table`` in ``setting`` (the table is not modified)."""
    steps = {gid: int(g.get("step", 1)) for gid, g in table.groups.items()}
    with get_backend(setting) as backend:
        return calibrate(graph, steps, backend)
