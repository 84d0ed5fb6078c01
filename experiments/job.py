"""The main job: dense model -> latency table -> pruning while fine-tuning -> slim -> measure.

``method`` picks the pruner (HALP or a baseline from ``baselines/``); everything else (data, dense
model, latency table, cost model, training loop, slimming, measurement, result record) is shared.
``run_job`` is plain Python (the Hydra app in ``run.py`` only builds its config), so tests and
other launchers call it directly. Every input is checked before any work starts; the result
record is written once, atomically, at the end, by rank 0 of the job's processes.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import json
import logging
import os
import subprocess
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
from omegaconf.errors import OmegaConfBaseException

from halp.counting import count
from halp.export import save_module
from halp.fileio import atomic_write_text
from halp.graph import ChannelGraph
from halp.latency.cost import CostModel
from halp.latency.feedback import FEEDBACK_PROTOCOL, Feedback
from halp.masks import ChannelMasks
from halp.macs_cost import MacsCost
from halp.pruners import Pruner, PrunerContext, create_pruner
from halp.pruners.base import percent
from halp.slim import slim_model

from . import distributed
from .assets import JobData, dense_model, latency_table, measure_latency, pin_anchors
from .config import DENSE, JobConfig, LatencyConfig, ModelConfig, config_of_record
from .data import build_datasets
from .engine import Preempted, Trainer
from .preflight import Preflight, preflight
from .figures import method_label
from .preemption import PreemptionGuard
from .runtime import CPU, Runtime
from .tasks import task_for
from .tracking import Tracker

log = logging.getLogger(__name__)

__all__ = ["JobConfig", "LatencyConfig", "ModelConfig", "format_result", "make_pruner", "run_job"]


@functools.lru_cache(maxsize=1)
def git_commit() -> str | None:
    """The commit of the code this process runs: read once, at import (below), so a commit made
    while a job or a sweep runs in this process does not relabel what the old code produced."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


git_commit()


def measured_note(entry, unit: str) -> str:
    """What measured feedback did on a pruning step, for its log line ("" when it did nothing)."""
    if entry.measured_ms is None:
        return ""
    trials = ", ".join(f"{t['predicted_ms']:.4g} -> {t['measured_ms']:.4g}" for t in entry.feedback_trials)
    return (f"; measured {entry.measured_ms:.4g} {unit} after {entry.feedback_rounds} timing(s)"
            + (f" (table's price -> measured: {trials})" if trials else ""))


def make_pruner(cfg: JobConfig, graph: ChannelGraph, cost: CostModel, runtime: Runtime = CPU) -> Pruner:
    """The pruner ``cfg.method`` names, on the shared graph and cost model."""
    if cfg.method_name == DENSE:
        raise ValueError("method 'dense' does not prune")
    context = PrunerContext(seed=cfg.seed, threads=cfg.finetune.threads, progress=cfg.progress,
                            device=str(runtime.device), score=task_for(cfg.model.name).score)
    return create_pruner(cfg.method_name, graph, cost, cfg.prune, cfg.method_cfg, context)


def attach_feedback(cfg: JobConfig, pruner: Pruner, de: distributed.DistEnv = distributed.SINGLE) -> None:
    """Give ``pruner`` measured feedback if ``latency.feedback`` asks for it and it can use it
    (rank 0 only: it alone decides the masks, the other ranks receive them)."""
    lat = cfg.latency
    if not lat.feedback:
        return
    why = (f"{method_label(cfg.method_name)} prices open-loop (it picks among sampled candidates; HALP, Taylor and magnitude close the loop)" if not pruner.uses_feedback
           else "the budget is in MACs, not latency" if pruner.cost.resource != "latency" else None)
    if why:
        log.info(f"measured feedback: off, {why}")
        return
    if de.is_main:
        pruner.feedback = Feedback(lat.setting(), tolerance=lat.feedback_tolerance, max_rounds=lat.feedback_rounds,
                                   protocol=dataclasses.replace(FEEDBACK_PROTOCOL, seed=cfg.seed))
        log.info(f"measured feedback: on; the pruning step that reaches the target times its network against the dense one here "
                 f"({lat.backend}, batch {lat.batch}, {lat.threads} thread(s)) until it is within "
                 f"{percent(lat.feedback_tolerance)} below the target ({lat.feedback_rounds} timings at most)")


def check_writable(run_dir: Path) -> None:
    """Fail before any work if results could not be written there (nothing is created yet)."""
    probe = run_dir
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise NotADirectoryError(f"run directory {run_dir} cannot be created: {probe} is a file")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise PermissionError(f"run directory {run_dir} is not writable ({probe} is read-only for this user); "
                              "choose another with hydra.run.dir=... or fix its permissions")


def completed_record(cfg: JobConfig, run_dir: Path) -> dict | None:
    """The record in ``run_dir`` if it is this very job's (same config, read in today's layout:
    a setting added since the record was written counts at its default), else ``None``."""
    path = run_dir / "result.json"
    try:
        rec = json.loads(path.read_text())
        old = config_of_record(rec["config"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError, OmegaConfBaseException):
        return None
    plain = lambda c: json.loads(json.dumps(asdict(c), default=str))  # noqa: E731
    return rec if plain(old) == plain(cfg) else None


def run_job(cfg: JobConfig, run_dir: str | Path) -> dict | None:
    """Run the whole job in ``run_dir`` (checkpoints, masks, slim model, result.json).

    Returns the result record on rank 0 (``None`` on other ranks). On a preemption signal the
    job checkpoints and hands over to submitit (requeue) or exits; rerunning it resumes."""
    if task_for(cfg.model.name).name != ("detection" if cfg.data.name == "voc" else "classification"):
        raise ValueError(f"model {cfg.model.name} does not fit data.name={cfg.data.name}: detectors (mmdet:...) "
                         "train on VOC-layout data (data=voc), classifiers on the others")
    run_dir = Path(run_dir)
    done = completed_record(cfg, run_dir)
    if done is not None:  # a rerun sweep resumes: finished jobs are not run twice
        log.info(f"{run_dir} already holds this job's result (commit {done.get('git_commit')}); skipping it. "
                 "Delete its result.json, or use another run directory, to run it again")
        return done
    runtime = cfg.trainer.resolve(distributed.detect().local_rank)  # before joining: NCCL needs the device set
    de = distributed.init(cfg.dist_backend, device_type=runtime.device.type)
    if de.is_main:
        check_writable(run_dir)
    guard = PreemptionGuard().install()
    try:
        return _run(cfg, run_dir, de, guard, runtime)
    except Preempted:
        guard.hand_over()  # requeues (submitit) or exits; does not return
        raise
    finally:
        guard.uninstall()
        distributed.shutdown()


def _preflight(cfg: JobConfig, splits: JobData, de: distributed.DistEnv) -> Preflight | None:
    """:func:`~experiments.preflight.preflight` on every rank (rank 0 alone measures the floor);
    rank 0's verdict is everyone's, so no rank waits for one that gave up."""
    found, error = None, None
    try:
        found = preflight(cfg, splits.input_shape, splits.num_classes, measure_floor=de.is_main)
    except ValueError as e:
        error = str(e)
    error = distributed.broadcast(de, error) if de.enabled else error
    if error is not None:
        raise ValueError(error)
    return found


def _run(cfg: JobConfig, run_dir: Path, de: distributed.DistEnv, guard: PreemptionGuard,
         runtime: Runtime = CPU) -> dict | None:
    cache = Path(cfg.cache_dir)
    task = task_for(cfg.model.name)
    t_start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.dense.threads)
    train, val, _, info = build_datasets(cfg.data)  # fails early, saying where to get missing data
    splits = JobData(train, val, info.num_classes, info.input_shape)
    checks = _preflight(cfg, splits, de)  # a job that cannot succeed fails here, in seconds
    log.info(f"training on {runtime.describe()}, loader workers {cfg.data.workers}")
    model, dense_metrics = dense_model(cfg, splits, cache, de, runtime)
    model.cpu()  # graph, cost model and pruner are set up on the CPU; the fine-tuning trainer moves it back
    graph = ChannelGraph.build(model, splits.input_shape)
    pinned = run_dir / "lut-anchors.json"
    lut = latency_table(cfg, graph, cache, de, pinned=pinned)
    latency_cost = CostModel.create(graph, lut.table, **cfg.latency.cost_options())
    resource = cfg.latency.cost
    cost = latency_cost if resource == "latency" else MacsCost(graph, lut.table)
    unit = cost.unit
    pruner = make_pruner(cfg, graph, cost, runtime) if cfg.method_name != DENSE else None  # checks feasibility
    if pruner is not None:
        attach_feedback(cfg, pruner, de)
    holdout = None
    if pruner is not None and pruner.holdout_size():  # training samples the dense model saw, as in EagleEye
        holdout = build_datasets(replace(cfg.data, holdout=pruner.holdout_size()))[2]
    dense_ms = latency_cost.total_ms(graph.full_widths())
    dense_budget = cost.total_ms(graph.full_widths())  # in the constrained resource (= dense_ms for latency)
    dense_counts = count(graph)
    dense_copy = copy.deepcopy(model).eval()
    name = run_dir.name
    if de.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        pin_anchors(lut, pinned)
    tracker = Tracker.start(cfg.logger, run_dir, name, asdict(cfg), rank=de.rank)
    st, setup_seconds, resumed = None, 0.0, None
    if pruner is not None:
        log.info(f"{method_label(cfg.method_name)}: pruning to {percent(cfg.prune.target)} of {dense_budget:.4g} "
                 f"{unit} (predicted dense {resource}), fine-tuning; method settings {cfg.method}")

        def report(entry) -> None:
            log.info(f"step {entry.step}: target {entry.target_ms:.4g} {unit}, predicted {entry.predicted_ms:.4g} "
                     f"{unit} ({percent(entry.achieved or 0)} of it), removed {entry.removed} channels"
                     + measured_note(entry, unit))
            tracker.log({"prune/step": entry.step, "prune/target_ms": entry.target_ms,
                         "prune/predicted_ms": entry.predicted_ms, "prune/removed": entry.removed},
                        step=entry.iteration)
        trainer = Trainer(model, splits.train, splits.val, cfg.finetune, pruner=pruner,
                          checkpoint=run_dir / "checkpoint.pt", progress=cfg.progress, on_prune=report,
                          dist=de, should_stop=guard.requested, runtime=runtime, loader=cfg.data.loader(), task=task,
                          on_epoch=lambda h: tracker.log({f"val/{k}": v for k, v in h.items()}, step=h["iteration"]))
        if trainer.try_resume():
            resumed = {"iteration": trainer.state.iteration, "prune_step": pruner.step,
                       "slurm_restarts": int(os.environ.get("SLURM_RESTART_COUNT", "0"))}
            log.info(f"resumed at iteration {trainer.state.iteration} (pruning step {pruner.step})")
        else:
            t0 = time.perf_counter()
            if de.is_main:  # one-shot methods decide their masks here; the other ranks receive them
                pruner.setup(model, splits.train, holdout)
            if de.enabled:  # CPU copies travel: a rank's tensors would otherwise land on rank 0's GPU
                cpu_state = {k: v.cpu() for k, v in model.state_dict().items()} if de.is_main else None
                pstate, mstate = distributed.broadcast(de, (pruner.state_dict(), cpu_state))
                model.load_state_dict(mstate)
                pruner.load_state_dict(pstate)
            setup_seconds = time.perf_counter() - t0
            for entry in pruner.log:
                report(entry)
            trainer.save()  # a restart must not search again
        st = trainer.fit()
        if not pruner.done:  # e.g. fp16: overflowed iterations put the schedule off past training's end
            log.warning(f"the pruning schedule did not finish: {pruner.step} of {pruner.steps_total} steps "
                        f"({pruner.delay} iteration(s) put off for want of finite gradients); the model is "
                        f"over its final target. Give fine-tuning more iterations or prune less often.")
        masks = pruner.masks
    else:
        masks = ChannelMasks.full(graph)
    if not de.is_main:
        tracker.finish()
        return None
    masks.save(run_dir / "masks.json", model_name=cfg.model.name)
    model.cpu()  # slimming, export and the latency setting's own device placement start from the CPU
    slim = slim_model(graph, masks).eval()
    final = task.evaluate(runtime.model(slim), splits.val, cfg.finetune.eval_batch_size,
                          memory_format=runtime.memory_format)
    slim.cpu()
    save_module(slim, run_dir / "slim.pt")
    log.info("measuring the dense and the slim model end to end")
    dense_t, slim_t = measure_latency(cfg, [dense_copy, slim], splits.input_shape)
    end_to_end = _end_to_end(cfg, dense_copy, slim, splits.input_shape) if task.name == "detection" else None
    widths = masks.widths()
    counts = count(graph, widths)
    ratio = cfg.prune.target if pruner is not None else 1.0
    target_measured = ratio * dense_t.ms
    train_seconds = st.train_seconds if st else 0.0
    prune_seconds = (st.prune_seconds if st else 0.0) + setup_seconds
    dense_quality = {"top1": dense_metrics["top1"], "top5": dense_metrics["top5"]} if task.name == "classification" \
        else {"map50": dense_metrics["map50"], "ap50_per_class": dense_metrics.get("ap50_per_class")}
    pruned_quality = {"top1": final["top1"], "top5": final["top5"]} if task.name == "classification" \
        else {"map50": final["map50"], "ap50_per_class": final.get("ap50_per_class")}
    result = {
        "method": cfg.method_name, "model": cfg.model.name, "dataset": _dataset_label(cfg), "seed": cfg.seed,
        "target_ratio": ratio, "git_commit": git_commit(), "world_size": de.world,
        "config": asdict(cfg), "lut": {"id": lut.id, "path": str(lut.path), "created": lut.table.meta.get("created"),
                                       "reused": lut.reused, "anchors": lut.table.calibration["anchors"],
                                       "anchor_id": lut.anchor_id, "anchors_measured": lut.anchors_measured,
                                       "setting": lut.table.meta.get("setting"), "device": lut.table.meta.get("device")},
        "dense": {**dense_quality,
                  "checkpoint": dense_metrics["checkpoint"], "reused": dense_metrics["reused"],
                  "latency_ms": dense_t.ms, "latency_spread": dense_t.spread,
                  "predicted_ms": dense_ms, "macs": dense_counts.macs, "params": dense_counts.params},
        "pruned": {**pruned_quality, "latency_ms": slim_t.ms,
                   "latency_spread": slim_t.spread, "predicted_ms": latency_cost.total_ms(widths),
                   "target_ms": target_measured, "target_predicted_ms": ratio * dense_ms,
                   "macs": counts.macs, "params": counts.params, "widths": widths},
        # the constrained resource: latency predicted by the table (ms) or MACs (millions)
        "budget": {"resource": resource, "unit": unit, "dense": dense_budget, "target": ratio * dense_budget,
                   "final": cost.total_ms(widths), "final_over_target": cost.total_ms(widths) / (ratio * dense_budget)},
        "speedup": dense_t.ms / slim_t.ms,
        "latency_vs_target": slim_t.ms / target_measured,
        "runtime": {"device": str(runtime.device), "description": runtime.describe(), "amp": runtime.amp,
                    "channels_last": runtime.channels_last, "loader_workers": cfg.data.workers},
        # per rank: train and eval images/s, the fraction of training time spent waiting for data, peak memory
        "throughput": {"dense": dense_metrics.get("throughput"), "finetune": st.throughput() if st else None},
        "prune_log": [asdict(e) for e in pruner.log] if pruner else [],
        "history": st.history if st else [],
        "wall_seconds": {"total": time.perf_counter() - t_start, "dense_train": dense_metrics.get("train_seconds", 0.0),
                         "lut": lut.seconds, "finetune_train": train_seconds,
                         "pruning_overhead": prune_seconds, "search": setup_seconds},
        "pruning_overhead_pct": 100.0 * prune_seconds / max(train_seconds, 1e-9) if st else 0.0,
        "chunk_sizes": pruner.chunks if pruner else {},
        "search": getattr(pruner, "search", None),
        "resumed": resumed,  # where this run continued from a checkpoint (preemption), or None
        "preflight": asdict(checks) if checks else None,
    }
    if task.name != "classification":
        result["task"], result["metric"] = task.name, task.metric
        result["end_to_end"] = end_to_end
    atomic_write_text(run_dir / "result.json", json.dumps(result, indent=1, default=str) + "\n")
    tracker.summary(result)
    tracker.tables(result)
    tracker.finish()
    (run_dir / "checkpoint.pt").unlink(missing_ok=True)
    (run_dir / "lut-anchors.json").unlink(missing_ok=True)
    return result


def _dataset_label(cfg: JobConfig) -> str:
    if cfg.data.name != "voc":
        return cfg.data.name
    from .voc import dataset_label

    return dataset_label(cfg.data)


def _end_to_end(cfg: JobConfig, dense: torch.nn.Module, slim: torch.nn.Module, shape: tuple) -> dict:
    """Detectors with post-processing and NMS, dense and slim interleaved (the eager backends only:
    NMS is not part of an exported graph)."""
    from halp.detection.ssd import EndToEnd

    if cfg.latency.backend == "onnxruntime":
        return {"skipped": "end-to-end latency needs the torch backend (NMS is not in the ONNX graph)"}
    log.info("measuring the dense and the slim detector end to end, with post-processing and NMS")
    dense_t, slim_t = measure_latency(cfg, [EndToEnd(dense), EndToEnd(slim)], shape)
    return {"dense_ms": dense_t.ms, "slim_ms": slim_t.ms, "dense_spread": dense_t.spread,
            "slim_spread": slim_t.spread, "speedup": dense_t.ms / slim_t.ms}


def format_result(r: dict) -> str:
    d, p = r["dense"], r["pruned"]
    label = method_label(r["method"])
    quality = ([("top-1 (%)", f"{d['top1']:.2f}", f"{p['top1']:.2f}"),
                ("top-5 (%)", f"{d['top5']:.2f}", f"{p['top5']:.2f}")] if "top1" in d else
               [("mAP@0.5 (%)", f"{d['map50']:.2f}", f"{p['map50']:.2f}")])
    rows = [("", "dense", f"{label} {r['target_ratio']:.0%}"), *quality,
            ("measured latency (ms)", f"{d['latency_ms']:.3f}", f"{p['latency_ms']:.3f}"),
            ("target (ms)", "", f"{p['target_ms']:.3f}"),
            ("predicted latency (ms)", f"{d['predicted_ms']:.3f}", f"{p['predicted_ms']:.3f}"),
            ("speedup", "1.00x", f"{r['speedup']:.2f}x"),
            ("MACs (M)", f"{d['macs'] / 1e6:.2f}", f"{p['macs'] / 1e6:.2f}"),
            ("params (k)", f"{d['params'] / 1e3:.1f}", f"{p['params'] / 1e3:.1f}")]
    e2e = r.get("end_to_end") or {}
    if "dense_ms" in e2e:
        rows.append(("end to end, NMS (ms)", f"{e2e['dense_ms']:.3f}", f"{e2e['slim_ms']:.3f}"))
    lines = [f"{a:<24}{b:>12}{c:>14}" for a, b, c in rows]
    lines.append(f"measured / target = {r['latency_vs_target']:.3f}; pruning overhead "
                 f"{r['pruning_overhead_pct']:.2f}% of fine-tune training time; total {r['wall_seconds']['total']:.0f}s")
    return "\n".join(lines)
