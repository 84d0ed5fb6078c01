"""``halp report``: record collection, aggregation (mean ± Student-t CI), tables, figures, atomic writes."""
from __future__ import annotations

import json
import math
import os
import zlib
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pandas as pd
import pytest
from scipy import stats

from halp.cli import main
from experiments.report import build_report, mean_ci

FULL = {"conv1": 16, "layer1.0.conv1": 16, "layer2.0.conv1": 32, "layer3.0.conv1": 64}
METHODS = ("halp", "taylor", "magnitude")
TARGETS = (0.3, 0.5, 0.7)
SEEDS = (0, 1, 2)
PNGS = ("pareto.png", "predicted_vs_measured.png", "widths.png")


def record(method: str, target: float, seed: int, model: str = "halp:resnet20",
           dataset: str = "fashion_mnist") -> dict:
    """A result.json in the shape experiments/job.py writes, with values that vary by seed."""
    rng = np.random.default_rng(zlib.crc32(f"{method}{target}{seed}".encode()))
    dense_ms = 11.0 + 0.1 * seed
    ms = target * dense_ms * (1 + 0.03 * rng.standard_normal())
    top1 = 91.0 + 0.1 * seed if method == "dense" else round(85 + 6 * target + rng.standard_normal(), 2)
    widths = {k: (w if method == "dense" else max(0, int(round(w * target * (1 + 0.3 * rng.random())))))
              for k, w in FULL.items()}
    return {
        "method": method, "model": model, "dataset": dataset, "seed": seed, "target_ratio": target,
        "git_commit": "0" * 40,
        "config": {"method": method, "seed": seed, "model": {"name": model, "width": 1.0},
                   "prune": {"target_ratio": target, "steps": 10}},
        "lut": {"path": "x.json", "created": "2026-01-01T00:00:00+00:00", "reused": True,
                "anchors": [{"name": "dense", "ms": dense_ms, "widths": FULL}],
                "setting": {"backend": "torch", "batch": 32, "threads": 1},
                "device": {"kind": "cpu", "name": "Test CPU"}},
        "dense": {"top1": 91.0 + 0.1 * seed, "top5": 99.8, "latency_ms": dense_ms, "latency_spread": 0.01,
                  "predicted_ms": dense_ms * 0.95, "macs": 31_000_000, "params": 272_000},
        "pruned": {"top1": top1, "top5": 99.5, "latency_ms": ms,
                   "latency_spread": 0.02, "predicted_ms": ms * 0.9, "target_ms": target * dense_ms,
                   "target_predicted_ms": target * dense_ms * 0.95, "macs": int(31e6 * target),
                   "params": int(272e3 * target), "widths": widths},
        "speedup": dense_ms / ms, "latency_vs_target": ms / (target * dense_ms),
        "prune_log": [], "history": [], "wall_seconds": {"total": 100.0 + seed},
        "some_future_field": {"nested": [1, 2]},  # new fields must not break the report
    }


def write_runs(root: Path) -> Path:
    for m in METHODS:
        for t in TARGETS:
            for s in SEEDS:
                d = root / "sweep" / f"{m}-t{t}-s{s}"
                d.mkdir(parents=True)
                (d / "result.json").write_text(json.dumps(record(m, t, s)))
    dense = record("dense", 1.0, 0)
    (root / "dense-s0").mkdir()
    (root / "dense-s0" / "result.json").write_text(json.dumps(dense))
    (root / "broken").mkdir()
    (root / "broken" / "result.json").write_text('{"method": "halp", "model": ')  # crashed mid-write
    return root


def expected(root: Path, method: str, target: float, key: str) -> tuple[float, float]:
    vals = [json.loads((root / "sweep" / f"{method}-t{target}-s{s}" / "result.json").read_text())["pruned"][key]
            for s in SEEDS]
    lo, hi = stats.t.interval(0.95, len(vals) - 1, loc=np.mean(vals), scale=stats.sem(vals))
    return float(np.mean(vals)), float((hi - lo) / 2)


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000, path
    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100


def no_temp_files(out: Path) -> bool:
    return not [p for p in out.iterdir() if p.name.startswith(".") or p.suffix == ".tmp"]


def test_cli_report_tables_figures_and_ci(tmp_path, capsys):
    runs = write_runs(tmp_path / "runs")
    out = tmp_path / "out"
    assert main(["report", str(runs), "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "## halp:resnet20 on fashion_mnist" in captured.out and "| HALP | 50% |" in captured.out
    assert "skipping" in captured.err and "broken" in captured.err and "invalid JSON" in captured.err
    assert str(out / "pareto.png") in captured.err
    assert "Traceback" not in captured.err

    table = pd.read_csv(out / "table.csv")
    assert len(table) == len(METHODS) * len(TARGETS) + 1
    row = table[(table.method == "halp") & (table.target == 0.5)].iloc[0]
    mean, half = expected(runs, "halp", 0.5, "top1")
    assert row["n"] == 3 and row["top1_mean"] == pytest.approx(mean) and row["top1_ci"] == pytest.approx(half)
    assert row["method_seconds_mean"] == pytest.approx(100.0 + sum(SEEDS) / len(SEEDS))  # wall time, no shared parts
    lat_mean, lat_half = expected(runs, "halp", 0.5, "latency_ms")
    assert row["latency_ms_mean"] == pytest.approx(lat_mean) and row["latency_ms_ci"] == pytest.approx(lat_half)
    md = (out / "table.md").read_text()
    assert f"{mean:.2f} ± {half:.2f}" in md
    dense = table[table.method == "dense"].iloc[0]  # a real dense record: used as is, single seed
    assert dense["n"] == 1 and math.isnan(dense["top1_ci"]) and dense["source"] == "runs"
    dense_line = next(line for line in md.splitlines() if line.startswith("| dense"))
    assert "91.00 ± –" in dense_line and "MACs (M)" in md

    runs_csv = pd.read_csv(out / "runs.csv")
    assert len(runs_csv) == len(METHODS) * len(TARGETS) * len(SEEDS) + 1
    assert {"run", "pruned.top1", "wall_seconds.total", "lut.device.name"} <= set(runs_csv.columns)
    for name in PNGS:
        assert_png(out / name)
    assert no_temp_files(out)
    umask = os.umask(0)
    os.umask(umask)
    assert (out / "table.md").stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's private 0600
    paper = (out / "paper.md").read_text()
    assert "no paper counterpart" in paper and "| grade |" in paper and "resnet50" in paper


def test_function_summary_and_paper_match(tmp_path):
    runs = tmp_path / "runs"
    for t in TARGETS:
        for s in SEEDS:
            d = runs / f"rn50-t{t}-s{s}"
            d.mkdir(parents=True)
            (d / "result.json").write_text(json.dumps(record("halp", t, s, "torchvision:resnet50", "imagenet")))
    (runs / "bad").mkdir()
    (runs / "bad" / "result.json").write_text(json.dumps({"method": "halp", "model": "x"}))
    warnings: list[str] = []
    summary = build_report(runs, figures=False, warn=warnings.append)
    assert summary.records == 9 and len(summary.skipped) == 1
    assert "missing required field" in summary.skipped[0][1] and any("bad" in w for w in warnings)
    assert summary.out_dir == runs / "report"
    assert sorted(p.name for p in summary.written) == ["paper.md", "runs.csv", "table.csv", "table.md"]
    paper = (runs / "report" / "paper.md").read_text()
    assert "Published rows for resnet50 on imagenet" in paper and "| primary |" in paper and "HALP-55%" in paper
    assert "resnet101" not in paper.split("Ours:")[0]  # only the matching model's rows
    # the page names the reference file relative to the repository, not by this machine's path
    assert "Source: `results/reference/paper_numbers.csv`" in paper
    assert str(Path(__file__).resolve().parents[1]) not in paper
    table = pd.read_csv(runs / "report" / "table.csv")
    dense = table[table.method == "dense"].iloc[0]  # derived from the runs' dense blocks, one per seed
    assert dense["n"] == 3 and dense["top1_mean"] == pytest.approx(91.1) and dense["source"] != "runs"
    assert "dense *" in summary.table_md


def test_older_records_without_optional_fields(tmp_path):
    runs = tmp_path / "runs"
    for s in SEEDS:
        r = record("halp", 0.5, s)
        for k in ("speedup", "latency_vs_target", "lut", "config", "wall_seconds"):
            r.pop(k)
        r["pruned"].pop("widths")
        r["pruned"].pop("predicted_ms")
        (runs / f"s{s}").mkdir(parents=True)
        (runs / f"s{s}" / "result.json").write_text(json.dumps(r))
    summary = build_report(runs, tmp_path / "out", warn=lambda m: None)
    table = pd.read_csv(tmp_path / "out" / "table.csv")
    row = table[table.method == "halp"].iloc[0]
    recs = [json.loads((runs / f"s{s}" / "result.json").read_text()) for s in SEEDS]
    assert row["speedup_mean"] == pytest.approx(np.mean([r["dense"]["latency_ms"] / r["pruned"]["latency_ms"]
                                                         for r in recs]))
    assert any("widths.png not written" in w for w in summary.warnings)
    assert_png(tmp_path / "out" / "pareto.png")


def test_missing_or_empty_dir_is_exit_2(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert "halp report: error:" in err and "does not exist" in err and "Traceback" not in err
    (tmp_path / "empty" / "run").mkdir(parents=True)
    (tmp_path / "empty" / "run" / "result.json").write_text("not json")
    assert main(["report", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert "no usable result.json" in err and "skipping" in err


def test_failed_write_leaves_old_file_and_no_temp(tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    for s in SEEDS:
        (runs / f"s{s}").mkdir(parents=True)
        (runs / f"s{s}" / "result.json").write_text(json.dumps(record("halp", 0.5, s)))
    out = tmp_path / "out"
    build_report(runs, out, warn=lambda m: None)
    before = (out / "pareto.png").read_bytes()

    def broken_savefig(self, fname, **kw):
        Path(fname).write_bytes(b"\x89PNG half")  # part of a file, then the disk fills up
        raise OSError("No space left on device")
    monkeypatch.setattr("matplotlib.figure.Figure.savefig", broken_savefig)
    with pytest.raises(OSError):
        build_report(runs, out, formats=(), warn=lambda m: None)
    assert (out / "pareto.png").read_bytes() == before and no_temp_files(out)


def test_mean_ci_matches_scipy():
    x = [1.0, 2.5, 2.0, 4.0]
    lo, hi = stats.t.interval(0.95, 3, loc=np.mean(x), scale=stats.sem(x))
    assert mean_ci(x) == pytest.approx((np.mean(x), (hi - lo) / 2, 4))
    m, half, n = mean_ci([3.0, None, float("nan")])
    assert (m, n) == (3.0, 1) and math.isnan(half)
    assert mean_ci([])[2] == 0


def test_format_and_help(tmp_path, capsys):
    runs = tmp_path / "runs"
    (runs / "s0").mkdir(parents=True)
    (runs / "s0" / "result.json").write_text(json.dumps(record("halp", 0.5, 0)))
    assert main(["report", str(runs), "--format", "csv", "--no-figures"]) == 0
    assert sorted(p.name for p in (runs / "report").iterdir()) == ["runs.csv", "table.csv"]
    with pytest.raises(SystemExit):
        main(["report", "--help"])
    out = capsys.readouterr().out
    assert "RUNS_DIR" in out and "example" in out and "pareto.png" in out


def test_mixed_configs_and_repeated_seeds_are_flagged(tmp_path):
    runs = tmp_path / "runs"
    for i, (seed, steps) in enumerate([(0, 10), (0, 10), (1, 20)]):
        r = record("halp", 0.5, seed)
        r["config"]["prune"]["steps"] = steps
        (runs / f"r{i}").mkdir(parents=True)
        (runs / f"r{i}" / "result.json").write_text(json.dumps(r))
    summary = build_report(runs, formats=("csv",), figures=False, warn=lambda m: None)
    assert any("2 records" in w and "seed 0" in w for w in summary.warnings)
    assert any("prune.steps" in w for w in summary.warnings)
    assert not any("seed" in w.split("differing in")[-1] for w in summary.warnings if "differing" in w)


def test_sections_mixing_anchor_ids_are_flagged(tmp_path):
    """Jobs priced with different anchors had different budgets in ms: the report says which."""
    runs = tmp_path / "runs"
    ids = {"halp-s0": "aaaa11112222", "taylor-s0": "aaaa11112222", "magnitude-s0": "bbbb33334444",
           "halp-s1": None, "other-s0": "cccc55556666"}  # None: an older record without the field
    for name, aid in ids.items():
        method, seed = name.split("-s")
        r = record("halp" if method == "other" else method, 0.5, int(seed),
                   model="halp:resnet56" if method == "other" else "halp:resnet20")
        if aid is not None:
            r["lut"]["anchor_id"] = aid
        (runs / name).mkdir(parents=True)
        (runs / name / "result.json").write_text(json.dumps(r))
    summary = build_report(runs, formats=("csv",), figures=False, warn=lambda m: None)
    mixed = [w for w in summary.warnings if "different latency anchors" in w]
    assert len(mixed) == 1, summary.warnings  # resnet56 has one id; the record without one is not counted
    assert mixed[0].startswith("halp:resnet20/fashion_mnist")
    assert "aaaa11112222 (halp-s0, taylor-s0)" in mixed[0] and "bbbb33334444 (magnitude-s0)" in mixed[0]
    assert "halp-s1" not in mixed[0]
    assert "lut.anchor_id" in pd.read_csv(tmp_path / "runs" / "report" / "runs.csv").columns
    # records that all lack the id (written before it existed): no warning
    for name in ids:
        r = json.loads((runs / name / "result.json").read_text())
        r["lut"].pop("anchor_id", None)
        (runs / name / "result.json").write_text(json.dumps(r))
    summary = build_report(runs, formats=("csv",), figures=False, warn=lambda m: None)
    assert not [w for w in summary.warnings if "anchors" in w]


def test_detection_records_report_map_beside_the_papers_ssd_rows(tmp_path):
    """Records with ``"metric": "map50"`` (detectors) carry mAP@0.5 instead of top-1: the report's
    quality column is mAP, and the paper's SSD rows are shown beside ours."""
    runs = tmp_path / "runs"
    for method in ("halp", "magnitude"):
        rec = record(method, 0.5, 0, "mmdet:ssd512_r50", "voc")
        for part in ("dense", "pruned"):
            q = rec[part].pop("top1")
            rec[part].pop("top5")
            rec[part]["map50"] = q - 10
        rec["task"], rec["metric"] = "detection", "map50"
        (runs / method).mkdir(parents=True)
        (runs / method / "result.json").write_text(json.dumps(rec))
    summary = build_report(runs, figures=False)
    assert summary.records == 2 and not summary.skipped
    assert "| mAP@0.5 (%) |" in summary.table_md and "top-1" not in summary.table_md
    paper = (runs / "report" / "paper.md").read_text()
    assert "Published rows for ssd512r50 on voc" in paper and "77.42" in paper
    runs_csv = pd.read_csv(runs / "report" / "runs.csv")
    assert set(runs_csv["metric"]) == {"map50"}
    halp = runs_csv[runs_csv.method == "halp"].iloc[0]
    assert halp["pruned.top1"] == pytest.approx(halp["pruned.map50"])
