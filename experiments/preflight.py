"""Checks that need no training, run before the dense model is trained or a latency table built.

A job that will fail should fail in seconds, not after an hour of dense training and a table
build. On the untrained model this checks, in order: the channel graph (tracing names the layer
that fails), which groups cannot be pruned (listed once; every method, the anchors and the cost
model leave them at full width), the anchors' masks, a slim round trip at random widths, the
latency table's plan (every unit can be built at its smallest widths), and the latency floor
against the target (predicted by the table the job will price with when it is given one or finds
one in its cache; otherwise measured end to end, the dense model against every prunable group at
its smallest width; counted for a MACs budget).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from halp.counting import count
from halp.graph import ChannelGraph
from halp.latency.anchors import anchor_widths
from halp.latency.build import plan_build
from halp.latency.cost import CostModel
from halp.latency.table import LatencyTable
from halp.masks import ChannelMasks
from halp.pruners.base import floor_widths, percent
from halp.roundtrip import roundtrip
from halp.slim import slim_model

from .assets import measure_latency, new_model, table_path
from .config import DENSE, JobConfig

log = logging.getLogger(__name__)

__all__ = ["Preflight", "preflight"]

FLOOR_SLACK = 0.95  # a measured floor this far above the target is an error (timing noise aside)


@dataclass
class Preflight:
    """What the checks found (logged, and kept in the result record)."""
    groups: int
    prunable: int
    fixed: dict[str, str]  # group id -> why it cannot be pruned
    roundtrip_ok: bool
    plan_points: int
    plan_units: int
    floor_ratio: float | None  # the resource at its floor, as a fraction of dense (None: not checked)
    seconds: float


def preflight(cfg: JobConfig, input_shape: tuple[int, ...], num_classes: int, measure_floor: bool = True) -> Preflight:
    """Run the checks on a fresh model of ``cfg``; raise ``ValueError`` with the reason if the job
    cannot succeed. ``measure_floor=False`` skips the end-to-end floor measurement (latency only)."""
    t0 = time.perf_counter()
    model = new_model(cfg, num_classes, input_shape[0]).eval()
    size = getattr(model, "input_size", None)  # detectors: anchors are laid out for one input size
    if size is not None and tuple(input_shape[1:]) != (size, size):
        raise ValueError(f"{cfg.model.name} takes {size} x {size} images, but the data give "
                         f"{input_shape[1]} x {input_shape[2]}: set data.image_size={size}")
    graph = ChannelGraph.build(model, input_shape)
    fixed = {g.id: "; ".join(g.unsupported) for g in graph.groups.values() if not g.prunable}
    if fixed:
        shown = list(fixed.items())[:8]
        log.info(f"{len(fixed)} of {len(graph.groups)} channel groups cannot be pruned and stay at full width "
                 f"(every method, anchors and cost model): "
                 + "; ".join(f"{gid} ({why})" for gid, why in shown) + (" ..." if len(fixed) > len(shown) else ""))
    pruning = cfg.method_name != DENSE
    prunable = graph.prunable_groups(include_stem=cfg.prune.prune_stem)
    if pruning and not prunable:
        raise ValueError(f"{cfg.model.name} has no channel group that can be pruned"
                         + (f": {'; '.join(sorted(set(fixed.values())))[:300]}" if fixed else "")
                         + " (see `halp inspect`)")

    steps = {gid: g.grid_step(cfg.latency.step) for gid, g in graph.groups.items()}
    for name, widths in anchor_widths(graph, steps).items():
        try:
            ChannelMasks.prefix(graph, widths).validate(graph)
        except ValueError as e:
            raise ValueError(f"the {name!r} latency anchor cannot be built: {e}") from None

    rt = roundtrip(graph, seed=cfg.seed, vanish_prob=0.2 if cfg.prune.allow_vanish else 0.0)
    if not rt.ok:
        raise ValueError(f"{cfg.model.name} cannot be slimmed faithfully: {rt.problem()}; "
                         f"`halp inspect {cfg.model.name} --input-shape {','.join(map(str, input_shape))}` shows the groups")

    plan = plan_build(graph, cfg.model.name, cfg.latency.setting(), cfg.latency.step)
    for key, spec in plan.specs.items():
        pts = [(ci, co) for k, ci, co in plan.points if k == key]
        ci, co = min(pts) if pts else (1, 1)
        try:
            spec.build(ci, co)
        except Exception as e:  # a unit the table could never measure
            raise ValueError(f"latency table unit {key} cannot be built at (c_in, c_out)=({ci}, {co}): {e}") from None

    floor_ratio, how = None, "measured end to end"
    if pruning:
        floor = floor_widths(graph, prunable, cfg.prune, steps)
        if cfg.latency.cost == "macs":
            floor_ratio = count(graph, floor).macs / count(graph).macs
        elif cfg.latency.table:  # the job prices with this table: its prediction is the floor that counts
            floor_ratio = _table_floor(cfg, graph, floor, Path(cfg.latency.table))
            how = "predicted by the given latency table"
        elif (cached := table_path(cfg, graph, Path(cfg.cache_dir))).exists() and \
                (floor_ratio := _table_floor(cfg, graph, floor, cached)) is not None:
            # a table this job will reuse: its prediction decides, and an end-to-end timing of
            # 3 rounds can be 10 % off it on a busy machine (a target passed here, refused later)
            how = f"predicted by this model's cached latency table {cached.name}"
        elif measure_floor:
            smallest = slim_model(graph, ChannelMasks.prefix(graph, floor)).eval()
            dense_t, floor_t = measure_latency(cfg, [model, smallest], input_shape, rounds=3, repeats=1)  # a quick check
            floor_ratio = floor_t.ms / dense_t.ms
        if floor_ratio is not None and cfg.prune.target < FLOOR_SLACK * floor_ratio:
            what, how = ("MACs", "counted") if cfg.latency.cost == "macs" else ("latency", how)
            raise ValueError(f"target {percent(cfg.prune.target)} of dense is below this model's {what} floor, about "
                             f"{percent(floor_ratio)} of dense ({how}) with every prunable group at its smallest width; "
                             "raise prune.target" + ("" if cfg.prune.allow_vanish else ", or set prune.allow_vanish=true"))
    found = Preflight(len(graph.groups), len(prunable), fixed, rt.ok, len(plan.points), len(plan.specs),
                      floor_ratio, round(time.perf_counter() - t0, 2))
    log.info(f"preflight passed in {found.seconds:.1f}s: {found.prunable}/{found.groups} groups prunable, slim round "
             f"trip OK, latency table plan {found.plan_points} points over {found.plan_units} units"
             + (f", floor {percent(floor_ratio)} of dense" if floor_ratio is not None else ""))
    del model, graph
    torch.manual_seed(cfg.seed)  # the dense model is built next from the same seed
    return found


def _table_floor(cfg: JobConfig, graph: ChannelGraph, floor: dict[str, int], path: Path) -> float | None:
    """The floor as a fraction of dense predicted by the table at ``path`` (given to the job or
    cached for it); None when the table does not load or fit (the job's own table checks then say
    why, in its words)."""
    try:
        table = LatencyTable.load(path)
        cost = CostModel.create(graph, table, **cfg.latency.cost_options())
        return cost.total_ms(floor) / cost.total_ms(graph.full_widths())
    except (ValueError, FileNotFoundError, KeyError):
        return None
