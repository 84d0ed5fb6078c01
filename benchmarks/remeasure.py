"""Re-time the slim models of several runs side by side, in one process, with their dense model.

Each job measures its dense and slim model together at its end, but jobs run minutes apart and
this machine's timings drift between them (we saw the same dense model at 22.4 and 29.6 ms within
ten minutes). To compare methods, time every run's ``slim.pt`` and the dense model they share
interleaved in one run of the timing protocol, and compare those medians and ratios.

    python benchmarks/remeasure.py runs/compare50 [--rounds 15] [--json out.json]

Runs are grouped by dense checkpoint and latency setting; each group is timed in one protocol run.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from experiments.assets import dense_path, new_model
from experiments.config import JobConfig, upgrade_record_config
from experiments.data import build_datasets
from halp.export import load_module
from halp.fileio import atomic_write_text
from halp.latency.backends import get_backend
from halp.latency.timing import Protocol, measure


def job_config(record: dict) -> JobConfig:
    """The run's typed config, from the plain dict its record holds."""
    config = upgrade_record_config(record["config"])  # records from before the method registry too
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(JobConfig), config))


def load_runs(root: Path) -> list[tuple[Path, dict, JobConfig]]:
    runs = []
    for path in sorted(root.rglob("result.json")):
        rec = json.loads(path.read_text())
        if not (path.parent / "slim.pt").exists():
            print(f"skipping {path.parent}: no slim.pt", file=sys.stderr)
            continue
        runs.append((path.parent, rec, job_config(rec)))
    if not runs:
        raise SystemExit(f"no run with result.json and slim.pt under {root}")
    return runs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs_dir", type=Path)
    ap.add_argument("--rounds", type=int, default=15, help="protocol rounds (default 15)")
    ap.add_argument("--repeat", type=int, default=1,
                    help="run the whole interleaved measurement this many times; report medians and ranges")
    ap.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = ap.parse_args(argv)
    groups: dict[tuple, list] = {}
    for run_dir, rec, cfg in load_runs(args.runs_dir):
        ckpt = Path(rec["dense"].get("checkpoint") or dense_path(cfg, Path(cfg.cache_dir)))
        groups.setdefault((str(ckpt), json.dumps(OmegaConf.to_container(OmegaConf.structured(cfg.latency)),
                                                 sort_keys=True)), []).append((run_dir, rec, cfg))
    out = []
    for (ckpt, _), members in groups.items():
        cfg0 = members[0][2]
        info = build_datasets(cfg0.data)[3]  # classes and input shape (a dataset's header only)
        dense = new_model(cfg0, info.num_classes, info.input_shape[0])
        dense.load_state_dict(torch.load(ckpt, map_location="cpu", weights_only=False)["model"])
        slims = [load_module(run_dir / "slim.pt") for run_dir, _, _ in members]
        setting = cfg0.latency.setting()
        input_shape = info.input_shape
        repeats = []
        with get_backend(setting) as backend:
            x = torch.randn(setting.batch, *input_shape)
            runners = [backend.prepare(m.eval(), x) for m in [dense, *slims]]
            for r in range(args.repeat):
                repeats.append(measure(backend, runners, Protocol(rounds=args.rounds, sample_ms=50.0, seed=r)))
        dense_ms = [t[0].ms for t in repeats]
        print(f"\n{ckpt}: {setting.backend} batch {setting.batch}, {setting.threads} thread(s), {args.rounds} rounds "
              f"x {args.repeat}, all interleaved; dense " + ", ".join(f"{t[0].ms:.2f} ms ({t[0].spread:.0%} spread)"
                                                                   for t in repeats))
        metric = members[0][1].get("metric", "top1")  # detectors: mAP@0.5
        print(f"{'run':<50}{'target':>7}{'slim/dense (median, range)':>30}{'job said':>10}{metric:>8}")
        for i, (run_dir, rec, _) in enumerate(members, start=1):
            ratios = [t[i].ms / t[0].ms for t in repeats]
            name = str(run_dir.relative_to(args.runs_dir))  # sweeps reuse job names
            row = {"run": name, "method": rec["method"], "target": rec["target_ratio"],
                   "dense_ms": dense_ms, "slim_ms": [t[i].ms for t in repeats], "spread": [t[i].spread for t in repeats],
                   "ratios": ratios, "ratio": float(np.median(ratios)),
                   "job_ratio": rec["pruned"]["latency_ms"] / rec["dense"]["latency_ms"],
                   "metric": metric, metric: rec["pruned"][metric]}
            out.append(row)
            span = f"{row['ratio']:.3f} ({min(ratios):.3f}-{max(ratios):.3f})"
            print(f"{name:<50}{row['target']:>7.0%}{span:>30}{row['job_ratio']:>10.3f}{row[metric]:>8.2f}")
    if args.json:
        atomic_write_text(args.json, json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
