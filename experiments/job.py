"""The main job: dense model -> latency table -> pruning while fine-tuning -> slim -> measure.

``method`` picks the pruner (HALP or a baseline from ``baselines/``); everything else (data, dense
model, latency table, cost model, training loop, slimming, measurement, result record) is shared.

``run_job`` is plain Python (the Hydra app in ``run.py`` only builds its config), so tests and
other launchers call it directly. Every input is checked before any work starts; the result
record is written once, atomically, at the end.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import subprocess
import time
from dataclasses import asdict, dataclass, field, replace
from enum import Enum
from pathlib import Path

import torch
from tqdm.auto import tqdm

from halp.counting import count
from halp.data import DataConfig, build_datasets
from halp.engine import TrainConfig, Trainer, evaluate
from halp.export import save_module
from halp.fileio import atomic_write, atomic_write_text
from halp.graph import ChannelGraph
from halp.latency.backends import Setting, get_backend
from halp.latency.build import build_table, plan_build
from halp.latency.calibration import recalibrate
from halp.latency.cost import CostModel
from halp.latency.table import LatencyTable
from halp.latency.timing import Protocol, measure
from halp.masks import ChannelMasks
from halp.models import create_model
from halp.pruner import HalpPruner, PruneConfig
from halp.pruning import Pruner
from halp.slim import slim_model

from baselines import (EagleEyeConfig, EagleEyePruner, MagnitudeConfig, MagnitudePruner, TaylorConfig,
                       TaylorPruner)


class Method(str, Enum):
    """What ``method=`` may name. ``dense`` records the unpruned model (no fine-tuning)."""
    HALP = "halp"
    MAGNITUDE = "magnitude"
    TAYLOR = "taylor"
    EAGLEEYE = "eagleeye"
    DENSE = "dense"


LABELS = {Method.HALP: "HALP", Method.MAGNITUDE: "Magnitude", Method.TAYLOR: "Taylor",
          Method.EAGLEEYE: "EagleEye", Method.DENSE: "dense"}


@dataclass
class JobData:
    train: torch.utils.data.Dataset
    val: torch.utils.data.Dataset
    num_classes: int
    input_shape: tuple[int, int, int]


@dataclass
class ModelConfig:
    name: str = "halp:resnet20"
    width: float = 1.0  # width multiplier, halp: models only


@dataclass
class LatencyConfig(Setting):
    """The deployment setting (backend, batch, threads, ...) plus how to get its table."""

    batch: int = 32
    step: int = 8
    rounds: int = 5
    overhead: str = "anchors"
    table: str | None = None  # an existing table file; default: build or reuse one in the cache
    allow_mismatch: bool = False

    def setting(self) -> Setting:
        return Setting(**{f.name: getattr(self, f.name) for f in dataclasses.fields(Setting)})


@dataclass
class JobConfig:
    method: str = "halp"
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    dense: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=3, lr=0.1, warmup_epochs=0.2))
    finetune: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=2, lr=0.02))
    prune: PruneConfig = field(default_factory=lambda: PruneConfig(target=0.5, interval=20, steps=10))
    latency: LatencyConfig = field(default_factory=LatencyConfig)
    magnitude: MagnitudeConfig = field(default_factory=MagnitudeConfig)
    taylor: TaylorConfig = field(default_factory=TaylorConfig)
    eagleeye: EagleEyeConfig = field(default_factory=EagleEyeConfig)
    cache_dir: str = ".halp-cache"
    progress: bool = True
    measure_rounds: int = 9


def _key(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _say(cfg: JobConfig, msg: str) -> None:
    if cfg.progress:
        tqdm.write(f"[halp] {msg}")


def dense_model(cfg: JobConfig, splits: JobData, cache: Path) -> tuple[torch.nn.Module, dict]:
    """Train the dense model once per (model, data, schedule, seed) and reuse it."""
    kw = {"width": cfg.model.width} if cfg.model.name.startswith("halp:") else {}
    torch.manual_seed(cfg.seed)
    model = create_model(cfg.model.name, num_classes=splits.num_classes, in_chans=splits.input_shape[0], **kw)
    key = _key(asdict(cfg.model), asdict(cfg.data), asdict(cfg.dense), cfg.seed)
    path = cache / "dense" / f"{cfg.model.name.replace(':', '_')}-{key}.pt"
    if path.exists():
        blob = torch.load(path, map_location="cpu", weights_only=False)
        model.load_state_dict(blob["model"])
        _say(cfg, f"dense model reused from {path} (top-1 {blob['metrics']['top1']:.2f}%)")
        return model, blob["metrics"] | {"train_seconds": 0.0, "cached": str(path)}
    _say(cfg, f"training the dense model for {cfg.dense.epochs} epoch(s)")
    trainer = Trainer(model, splits.train, splits.val, cfg.dense, checkpoint=path.with_suffix(".partial.pt"),
                      progress=cfg.progress)
    trainer.try_resume()
    st = trainer.fit()
    metrics = evaluate(model, splits.val, cfg.dense.eval_batch_size)
    atomic_write(path, lambda tmp: torch.save({"model": model.state_dict(), "metrics": metrics}, tmp))
    path.with_suffix(".partial.pt").unlink(missing_ok=True)
    return model, metrics | {"train_seconds": st.train_seconds}


def latency_table(cfg: JobConfig, graph: ChannelGraph, cache: Path) -> tuple[LatencyTable, Path, float, bool]:
    """Build the table for this model and setting, or reuse it (then re-measure its anchors)."""
    setting = cfg.latency.setting()
    backend = get_backend(setting)
    if cfg.latency.table:
        path = Path(cfg.latency.table)
        table = LatencyTable.load(path)
    else:
        shape = "x".join(map(str, graph.input_shape))
        name = (f"{cfg.model.name.replace(':', '_')}-w{cfg.model.width}-{shape}-b{setting.batch}-"
                f"t{setting.threads}-{setting.backend}{'-cl' if setting.channels_last else ''}-s{cfg.latency.step}")
        path = cache / "luts" / f"{name}.json"
        if path.exists():
            table = LatencyTable.load(path)
        else:
            _say(cfg, f"building the latency table {path}")
            t0 = time.perf_counter()
            plan = plan_build(graph, cfg.model.name, setting, cfg.latency.step)
            table = build_table(plan, path, Protocol(rounds=cfg.latency.rounds), progress=cfg.progress)
            return table, path, time.perf_counter() - t0, False
    table.check_setting({**setting.__dict__, "memory_format": setting.memory_format}, backend.device()["name"],
                        allow_mismatch=cfg.latency.allow_mismatch)
    _say(cfg, f"latency table reused from {path}; re-measuring its end-to-end anchors")
    t0 = time.perf_counter()
    table.calibration = recalibrate(graph, table, setting)  # timings drift between runs
    return table, path, time.perf_counter() - t0, True


def measure_latency(cfg: JobConfig, models: list[torch.nn.Module], shape: tuple[int, ...]) -> list:
    """End-to-end latency of ``models`` in the table's setting, interleaved in one run."""
    setting = cfg.latency.setting()
    backend = get_backend(setting)
    with backend:
        x = torch.randn(setting.batch, *shape)
        return measure(backend, [backend.prepare(m.eval(), x) for m in models],
                       Protocol(rounds=cfg.measure_rounds, sample_ms=50.0, seed=cfg.seed))


def method_of(cfg: JobConfig) -> Method:
    try:
        return Method(cfg.method)
    except ValueError:
        raise ValueError(f"unknown method {cfg.method!r}; choose one of "
                         f"{', '.join(m.value for m in Method)}") from None


def make_pruner(cfg: JobConfig, graph: ChannelGraph, cost: CostModel) -> Pruner:
    """The pruner ``cfg.method`` names, on the shared graph and cost model."""
    method = method_of(cfg)
    if method is Method.HALP:
        return HalpPruner(graph, cost, cfg.prune)
    if method is Method.MAGNITUDE:
        return MagnitudePruner(graph, cost, cfg.prune, cfg.magnitude)
    if method is Method.TAYLOR:
        return TaylorPruner(graph, cost, cfg.prune, cfg.taylor)
    if method is Method.EAGLEEYE:
        return EagleEyePruner(graph, cost, cfg.prune, cfg.eagleeye, seed=cfg.seed,
                              threads=cfg.finetune.threads, progress=cfg.progress)
    raise ValueError(f"method {method.value!r} does not prune")


def run_job(cfg: JobConfig, run_dir: str | Path) -> dict:
    """Run the whole job in ``run_dir`` (checkpoints, masks, slim model, result.json)."""
    method = method_of(cfg)
    run_dir = Path(run_dir)
    cache = Path(cfg.cache_dir)
    t_start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.dense.threads)
    train, val, _, info = build_datasets(cfg.data)  # fails early, saying where to get missing data
    holdout = None
    if method is Method.EAGLEEYE:  # scored on training samples the dense model saw, as in the paper
        holdout = build_datasets(replace(cfg.data, holdout=cfg.eagleeye.holdout))[2]
    splits = JobData(train, val, info.num_classes, info.input_shape)
    model, dense_metrics = dense_model(cfg, splits, cache)
    graph = ChannelGraph.build(model, splits.input_shape)
    table, lut_path, lut_seconds, lut_reused = latency_table(cfg, graph, cache)
    cost = CostModel.create(graph, table, overhead=cfg.latency.overhead)
    pruner = make_pruner(cfg, graph, cost) if method is not Method.DENSE else None  # checks feasibility
    dense_ms = cost.total_ms(graph.full_widths())
    dense_counts = count(graph)
    dense_copy = copy.deepcopy(model).eval()
    run_dir.mkdir(parents=True, exist_ok=True)
    st, setup_seconds = None, 0.0
    if pruner is not None:
        _say(cfg, f"{LABELS[method]}: pruning to {cfg.prune.target:.0%} of {dense_ms:.3f} ms (predicted "
                  "dense), fine-tuning")

        def report(entry) -> None:
            _say(cfg, f"step {entry.step}: target {entry.target_ms:.3f} ms, predicted "
                      f"{entry.predicted_ms:.3f} ms, removed {entry.removed} channels")
        trainer = Trainer(model, splits.train, splits.val, cfg.finetune, pruner=pruner,
                          checkpoint=run_dir / "checkpoint.pt", progress=cfg.progress, on_prune=report)
        if trainer.try_resume():
            _say(cfg, f"resumed at iteration {trainer.state.iteration} (pruning step {pruner.step})")
        else:
            t0 = time.perf_counter()
            pruner.setup(model, splits.train, holdout)  # one-shot methods decide their masks here
            setup_seconds = time.perf_counter() - t0
            for entry in pruner.log:
                report(entry)
            trainer.save()  # a restart must not search again
        st = trainer.fit()
        masks = pruner.masks
    else:
        masks = ChannelMasks.full(graph)
    masks.save(run_dir / "masks.json", model_name=cfg.model.name)
    slim = slim_model(graph, masks).eval()
    final = evaluate(slim, splits.val, cfg.finetune.eval_batch_size)
    save_module(slim, run_dir / "slim.pt")
    _say(cfg, "measuring the dense and the slim model end to end")
    dense_t, slim_t = measure_latency(cfg, [dense_copy, slim], splits.input_shape)
    widths = masks.widths()
    counts = count(graph, widths)
    ratio = cfg.prune.target if pruner is not None else 1.0
    target_measured = ratio * dense_t.ms
    train_seconds = st.train_seconds if st else 0.0
    prune_seconds = (st.prune_seconds if st else 0.0) + setup_seconds
    result = {
        "method": method.value, "model": cfg.model.name, "dataset": cfg.data.name, "seed": cfg.seed,
        "target_ratio": ratio, "git_commit": git_commit(),
        "config": asdict(cfg), "lut": {"path": str(lut_path), "created": table.meta.get("created"),
                                       "reused": lut_reused, "anchors": table.calibration["anchors"],
                                       "setting": table.meta.get("setting"), "device": table.meta.get("device")},
        "dense": {"top1": dense_metrics["top1"], "top5": dense_metrics["top5"],
                  "latency_ms": dense_t.ms, "latency_spread": dense_t.spread,
                  "predicted_ms": dense_ms, "macs": dense_counts.macs, "params": dense_counts.params},
        "pruned": {"top1": final["top1"], "top5": final["top5"], "latency_ms": slim_t.ms,
                   "latency_spread": slim_t.spread, "predicted_ms": cost.total_ms(widths),
                   "target_ms": target_measured, "target_predicted_ms": ratio * dense_ms,
                   "macs": counts.macs, "params": counts.params, "widths": widths},
        "speedup": dense_t.ms / slim_t.ms,
        "latency_vs_target": slim_t.ms / target_measured,
        "prune_log": [asdict(e) for e in pruner.log] if pruner else [],
        "history": st.history if st else [],
        "wall_seconds": {"total": time.perf_counter() - t_start, "dense_train": dense_metrics.get("train_seconds", 0.0),
                         "lut_build": lut_seconds, "finetune_train": train_seconds,
                         "pruning_overhead": prune_seconds, "search": setup_seconds},
        "pruning_overhead_pct": 100.0 * prune_seconds / max(train_seconds, 1e-9) if st else 0.0,
        "chunk_sizes": pruner.chunks if pruner else {},
        "search": getattr(pruner, "search", None),
    }
    atomic_write_text(run_dir / "result.json", json.dumps(result, indent=1, default=str) + "\n")
    (run_dir / "checkpoint.pt").unlink(missing_ok=True)
    return result


def format_result(r: dict) -> str:
    d, p = r["dense"], r["pruned"]
    label = LABELS.get(Method(r["method"]), r["method"])
    rows = [("", "dense", f"{label} {r['target_ratio']:.0%}"),
            ("top-1 (%)", f"{d['top1']:.2f}", f"{p['top1']:.2f}"),
            ("top-5 (%)", f"{d['top5']:.2f}", f"{p['top5']:.2f}"),
            ("measured latency (ms)", f"{d['latency_ms']:.3f}", f"{p['latency_ms']:.3f}"),
            ("target (ms)", "", f"{p['target_ms']:.3f}"),
            ("predicted latency (ms)", f"{d['predicted_ms']:.3f}", f"{p['predicted_ms']:.3f}"),
            ("speedup", "1.00x", f"{r['speedup']:.2f}x"),
            ("MACs (M)", f"{d['macs'] / 1e6:.2f}", f"{p['macs'] / 1e6:.2f}"),
            ("params (k)", f"{d['params'] / 1e3:.1f}", f"{p['params'] / 1e3:.1f}")]
    lines = [f"{a:<24}{b:>12}{c:>14}" for a, b, c in rows]
    lines.append(f"measured / target = {r['latency_vs_target']:.3f}; pruning overhead "
                 f"{r['pruning_overhead_pct']:.2f}% of fine-tune training time; total {r['wall_seconds']['total']:.0f}s")
    return "\n".join(lines)
