"""Build a latency table for a model on this device: resumable, shardable, with progress.

Points are measured in chunks; each finished chunk is appended to ``OUT.partial`` (JSON lines,
fsynced) so an interrupted build resumes where it stopped. ``shard=(i, n)`` measures every n-th
point starting at i, so n array jobs build disjoint parts that :func:`~halp.latency.table.merge`
joins. At the end the dense model is timed end to end (the overhead calibration) and the table is
written atomically; the partial file is removed.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..graph import ChannelGraph
from ..progress import progress_bar
from .backends import Backend, Setting, get_backend
from .calibration import calibrate
from .table import Entry, LatencyTable
from .timing import Protocol, measure
from .units import UnitSpec, enumerate_points, model_units


@dataclass
class BuildPlan:
    graph: ChannelGraph
    model_name: str
    setting: Setting
    steps: dict[str, int]
    units: dict[str, UnitSpec]
    points: list[tuple[str, int, int]]
    shard: tuple[int, int] | None = None

    @property
    def specs(self) -> dict[str, UnitSpec]:
        return {u.key: u for u in self.units.values()}


def parse_shard(text: str | None) -> tuple[int, int] | None:
    if not text:
        return None
    try:
        i, n = (int(p) for p in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard must look like i/n (e.g. 0/4), got {text!r}") from None
    if not (n >= 1 and 0 <= i < n):
        raise ValueError(f"--shard {text}: need 0 <= i < n")
    return i, n


def plan_build(graph: ChannelGraph, model_name: str, setting: Setting, step: int,
               shard: tuple[int, int] | None = None, include_stem: bool = True) -> BuildPlan:
    """Enumerate the points to measure: every group moves by ``step`` channels."""
    if step < 1:
        raise ValueError(f"--step must be a positive number of channels, got {step}")
    if not graph.layers:
        raise ValueError("the model has no conv or linear layer to measure")
    steps = {gid: g.grid_step(step) for gid, g in graph.groups.items()}
    units = model_units(graph)
    pts = [(k, ci, co) for k, v in enumerate_points(graph, units, steps).items() for ci, co in v]
    if shard is not None:
        pts = pts[shard[0]::shard[1]]
    return BuildPlan(graph, model_name, setting, steps, units, pts, shard)


def _signature(plan: BuildPlan, backend: Backend, protocol: Protocol) -> dict:
    return {"model": plan.model_name, "input_shape": list(plan.graph.input_shape),
            "setting": {**plan.setting.__dict__, "memory_format": plan.setting.memory_format},
            "device": backend.device()["name"], "versions": backend.versions(), "steps": plan.steps,
            "shard": list(plan.shard) if plan.shard else None, "protocol": protocol.to_dict()}


def _read_partial(path: Path, signature: dict) -> dict[tuple[str, int, int], Entry]:
    done: dict[tuple[str, int, int], Entry] = {}
    with open(path) as f:
        lines = f.read().splitlines()
    if not lines:
        return done
    try:
        header = json.loads(lines[0])
    except json.JSONDecodeError:
        raise ValueError(f"{path} is not a halp partial table; delete it to start over") from None
    theirs = header.get("signature") if isinstance(header, dict) else None
    theirs = theirs if isinstance(theirs, dict) else {}
    if "versions" not in theirs:  # started before builds recorded them: unknown
        theirs = {**theirs, "versions": signature.get("versions")}
    if theirs != signature:
        diff = sorted(k for k in set(theirs) | set(signature) if theirs.get(k) != signature.get(k))
        raise ValueError(f"{path} was started with other settings (differs in: {', '.join(diff)}); "
                         "use the same settings to resume, or delete it to start over")
    for line in lines[1:]:
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            break  # a line cut by the interruption: it and anything after are measured again
        done[(r["u"], r["ci"], r["co"])] = Entry(r["ms"], r["sp"], r["n"], r.get("cms"))
    return done


def _append(path: Path, lines: list[dict]) -> None:
    with open(path, "a") as f:
        for r in lines:
            f.write(json.dumps(r, separators=(",", ":")) + "\n")
        f.flush()
        os.fsync(f.fileno())


MAX_POOL_MB = 128.0


def build_table(plan: BuildPlan, out: str | os.PathLike, protocol: Protocol | None = None,
                resume: bool = True, chunk: int = 24, progress: bool = True) -> LatencyTable:
    """Measure every point of ``plan`` and write the table to ``out``.

    By default the protocol's weight pool is the size of the model's parameters (at most
    ``MAX_POOL_MB``), so each unit sees the cache pressure of the whole network."""
    if protocol is None:
        protocol = Protocol()
    if protocol.weight_pool_mb is None:
        mb = sum(p.numel() * p.element_size() for p in plan.graph.model.parameters()) / 2**20
        protocol = dataclasses.replace(protocol, weight_pool_mb=round(min(mb, MAX_POOL_MB), 1))
    pool = torch.randn(int(protocol.weight_pool_mb * 2**20 / 4)) if protocol.weight_pool_mb else None
    out = Path(out)
    partial = out.with_name(out.name + ".partial")
    backend = get_backend(plan.setting)
    t_start = time.perf_counter()
    with backend:
        sig = _signature(plan, backend, protocol)
        done = _read_partial(partial, sig) if (resume and partial.exists()) else {}
        if not resume and partial.exists():
            partial.unlink()
        if not partial.exists():
            out.parent.mkdir(parents=True, exist_ok=True)
            _append(partial, [{"signature": sig}])
        todo = [p for p in plan.points if p not in done]
        specs = plan.specs
        bar = progress_bar(total=len(todo) * protocol.rounds, unit="sample", enabled=progress,
                   desc=f"LUT {plan.model_name}" + (f" shard {plan.shard[0]}/{plan.shard[1]}" if plan.shard else ""),
                   initial=0)
        if done:
            bar.write(f"resuming: {len(done)} of {len(plan.points)} points already measured")
        for start in range(0, len(todo), chunk):
            part = todo[start:start + chunk]
            runners, slots = [], []  # slots[k] = (runner of the unit, runner of its conv alone)
            for key, ci, co in part:
                spec = specs[key]
                x = spec.example_input(plan.setting.batch, ci)
                runners.append(backend.prepare(spec.build(ci, co, fused=True), x, pool))
                fused_i = conv_i = len(runners) - 1
                if spec.fused:  # also the conv alone: the reference method's cost
                    runners.append(backend.prepare(spec.build(ci, co, fused=False), x, pool))
                    conv_i = len(runners) - 1
                slots.append((fused_i, conv_i))
            timings = measure(backend, runners, protocol,
                              tick=lambda n: bar.update(n * len(part) / len(runners)))
            rows = []
            for (key, ci, co), (fi, cj) in zip(part, slots):
                t = timings[fi]
                conv_ms = timings[cj].ms
                done[(key, ci, co)] = Entry(t.ms, t.spread, t.samples, conv_ms)
                rows.append({"u": key, "ci": ci, "co": co, "ms": t.ms, "sp": t.spread,
                             "n": t.samples, "cms": conv_ms})
            _append(partial, rows)
        bar.close()
        calibration = calibrate(plan.graph, plan.steps, backend)
        device, versions = backend.device(), backend.versions()
    table = LatencyTable(
        meta={"model": plan.model_name, "input_shape": list(plan.graph.input_shape),
              "num_classes": next((plan.graph.layers[n].out_channels for n in plan.graph.output_layers), None),
              "setting": sig["setting"], "device": device, "versions": versions,
              "protocol": protocol.to_dict(), "host": platform.node(),
              "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
              "shard": {"index": plan.shard[0], "count": plan.shard[1]} if plan.shard else None,
              "wall_s": round(time.perf_counter() - t_start, 1)},
        layers={n: u.key for n, u in plan.units.items()},
        groups={gid: {"width": g.width, "step": plan.steps[gid]} for gid, g in plan.graph.groups.items()},
        calibration=calibration,
    )
    for key, ci, co in plan.points:
        table.add(key, specs[key], ci, co, done[(key, ci, co)])
    table.save(out)
    partial.unlink(missing_ok=True)
    return table
