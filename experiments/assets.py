"""What jobs share: the trained dense model, the device's latency table and the table's end-to-end
anchors, each made once per key under a file lock (so two jobs of a sweep never write the same file;
the second waits and reuses), so that every job of a sweep prices channels, and so sets its budget in
ms, with the same anchors."""
from __future__ import annotations

import hashlib
import re
import json
import logging
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from halp.fileio import atomic_write, atomic_write_text, file_lock
from halp.graph import ChannelGraph
from halp.latency.backends import Setting, get_backend
from halp.latency.build import build_table, describe_plan, estimate_build, plan_build
from halp.latency.refine import Refinement
from halp.latency.calibration import recalibrate
from halp.latency.table import LatencyTable
from halp.latency.timing import Protocol, measure
from halp.models import create_model
from halp.models.pretrained import load_pretrained

from .config import JobConfig
from .distributed import SINGLE, DistEnv, barrier, broadcast
from .engine import Trainer
from .runtime import CPU, Runtime
from .tasks import task_for

log = logging.getLogger(__name__)
ANCHORS_FORMAT = "halp-latency-anchors"


@dataclass
class JobData:
    train: torch.utils.data.Dataset
    val: torch.utils.data.Dataset
    num_classes: int
    input_shape: tuple[int, int, int]


@dataclass
class TableInfo:
    table: LatencyTable
    path: Path
    seconds: float  # building it, or measuring its anchors
    reused: bool
    id: str         # content hash of the table file
    anchor_id: str  # content hash of the anchors it prices with (table.calibration)
    anchors_measured: bool = False  # by this job (else read from the cache or the run's pinned file)


def file_stem(model_name: str) -> str:
    """A model name as one file-name part: ``halp:resnet20`` -> ``halp_resnet20``; a config path
    (``mmdet:/a/b/ssd.py``) keeps its last 80 safe characters (no slashes)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", model_name).strip("_")[-80:]


def key_of(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _lock(stack: ExitStack, de: DistEnv, path: Path, what: str) -> None:
    if de.is_main:  # one lock per job: rank 0 holds it for the job's processes
        stack.enter_context(file_lock(path, what, say=log.info))


def dense_path(cfg: JobConfig, cache: Path) -> Path:
    """Where the dense model of ``cfg`` (model, data, dense recipe and precision, seed) is cached.
    Loader knobs and the device do not change the model and are left out of the key; the key of
    a recipe without amp or channels_last is the one it had before those settings existed."""
    recipe = {k: v for k, v in asdict(cfg.dense).items() if k != "checkpoint"}
    if recipe.get("lr_batch") is None:  # a field newer than most caches: absent when unused
        recipe.pop("lr_batch", None)
    rt = cfg.trainer
    recipe["amp"] = rt.amp == "bf16" if rt.amp in ("off", "bf16") else rt.amp  # the former bool (CPU bf16)
    if rt.channels_last:
        recipe["channels_last"] = True
    key = key_of(asdict(cfg.model), cfg.data.identity(), recipe, cfg.seed)
    return cache / "dense" / f"{file_stem(cfg.model.name)}-{key}.pt"


def new_model(cfg: JobConfig, num_classes: int, in_chans: int) -> torch.nn.Module:
    """The untrained model ``cfg.model`` names (seeded)."""
    kw = {"width": cfg.model.width} if cfg.model.name.startswith("halp:") else {}
    torch.manual_seed(cfg.seed)
    return create_model(cfg.model.name, num_classes=num_classes, in_chans=in_chans, **kw)


def dense_model(cfg: JobConfig, splits: JobData, cache: Path, de: DistEnv = SINGLE,
                runtime: Runtime = CPU) -> tuple[torch.nn.Module, dict]:
    """Train the dense model once per (model, data, recipe, seed) and reuse it, or load
    ``dense.checkpoint`` (a pretrained state dict) instead of training."""
    model = new_model(cfg, splits.num_classes, splits.input_shape[0])
    if cfg.dense.checkpoint:
        return _pretrained(cfg, model, splits, de, runtime)
    path = dense_path(cfg, cache)
    with ExitStack() as stack:
        _lock(stack, de, path, "training the dense model")
        if broadcast(de, path.exists()):
            blob = torch.load(path, map_location="cpu", weights_only=False)
            model.load_state_dict(blob["model"])
            log.info(f"dense model reused from {path} ({task_for(cfg.model.name).describe(blob['metrics'])})")
            return model, blob["metrics"] | {"train_seconds": 0.0, "checkpoint": str(path), "reused": True}
        log.info(f"training the dense model for {cfg.dense.epochs} epoch(s) on {runtime.describe()}")
        trainer = Trainer(model, splits.train, splits.val, cfg.dense, checkpoint=path.with_suffix(".partial.pt"),
                          progress=cfg.progress, dist=de, runtime=runtime, loader=cfg.data.loader(),
                          task=task_for(cfg.model.name))
        trainer.try_resume()
        st = trainer.fit()
        metrics = trainer.evaluate() if de.is_main else None
        metrics = broadcast(de, metrics)
        if de.is_main:
            state = {k: v.cpu() for k, v in model.state_dict().items()}  # a file any machine can read
            atomic_write(path, lambda tmp: torch.save({"model": state, "metrics": metrics}, tmp))
            path.with_suffix(".partial.pt").unlink(missing_ok=True)
        barrier(de)
    return model, metrics | {"train_seconds": st.train_seconds, "checkpoint": str(path), "reused": False,
                             "throughput": st.throughput()}


def _pretrained(cfg: JobConfig, model: torch.nn.Module, splits: JobData, de: DistEnv,
                runtime: Runtime) -> tuple[torch.nn.Module, dict]:
    """The model with ``dense.checkpoint``'s weights, evaluated (no training)."""
    report = load_pretrained(model, cfg.dense.checkpoint)
    log.info(f"dense model loaded from {report.path} ({report.source}, {report.tensors} tensors); "
             "no dense training")
    metrics = None
    if de.is_main:
        runtime.model(model)
        metrics = task_for(cfg.model.name).evaluate(model, splits.val, cfg.dense.eval_batch_size,
                                                    device=runtime.device, memory_format=runtime.memory_format)
    metrics = broadcast(de, metrics)
    return model, metrics | {"train_seconds": 0.0, "checkpoint": str(report.path), "reused": True,
                             "pretrained": report.source}


def table_path(cfg: JobConfig, graph: ChannelGraph, cache: Path) -> Path:
    s = cfg.latency
    shape = "x".join(map(str, graph.input_shape))
    name = (f"{file_stem(cfg.model.name)}-w{cfg.model.width}-{shape}-b{s.batch}-t{s.threads}-"
            f"{s.backend}{'-cl' if s.channels_last else ''}{'-' + s.dtype if s.dtype != 'float32' else ''}-s{s.step}")
    r = s.refinement()
    if r.start == 1:
        name += "-full"
    elif r != Refinement():
        name += f"-r{r.tol:g}-{r.budget:g}"
    return cache / "luts" / f"{name}.json"


def latency_table(cfg: JobConfig, graph: ChannelGraph, cache: Path, de: DistEnv = SINGLE,
                  pinned: Path | None = None) -> TableInfo:
    """Build the table for this model and setting, or reuse it, with its end-to-end anchors.
    Only rank 0 measures; the other ranks receive the table.

    The anchors are measured once per (table, setting) and kept in the cache
    (:func:`anchors_path`), so every job of a sweep prices with the same ones;
    ``latency.remeasure_anchors`` measures them again (and replaces the kept ones).
    ``pinned`` (a run's own file, written by :func:`pin_anchors`): when the run is resumed, its
    anchors are read back instead, so that the resumed run prices channels exactly as before the
    interruption and makes the same pruning decisions."""
    info = _latency_table(cfg, graph, cache, pinned) if de.is_main else None
    return broadcast(de, info)


def _latency_table(cfg: JobConfig, graph: ChannelGraph, cache: Path, pinned: Path | None) -> TableInfo:
    info = _load_or_build(cfg, graph, cache, pinned is not None and pinned.exists())
    if pinned is not None and pinned.exists():
        info.table.calibration = json.loads(pinned.read_text())
        info.anchor_id = anchor_id(info.table.calibration)
        log.info(f"using the anchors {info.anchor_id} this run measured before it was interrupted ({pinned.name})")
    return info


def pin_anchors(info: TableInfo, pinned: Path) -> None:
    """Keep the anchors a run prices with, for :func:`latency_table` when the run resumes."""
    if not pinned.exists():
        atomic_write_text(pinned, json.dumps(info.table.calibration, indent=1) + "\n")


def anchor_id(calibration: dict | None) -> str:
    """Content hash of a set of anchors (the same wherever they were read from)."""
    return key_of(calibration)


def anchors_path(cfg: JobConfig, graph: ChannelGraph, cache: Path, table: Path, table_id: str) -> Path:
    """Where the anchors of ``table`` (file content ``table_id``) in this job's setting are kept:
    ``anchors/`` in the cache, beside ``luts/`` (a table given by path may lie where jobs cannot write)."""
    setting = cfg.latency.setting()
    out = [graph.layers[n].out_channels for n in graph.output_layers]
    key = key_of(table_id, {**setting.__dict__}, list(graph.input_shape), out)
    return cache / "anchors" / f"{table.stem}.anchors-{key}.json"


def _load_or_build(cfg: JobConfig, graph: ChannelGraph, cache: Path, skip_anchors: bool) -> TableInfo:
    setting = cfg.latency.setting()
    backend = get_backend(setting)
    given = bool(cfg.latency.table)
    path = Path(cfg.latency.table) if given else table_path(cfg, graph, cache)
    with ExitStack() as stack:
        if not given:  # the anchors too are measured under this lock: once, by the job that holds it
            _lock(stack, SINGLE, path, "building the latency table and its anchors")
        if not path.exists() and not given:
            log.info(f"building the latency table {path}")
            t0 = time.perf_counter()
            plan = plan_build(graph, cfg.model.name, setting, cfg.latency.step, refine=cfg.latency.refinement())
            protocol = Protocol(rounds=cfg.latency.rounds)
            log.info(describe_plan(plan, estimate_build(plan, protocol), cfg.latency.time_limit_s))
            table = build_table(plan, path, protocol, progress=cfg.progress, time_limit_s=cfg.latency.time_limit_s)
            pts = table.meta["points"]
            log.info(f"latency table built in {table.meta['wall_s']:.0f} s: {pts['measured']} points measured, "
                     f"{pts['interpolated']} interpolated")
            tid = _file_id(path)
            _store_anchors(anchors_path(cfg, graph, cache, path, tid), table.calibration, tid, setting)
            return TableInfo(table, path, time.perf_counter() - t0, False, tid, anchor_id(table.calibration), True)
        table = LatencyTable.load(path)
        rebuild = "rebuild it here with `halp lut build`" if given else f"delete {path} so that the job rebuilds it"
        table.check_setting({**setting.__dict__, "memory_format": setting.memory_format}, backend.device()["name"],
                            allow_mismatch=cfg.latency.allow_mismatch, override="latency.allow_mismatch=true",
                            rebuild=rebuild)
        tid = _file_id(path)
        if skip_anchors:  # the caller reads the run's pinned anchors
            return TableInfo(table, path, 0.0, True, tid, anchor_id(table.calibration))
        apath = anchors_path(cfg, graph, cache, path, tid)
        if given:
            _lock(stack, SINGLE, apath, "measuring the latency table's anchors")
        remeasure = cfg.latency.remeasure_anchors
        kept = None if remeasure else _read_anchors(apath, tid)
        if kept is not None:
            table.calibration = kept
            log.info(f"latency table reused from {path}, with the anchors {anchor_id(kept)} of {apath.name}")
            return TableInfo(table, path, 0.0, True, tid, anchor_id(kept))
        log.info(f"latency table reused from {path}; " + ("re-measuring its end-to-end anchors (remeasure_anchors)"
                                                          if remeasure else "measuring its end-to-end anchors"))
        t0 = time.perf_counter()
        table.calibration = recalibrate(graph, table, setting)
        _store_anchors(apath, table.calibration, tid, setting)
        return TableInfo(table, path, time.perf_counter() - t0, True, tid, anchor_id(table.calibration), True)


def _store_anchors(path: Path, calibration: dict | None, table_id: str, setting: Setting) -> None:
    blob = {"format": ANCHORS_FORMAT, "table": table_id, "setting": {**setting.__dict__},
            "anchor_id": anchor_id(calibration), "calibration": calibration}
    atomic_write_text(path, json.dumps(blob, indent=1) + "\n")


def _read_anchors(path: Path, table_id: str) -> dict | None:
    """The kept anchors of the table ``table_id``, or None (missing, foreign or corrupt: measure again)."""
    if not path.exists():
        return None
    try:
        blob = json.loads(path.read_text())
        if blob.get("format") != ANCHORS_FORMAT or blob.get("table") != table_id:
            raise ValueError("not the anchors of this table")
        cal = blob["calibration"]
        if not isinstance(cal, dict) or not isinstance(cal.get("anchors"), list):
            raise ValueError("no anchors in it")
        return cal
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        log.warning(f"ignoring the kept anchors {path} ({e}); measuring them again")
        return None


def measure_latency(cfg: JobConfig, models: list[torch.nn.Module], shape: tuple[int, ...],
                    rounds: int | None = None, repeats: int | None = None) -> list:
    """End-to-end latency of ``models`` in the table's setting, interleaved: ``repeats`` runs
    (default ``cfg.measure_repeats``) of ``rounds`` rounds each (default ``cfg.measure_rounds``).
    Returns the timings of the run whose last-to-first ratio (slim ÷ dense, as the job calls it)
    is the median, so the record's two times and their ratio come from one run; a single short
    run on a shared host misses that ratio by several per cent (``results/cpu_fashion_mnist.md``)."""
    setting = cfg.latency.setting()
    backend = get_backend(setting)
    runs = []
    with backend:
        x = torch.randn(setting.batch, *shape)
        runners = [backend.prepare(m.eval(), x) for m in models]
        for r in range(repeats or cfg.measure_repeats):
            runs.append(measure(backend, runners, Protocol(rounds=rounds or cfg.measure_rounds, sample_ms=50.0,
                                                            seed=cfg.seed + r)))
    runs.sort(key=lambda ts: ts[-1].ms / ts[0].ms)
    return runs[(len(runs) - 1) // 2]


def _file_id(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]
