"""Re-time every slim model of a sweep beside its dense model, in one process, interleaved.

Each job times its dense and slim model together at its end, but the jobs of a sweep run minutes
or hours apart, often two at a time, and this machine's timings drift between them (we saw the same
dense model at 22.4 and 29.6 ms within ten minutes). The reproduction pages therefore compare
methods by ratios re-timed after the sweep: for every run, its ``slim.pt`` and the dense model it
was pruned from are timed in one interleaved protocol run (``repeat`` times, with different
shuffles), and the median ratio slim / dense is kept.

Results go to one JSON file (default ``RUNS_DIR/remeasured.json``), rewritten atomically after
every run, so an interrupted re-timing resumes where it stopped; a run whose ``slim.pt`` changed
since it was timed is timed again. ``halp remeasure`` is the command; ``halp report --paper`` reads
the file.
"""
from __future__ import annotations

import hashlib
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from omegaconf import OmegaConf

from halp.export import load_module
from halp.fileio import atomic_write_text
from halp.latency.backends import get_backend
from halp.latency.timing import Protocol, measure
from halp.progress import progress_bar

from .assets import dense_path, new_model
from .config import JobConfig, config_of_record
from .data import build_datasets

FORMAT = "halp-remeasure/1"
FILE_NAME = "remeasured.json"


@dataclass
class Run:
    """One finished job of a sweep: its directory (``name`` relative to the sweep root), record and config."""
    name: str
    path: Path
    record: dict
    config: JobConfig

    @property
    def dense_checkpoint(self) -> Path:
        ckpt = (self.record.get("dense") or {}).get("checkpoint")
        return Path(ckpt) if ckpt else dense_path(self.config, Path(self.config.cache_dir))


def find_runs(root: Path, warn: Callable[[str], None]) -> list[Run]:
    """Every run under ``root`` with a ``result.json`` and a ``slim.pt`` (others are reported and skipped)."""
    if not root.is_dir():
        raise FileNotFoundError(f"runs directory {root} does not exist")
    runs = []
    for path in sorted(root.rglob("result.json")):
        if not (path.parent / "slim.pt").exists():
            warn(f"skipping {path.parent}: no slim.pt (dense runs and unfinished jobs have none)")
            continue
        try:
            rec = json.loads(path.read_text())
            runs.append(Run(path.parent.relative_to(root).as_posix(), path.parent, rec, config_of_record(rec["config"])))
        except (OSError, ValueError, KeyError, TypeError) as e:
            warn(f"skipping {path}: {e}")
    if not runs:
        raise ValueError(f"no run with result.json and slim.pt under {root}")
    return runs


def file_id(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


def load_results(path: Path) -> dict[str, Any]:
    """The re-timing file at ``path`` (an empty one if it does not exist)."""
    if not path.exists():
        return {"format": FORMAT, "runs": {}}
    blob = json.loads(path.read_text())
    if blob.get("format") != FORMAT:
        raise ValueError(f"{path} is not a re-timing file of this suite (format {blob.get('format')!r})")
    return blob


def _setting_key(cfg: JobConfig) -> str:
    return json.dumps(OmegaConf.to_container(OmegaConf.structured(cfg.latency.setting())), sort_keys=True)


def remeasure(root: str | Path, out: str | Path | None = None, rounds: int = 15, repeat: int = 3,
              force: bool = False, progress: bool = True,
              say: Callable[[str], None] = lambda m: print(m, file=sys.stderr)) -> dict[str, Any]:
    """Re-time every run under ``root`` that ``out`` does not hold yet (all of them with ``force``).

    Runs are grouped by dense checkpoint and latency setting; the dense model of a group is loaded
    once, and each of its slim models is timed interleaved with it, ``repeat`` times with ``rounds``
    rounds. Returns the file's content."""
    if rounds < 1 or repeat < 1:
        raise ValueError(f"rounds and repeat must be >= 1, got {rounds} and {repeat}")
    root = Path(root)
    out = Path(out) if out is not None else root / FILE_NAME
    blob = load_results(out)
    runs = find_runs(root, lambda m: say(f"warning: {m}"))
    todo = [r for r in runs if force or blob["runs"].get(r.name, {}).get("slim_id") != file_id(r.path / "slim.pt")]
    say(f"{len(runs)} run(s) under {root}; {len(runs) - len(todo)} already re-timed in {out}, {len(todo)} to time")
    load = os.getloadavg()[0]
    if todo and load > 0.5:
        say(f"warning: the 1-minute load average is {load:.2f}: something else is running, and the timings "
            "will be noisier. Re-time on a quiet machine (no sweep, test run or build beside it)")
    groups: dict[tuple[str, str], list[Run]] = {}
    for r in todo:
        groups.setdefault((str(r.dense_checkpoint), _setting_key(r.config)), []).append(r)
    bar = progress_bar(total=len(todo), desc="re-timing", unit="run", enabled=progress)
    for (ckpt, _), members in groups.items():
        cfg0 = members[0].config
        if not Path(ckpt).exists():
            say(f"warning: dense checkpoint {ckpt} is missing; skipping {len(members)} run(s) pruned from it")
            bar.update(len(members))
            continue
        info = build_datasets(cfg0.data)[3]  # classes and input shape (a dataset's header only)
        dense = new_model(cfg0, info.num_classes, info.input_shape[0])
        dense.load_state_dict(torch.load(ckpt, map_location="cpu", weights_only=False)["model"])
        setting = cfg0.latency.setting()
        with get_backend(setting) as backend:
            x = torch.randn(setting.batch, *info.input_shape)
            dense_runner = backend.prepare(dense.eval(), x)
            for run in members:
                slim = load_module(run.path / "slim.pt").eval()
                pair = [dense_runner, backend.prepare(slim, x)]
                timings = [measure(backend, pair, Protocol(rounds=rounds, sample_ms=50.0, seed=r)) for r in range(repeat)]
                ratios = [t[1].ms / t[0].ms for t in timings]
                blob["runs"][run.name] = {
                    "method": run.record.get("method"), "target": run.record.get("target_ratio"),
                    "seed": run.record.get("seed"), "slim_id": file_id(run.path / "slim.pt"),
                    "dense_checkpoint": Path(ckpt).name, "setting": json.loads(_setting_key(run.config)),
                    "rounds": rounds, "repeat": repeat, "load1": round(os.getloadavg()[0], 2),
                    "dense_ms": [t[0].ms for t in timings], "slim_ms": [t[1].ms for t in timings],
                    "spread": [[t[0].spread, t[1].spread] for t in timings],
                    "ratios": ratios, "ratio": statistics.median(ratios),
                    "job_ratio": run.record["pruned"]["latency_ms"] / run.record["dense"]["latency_ms"],
                    "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
                blob["runs"] = dict(sorted(blob["runs"].items()))
                atomic_write_text(out, json.dumps(blob, indent=1) + "\n")  # after every run: a rerun resumes
                bar.update(1)
    bar.close()
    return blob


def format_table(blob: dict[str, Any]) -> str:
    """The re-timed ratios as a plain-text table (one line per run)."""
    lines = [f"{'run':<48}{'target':>7}{'slim/dense (median, range)':>30}{'job said':>10}"]
    for name, r in blob["runs"].items():
        span = f"{r['ratio']:.3f} ({min(r['ratios']):.3f}-{max(r['ratios']):.3f})"
        lines.append(f"{name:<48}{r['target']:>7.0%}{span:>30}{r['job_ratio']:>10.3f}")
    return "\n".join(lines)
