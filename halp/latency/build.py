"""Build a latency table for a model on this device: resumable, shardable, with progress.

Points are measured in chunks; each finished chunk is appended to ``OUT.partial`` (JSON lines,
fsynced) so an interrupted build resumes where it stopped. ``shard=(i, n)`` measures every n-th
point starting at i, so n array jobs build disjoint parts that :func:`~halp.latency.table.merge`
joins. At the end the dense model is timed end to end (the overhead calibration) and the table is
written atomically; the partial file is removed.
"""
from __future__ import annotations

import copy
import dataclasses
import datetime as _dt
import json
import math
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..graph import ChannelGraph
from ..progress import progress_bar
from .backends import Backend, Setting, get_backend
from .calibration import ANCHOR_PROTOCOL, calibrate
from .table import Entry, LatencyTable
from .refine import Refinement, Refiner
from .timing import Protocol, measure, protocol_for
from .units import UnitSpec, enumerate_points, model_units


@dataclass
class BuildPlan:
    """What a build measures: every ``(c_in, c_out)`` point the pruner can reach (``points``), of
    which a coarse-then-refine build measures at most ``announced`` and interpolates the rest."""

    graph: ChannelGraph
    model_name: str
    setting: Setting
    steps: dict[str, int]
    units: dict[str, UnitSpec]
    points: list[tuple[str, int, int]]
    shard: tuple[int, int] | None = None
    refine: Refinement = dataclasses.field(default_factory=Refinement)

    @property
    def specs(self) -> dict[str, UnitSpec]:
        return {u.key: u for u in self.units.values()}

    def by_unit(self) -> dict[str, list[tuple[int, int]]]:
        out: dict[str, list[tuple[int, int]]] = {}
        for key, ci, co in self.points:
            out.setdefault(key, []).append((ci, co))
        return out

    def refiner(self) -> Refiner:
        return Refiner(self.by_unit(), self.refine)

    @property
    def announced(self) -> int:
        """The most points this build measures."""
        return self.refiner().budget


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
               shard: tuple[int, int] | None = None, include_stem: bool = True,
               refine: Refinement | None = None) -> BuildPlan:
    """Enumerate the points the pruner can reach: every prunable group on its grid of ``step``
    channels (a multiple of its slicing), the others at full width. ``shard=(i, n)`` keeps the
    i-th of n parts: whole units (a unit refines over its own grid), balanced by point count."""
    if step < 1:
        raise ValueError(f"--step must be a positive number of channels, got {step}")
    if not graph.layers:
        raise ValueError("the model has no conv or linear layer to measure")
    steps = {gid: g.grid_step(step) for gid, g in graph.groups.items()}
    units = model_units(graph)
    per_unit = enumerate_points(graph, units, steps)
    if shard is not None:
        load = [0] * shard[1]
        mine = set()
        for key in sorted(per_unit, key=lambda k: (-len(per_unit[k]), k)):  # largest first, to the lightest
            part = min(range(shard[1]), key=lambda i: (load[i], i))
            load[part] += len(per_unit[key])
            if part == shard[0]:
                mine.add(key)
        per_unit = {k: v for k, v in per_unit.items() if k in mine}
    pts = [(k, ci, co) for k, v in per_unit.items() for ci, co in v]
    return BuildPlan(graph, model_name, setting, steps, units, pts, shard, refine or Refinement())


def describe_plan(plan: BuildPlan, estimate: "Estimate | None" = None, time_limit_s: float | None = None) -> str:
    """A few lines for the log: points, the estimated time, what dominates it, and whether the
    build's time limit is likely to cut it short."""
    n_units = len({k for k, _, _ in plan.points})
    lines = [f"latency table plan: {len(plan.points)} reachable points over {n_units} units; "
             + (f"coarse-then-refine measures at most {plan.announced} of them"
                if plan.refine.start > 1 else "every point measured")]
    if estimate is not None:
        t = estimate.seconds
        lines.append(f"  estimated {f'{t / 60:.1f} min' if t >= 90 else f'{t:.0f} s'} ({estimate.samples} samples); "
                     "most of it: " + ", ".join(f"{k} {100 * s:.0f} %" for k, s in estimate.top))
        if time_limit_s is not None and t > time_limit_s:
            lines.append(f"  that is past the build's time limit ({time_limit_s:.0f} s): refinement will stop there and "
                         "interpolate the rest (raise the limit to measure more)")
    return "\n".join(lines)


@dataclass
class Estimate:
    seconds: float
    samples: int
    top: list[tuple[str, float]]  # (unit, share of the time), largest first


def estimate_build(plan: BuildPlan, protocol: Protocol, backend: Backend | None = None) -> Estimate:
    """Forecast the build's wall time by running it in miniature: per unit, its smallest, middle
    and largest reachable points (by ``c_in * c_out``) go through the build's own path (module
    construction, warm-up, calls per sample, re-measuring of noisy points), the unit's other points
    are interpolated piecewise linearly in ``c_in * c_out`` between them, and the anchors' end-to-end timing is added from one
    timed forward of the dense model. Takes a few seconds per unit; noise on a busy host makes it
    a forecast, not a bound (the build's sample count is the bound)."""
    by_unit = plan.by_unit()
    share = plan.announced / max(len(plan.points), 1)  # refinement measures this fraction (at most)
    backend = backend or get_backend(plan.setting)
    protocol, pool = _with_pool(plan, protocol_for(backend, protocol))
    cost: dict[str, float] = {}
    with backend:
        for key, pts in by_unit.items():
            macs = sorted({ci * co: (ci, co) for ci, co in pts}.items())
            trial = []  # (c_in * c_out, per-call ms of each runner, seconds besides those calls)
            for m, (ci, co) in sorted({i: macs[i] for i in (0, len(macs) // 2, len(macs) - 1)}.values()):
                t0 = _clock()
                runners, _ = _prepare_points(backend, plan, [(key, ci, co)], pool)
                ms = [t.ms for t in measure(backend, runners, protocol)]
                trial.append((m, ms, _clock() - t0 - sum(_protocol_ms(protocol, t) for t in ms) / 1000))
            xs = [t[0] for t in trial]

            def at(m: int, ys: list[float]) -> float:  # piecewise linear in c_in * c_out through the trials
                return float(np.interp(m, xs, ys))

            per_runner = list(zip(*(t[1] for t in trial)))
            overhead = [t[2] for t in trial]
            cost[key] = share * sum(max(at(ci * co, overhead), 0.0) + sum(_protocol_ms(protocol, at(ci * co, list(ys)))
                                                                          for ys in per_runner) / 1000
                                    for ci, co in pts)
        x = torch.randn(plan.setting.batch, *plan.graph.input_shape)
        dense = backend.prepare(copy.deepcopy(plan.graph.model).eval(), x)
        dense()
        t_dense = min(backend.time_ms(dense, 1) for _ in range(2))
    # the three anchors (dense, about half, smallest) under the anchor protocol
    anchor_protocol = protocol_for(backend, ANCHOR_PROTOCOL)
    anchors_s = sum(_protocol_ms(anchor_protocol, t) for t in (t_dense, t_dense / 2, t_dense / 8)) / 1000
    total = sum(cost.values()) + anchors_s or 1.0
    top = sorted(((k, v / total) for k, v in cost.items()), key=lambda kv: -kv[1])[:3]
    return Estimate(total, plan.announced * protocol.rounds, top)


def _protocol_ms(protocol: Protocol, t: float) -> float:
    """Device time :func:`~.timing.measure` spends on a workload of ``t`` ms, re-measuring aside."""
    calls = 1 if protocol.max_calls == 1 else max(1, min(protocol.max_calls, math.ceil(protocol.sample_ms / max(t, 1e-6))))
    return t * (protocol.warmup + (0 if protocol.max_calls == 1 else 1) + protocol.rounds * (calls + protocol.warm_calls))


def _with_pool(plan: BuildPlan, protocol: Protocol) -> tuple[Protocol, torch.Tensor | None]:
    """The protocol with its weight pool sized (by default the model's parameters, at most
    ``MAX_POOL_MB``, so each unit sees the cache pressure of the whole network), and the pool."""
    if protocol.weight_pool_mb is None:
        mb = sum(p.numel() * p.element_size() for p in plan.graph.model.parameters()) / 2**20
        protocol = dataclasses.replace(protocol, weight_pool_mb=round(min(mb, MAX_POOL_MB), 1))
    pool = torch.randn(int(protocol.weight_pool_mb * 2**20 / 4)) if protocol.weight_pool_mb else None
    return protocol, pool


def _prepare_points(backend: Backend, plan: BuildPlan, points: list[tuple[str, int, int]],
                    pool: torch.Tensor | None) -> tuple[list, list[tuple[int, int]]]:
    """Runners for ``points`` and, per point, (index of the unit's runner, index of its conv's)."""
    runners, slots = [], []
    for key, ci, co in points:
        spec = plan.specs[key]
        x = spec.example_input(plan.setting.batch, ci)
        runners.append(backend.prepare(spec.build(ci, co, fused=True), x, pool))
        fused_i = conv_i = len(runners) - 1
        if spec.fused:  # also the conv alone: the reference method's cost
            runners.append(backend.prepare(spec.build(ci, co, fused=False), x, pool))
            conv_i = len(runners) - 1
        slots.append((fused_i, conv_i))
    return runners, slots


def _signature(plan: BuildPlan, backend: Backend, protocol: Protocol) -> dict:
    return {"model": plan.model_name, "input_shape": list(plan.graph.input_shape),
            "setting": {**plan.setting.__dict__, "memory_format": plan.setting.memory_format},
            "device": backend.device()["name"], "versions": backend.versions(), "steps": plan.steps,
            "shard": list(plan.shard) if plan.shard else None, "protocol": protocol.to_dict(),
            "refine": plan.refine.to_dict()}


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
TIME_LIMIT_S = 3600.0
_clock = time.perf_counter  # the build's wall clock (tests substitute a device-time clock)


class BuildTimeLimit(ValueError):
    """The build's time limit passed before its coarse lattice was measured."""


def build_table(plan: BuildPlan, out: str | os.PathLike, protocol: Protocol | None = None,
                resume: bool = True, chunk: int = 24, progress: bool = True,
                time_limit_s: float | None = TIME_LIMIT_S) -> LatencyTable:
    """Measure ``plan`` (coarse, then refined where the latency surface bends; see
    :mod:`~halp.latency.refine`), interpolate the other reachable points, and write the table.

    The build measures at most ``plan.announced`` points, each with the protocol's rounds plus at
    most its re-measuring budget. ``time_limit_s`` bounds the wall time: past it, refinement stops
    and what is left is interpolated; if even the coarse lattice is unfinished, the build stops
    with :class:`BuildTimeLimit` (the measured points stay in ``OUT.partial`` and a rerun resumes).
    Points that stayed noisier than the protocol allows are listed in ``meta["noisy"]``.

    By default the protocol's weight pool is the size of the model's parameters (at most
    ``MAX_POOL_MB``), so each unit sees the cache pressure of the whole network."""
    backend = get_backend(plan.setting)
    protocol = protocol_for(backend, protocol or Protocol())  # CUDA: the paper's events protocol, recorded as such
    protocol, pool = _with_pool(plan, protocol)
    out = Path(out)
    partial = out.with_name(out.name + ".partial")
    t_start = _clock()
    deadline = None if time_limit_s is None else t_start + time_limit_s
    refiner = plan.refiner()
    specs = plan.specs
    noisy: dict[tuple[str, int, int], float] = {}
    with backend:
        sig = _signature(plan, backend, protocol)
        done = _read_partial(partial, sig) if (resume and partial.exists()) else {}
        if not resume and partial.exists():
            partial.unlink()
        if not partial.exists():
            out.parent.mkdir(parents=True, exist_ok=True)
            _append(partial, [{"signature": sig}])
        bar = progress_bar(total=refiner.budget * protocol.rounds, unit="sample", enabled=progress,
                           desc=f"LUT {plan.model_name}" + (f" shard {plan.shard[0]}/{plan.shard[1]}" if plan.shard else ""))
        if done:
            bar.write(f"resuming: {len(done)} points already measured")

        owed = [0.0]  # a chunk's samples are shared out over its points: the bar moves by whole samples

        def tick(n: float) -> None:
            owed[0] += n
            whole = int(owed[0] + 1e-9)
            if whole <= 0:
                return
            owed[0] -= whole
            if bar.n + whole > bar.total:  # re-measuring noisy points: the bar says so, within its budget
                bar.total = bar.n + whole
            bar.update(whole)

        def measure_all(points: list[tuple[str, int, int]]) -> bool:
            """Measure the points not measured yet; False if the deadline stopped it."""
            todo = [p for p in points if p not in done]
            bar.update(protocol.rounds * (len(points) - len(todo)))
            for start in range(0, len(todo), chunk):
                if deadline is not None and _clock() > deadline:
                    return False
                part = todo[start:start + chunk]
                runners, slots = _prepare_points(backend, plan, part, pool)
                timings = measure(backend, runners, protocol, tick=lambda n: tick(n * len(part) / len(runners)))
                rows = []
                for pt, (fi, cj) in zip(part, slots):
                    t = timings[fi]
                    done[pt] = Entry(t.ms, t.spread, t.samples, timings[cj].ms)
                    if t.noisy:
                        noisy[pt] = t.spread
                    rows.append({"u": pt[0], "ci": pt[1], "co": pt[2], "ms": t.ms, "sp": t.spread,
                                 "n": t.samples, "cms": timings[cj].ms})
                _append(partial, rows)
            return True

        if not measure_all(refiner.first()):
            bar.close()
            have = sum(p in done for p in refiner.first())
            raise BuildTimeLimit(
                f"the latency table build reached its time limit ({time_limit_s:.0f} s) after measuring {have} of "
                f"{len(refiner.first())} coarse points; they are kept in {partial} and a rerun resumes there "
                "(raise the limit: --time-limit / latency.time_limit_s)")
        stopped = None
        while True:
            value = {p: e.ms for p, e in done.items()}
            spread = {p: e.spread for p, e in done.items()}
            todo = refiner.next(value, spread, len(done), stop=stopped is not None)
            if not todo:
                break
            if not measure_all(todo):
                stopped = "time limit"
        bar.close()
        if noisy:
            worst = max(noisy.values())
            bar.write(f"{len(noisy)} of {len(done)} points stayed noisier than {protocol.max_spread:.0%} after their "
                      f"re-measuring budget (worst spread {worst:.0%}): the machine is busy; their medians are kept "
                      "and listed in the table's meta.noisy")
        calibration = calibrate(plan.graph, plan.steps, backend)
        device, versions = backend.device(), backend.versions()
    cms = refiner.fill({p: e.conv_ms for p, e in done.items()})
    ms = refiner.fill({p: e.ms for p, e in done.items()})
    if refiner.unchecked and progress:
        bar.write(f"refinement stopped by the {stopped or 'point budget'}: {refiner.unchecked} points interpolated "
                  "from cells it could not check")
    n_measured = sum(1 for v in ms.values() if v[1])
    table = LatencyTable(
        meta={"model": plan.model_name, "input_shape": list(plan.graph.input_shape),
              "num_classes": next((plan.graph.layers[n].out_channels for n in plan.graph.output_layers), None),
              "setting": sig["setting"], "device": device, "versions": versions,
              "protocol": protocol.to_dict(), "refine": plan.refine.to_dict(), "host": platform.node(),
              "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
              "shard": {"index": plan.shard[0], "count": plan.shard[1]} if plan.shard else None,
              "wall_s": round(_clock() - t_start, 1),
              "points": {"reachable": len(plan.points), "announced": refiner.budget, "measured": len(done),
                         "interpolated": len(plan.points) - n_measured, "unchecked": refiner.unchecked,
                         "stopped": stopped},
              "noisy": {"count": len(noisy), "max_spread": protocol.max_spread,
                        "worst": [[k, ci, co, round(sp, 4)] for (k, ci, co), sp in
                                  sorted(noisy.items(), key=lambda kv: -kv[1])[:20]]}},
        layers={n: u.key for n, u in plan.units.items()},
        groups={gid: {"width": g.width, "step": plan.steps[gid]} for gid, g in plan.graph.groups.items()},
        calibration=calibration,
    )
    for key, ci, co in plan.points:
        (m, was_measured), (c, _) = ms[(key, ci, co)], cms[(key, ci, co)]
        e = done[(key, ci, co)] if was_measured else Entry(m, 0.0, 0, c)
        table.add(key, specs[key], ci, co, e)
    table.save(out)
    partial.unlink(missing_ok=True)
    return table
