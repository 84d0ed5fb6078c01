"""Tracking layer: offline W&B runs, resume by run directory, no-op paths and failure isolation."""
from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from experiments.tracking import ID_FILE, LoggerConfig, Tracker
from wandb_offline import read_offline_metrics, read_offline_summary, read_offline_table

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def wb_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Let LoggerConfig decide the mode (conftest defaults WANDB_MODE=disabled) and keep wandb's
    own config/cache out of $HOME."""
    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_DIR"):
        monkeypatch.delenv(var, raising=False)
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb_home" / var.lower()))
    monkeypatch.setenv("NETRC", str(tmp_path / "no.netrc"))


def metrics(step: int) -> dict:
    return {"train": {"loss": 1.0 / (step + 1)}, "lr": 0.1 * 0.5**step, "phase": f"p{step % 2}"}


def expected_row(step: int) -> dict:
    return {"train/loss": 1.0 / (step + 1), "lr": 0.1 * 0.5**step, "phase": f"p{step % 2}", "_step": step}


def ours(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "experiments.tracking"]


def all_files(d: Path) -> list[Path]:
    return [p for p in d.rglob("*") if p.is_file()]


def test_offline_roundtrip(wb_env: None, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    long_note = "halp " * 20_000  # ~100 KB: the record spans several 32 KiB log blocks
    with Tracker.start(LoggerConfig(tags=["test"]), run_dir, "roundtrip", {"lr": 0.1, "m": {"w": 2}}) as t:
        assert t.active
        for step in range(5):
            t.log(metrics(step), step=step)
        t.summary({"final": {"acc": 0.75, "model": "resnet", "hist": [1, 2], "missing": None},
                   "note": long_note, "epochs": 5})

    assert (run_dir / ID_FILE).read_text().strip() == t.run_id
    offline = list((run_dir / "wandb").glob(f"offline-run-*-{t.run_id}"))
    assert len(offline) == 1 and (offline[0] / f"run-{t.run_id}.wandb").is_file()

    assert read_offline_metrics(run_dir) == [expected_row(s) for s in range(5)]
    full = read_offline_metrics(run_dir, include_internal=True)
    assert {"_timestamp", "_runtime"} <= set(full[0])

    summary = read_offline_summary(run_dir)
    assert summary["final/acc"] == 0.75 and summary["final/model"] == "resnet"
    assert summary["epochs"] == 5 and summary["note"] == long_note
    assert "final/hist" not in summary and "final/missing" not in summary  # non-scalar leaves dropped
    assert summary["train/loss"] == 1.0 / 5  # W&B's automatic last-value summary


def test_resume_same_run_id(wb_env: None, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    with Tracker.start(LoggerConfig(), run_dir, "r", {}) as t1:
        for step in range(3):
            t1.log(metrics(step), step=step)
    first_id = (run_dir / ID_FILE).read_text().strip()

    # A requeued job: same run_dir, fresh process state; logging continues from the checkpoint.
    with Tracker.start(LoggerConfig(), run_dir, "r", {}) as t2:
        for step in range(3, 6):
            t2.log(metrics(step), step=step)
        t2.summary({"final": {"acc": 0.5}})

    assert t1.run_id == t2.run_id == first_id
    assert len(list((run_dir / "wandb").glob(f"offline-run-*-{first_id}*"))) == 2
    assert read_offline_metrics(run_dir) == [expected_row(s) for s in range(6)]
    assert read_offline_summary(run_dir)["final/acc"] == 0.5


def test_explicit_dir_and_resume_id(wb_env: None, tmp_path: Path) -> None:
    run_dir, shared = tmp_path / "run", tmp_path / "shared"
    cfg = LoggerConfig(dir=str(shared))
    with Tracker.start(cfg, run_dir, "d", {}, resume_id="fixedid123") as t:
        t.log({"x": 1}, step=0)
    assert t.run_id == "fixedid123" and (run_dir / ID_FILE).read_text().strip() == "fixedid123"
    assert not (run_dir / "wandb").exists()
    assert read_offline_metrics(run_dir, wandb_dir=shared) == [{"x": 1, "_step": 0}]


@pytest.mark.parametrize("cfg", [LoggerConfig(mode="disabled"), LoggerConfig(backend="none")])
def test_disabled_writes_nothing(wb_env: None, tmp_path: Path, cfg: LoggerConfig) -> None:
    run_dir = tmp_path / "run"
    with Tracker.start(cfg, run_dir, "off", {"a": 1}) as t:
        assert not t.active
        t.log({"loss": 1.0}, step=0)
        t.summary({"acc": 1.0})
    assert not run_dir.exists()
    with pytest.raises(FileNotFoundError, match="no W&B run files"):
        read_offline_metrics(run_dir)


def test_disabled_does_not_import_wandb(tmp_path: Path) -> None:
    code = ("import sys; from pathlib import Path; from experiments.tracking import LoggerConfig, Tracker\n"
            f"t = Tracker.start(LoggerConfig(mode='disabled'), Path({str(tmp_path)!r}) / 'r', 'n', {{}})\n"
            "t.log({'a': 1}); t.summary({'b': 2}); t.finish()\n"
            "assert 'wandb' not in sys.modules, 'wandb imported'")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert not (tmp_path / "r").exists()


def test_nonzero_rank_writes_nothing(wb_env: None, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with Tracker.start(LoggerConfig(), run_dir, "r1", {}, rank=1) as t:
        assert not t.active
        t.log({"loss": 1.0}, step=0)
    assert all_files(run_dir) == []


@pytest.mark.parametrize("kwargs, match", [
    ({"backend": "tensorboard"}, "backend must be one of"),
    ({"mode": "shared"}, "mode must be one of"),
    ({"project": ""}, "project must be a non-empty string"),
    ({"entity": ""}, "entity must be None or a non-empty string"),
    ({"tags": "a,b"}, "tags must be a list"),
    ({"tags": ["ok", 3]}, "tags must be a list"),
])
def test_invalid_config(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        LoggerConfig(**kwargs)


def test_structured_config() -> None:
    base = OmegaConf.structured(LoggerConfig)
    merged = OmegaConf.merge(base, {"mode": "disabled", "tags": ["a"], "group": "g"})
    cfg = OmegaConf.to_object(merged)
    assert cfg == LoggerConfig(mode="disabled", tags=["a"], group="g")
    assert LoggerConfig.coerce(merged) == cfg and LoggerConfig.coerce({"mode": "online"}).mode == "online"
    with pytest.raises(ValueError, match="mode must be one of"):
        OmegaConf.to_object(OmegaConf.merge(base, {"mode": "bogus"}))


def test_init_failure_is_a_noop(wb_env: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                caplog: pytest.LogCaptureFixture) -> None:
    import wandb

    def boom(*args: object, **kwargs: object) -> None:
        raise RuntimeError("server exploded")

    monkeypatch.setattr(wandb, "init", boom)
    with caplog.at_level(logging.WARNING, logger="experiments.tracking"):
        with Tracker.start(LoggerConfig(), tmp_path / "run", "f", {}) as t:
            for step in range(3):
                t.log({"loss": 1.0}, step=step)
            t.summary({"acc": 1.0})
        reached = True
    assert reached and not t.active
    (warning,) = ours(caplog)
    assert "server exploded" in warning


def test_failure_mid_run_disables_once(caplog: pytest.LogCaptureFixture) -> None:
    class FlakyRun:
        finished = 0

        def log(self, *a: object, **k: object) -> None:
            raise OSError("disk full")

        def finish(self, **k: object) -> None:
            FlakyRun.finished += 1

    t = Tracker(FlakyRun(), "x")
    with caplog.at_level(logging.WARNING, logger="experiments.tracking"):
        for step in range(3):
            t.log({"loss": 1.0}, step=step)
        t.summary({"acc": 1.0})
        t.finish()
    assert not t.active and FlakyRun.finished == 1
    assert ours(caplog) == ["W&B log failed (OSError: disk full); tracking disabled from now on"]


def test_online_without_login_falls_back(wb_env: None, tmp_path: Path,
                                         caplog: pytest.LogCaptureFixture) -> None:
    run_dir = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="experiments.tracking"):
        with Tracker.start(LoggerConfig(mode="online"), run_dir, "o", {}) as t:
            t.log({"x": 2.5}, step=0)
    (warning,) = ours(caplog)
    assert "offline" in warning
    assert read_offline_metrics(run_dir) == [{"x": 2.5, "_step": 0}]


def test_reader_truncated_and_corrupt(wb_env: None, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    with Tracker.start(LoggerConfig(), run_dir, "t", {}) as t:
        for step in range(5):
            t.log(metrics(step), step=step)
    (path,) = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    data = path.read_bytes()
    assert len(data) > 1000  # finish() waited for wandb-core to flush the log

    # A job killed mid-write leaves a partial last record: everything before it is still read.
    rows = read_offline_metrics(run_dir)
    for cut in range(0, len(data), 61):
        path.write_bytes(data[:cut])
        assert rows[:len(read_offline_metrics(run_dir))] == read_offline_metrics(run_dir)
    path.write_bytes(data[:data.rfind(b"0.00625")])  # inside the last history row
    assert read_offline_metrics(run_dir) == rows[:-1]

    at = data.find(b"_step")  # a byte inside the first history record's payload
    path.write_bytes(data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1:])
    with pytest.raises(ValueError, match="bad checksum"):
        read_offline_metrics(run_dir)
    path.write_bytes(b"not a wandb file")
    with pytest.raises(ValueError, match="not a W&B v0 transaction log"):
        read_offline_metrics(run_dir)


def test_result_tables_read_back(wb_env: None, tmp_path: Path) -> None:
    """The job's record as W&B tables (the paper's row, the pruning log), read back offline."""
    from experiments.tracking import PRUNE_LOG_COLUMNS, result_row

    record = {"method": "halp", "model": "mmdet:ssd_tiny", "dataset": "fashiondet", "seed": 1, "target_ratio": 0.5,
              "metric": "map50", "git_commit": "abc", "speedup": 2.2, "latency_vs_target": 0.9,
              "dense": {"map50": 73.5, "latency_ms": 96.0},
              "pruned": {"map50": 66.9, "latency_ms": 43.0, "predicted_ms": 48.0, "macs": 21, "params": 278},
              "prune_log": [{"step": 1, "iteration": 0, "target_ms": 90.0, "predicted_ms": 89.0, "removed": 32,
                             "widths": {"a": 8, "b": 16}},
                            {"step": 2, "iteration": 20, "target_ms": 84.0, "predicted_ms": 83.0, "removed": 16,
                             "widths": {"a": 8, "b": 8}}]}
    run_dir = tmp_path / "run"
    with Tracker.start(LoggerConfig(), run_dir, "tables", {"x": 1}) as t:
        t.tables(record)
    row = read_offline_table(run_dir, "result/row")
    assert row["columns"] == list(result_row(record)) and len(row["data"]) == 1
    got = dict(zip(row["columns"], row["data"][0]))
    assert (got["quality"], got["dense_quality"], got["metric"], got["latency_vs_target"]) == (66.9, 73.5, "map50", 0.9)
    log = read_offline_table(run_dir, "result/prune_log")
    assert log["columns"] == list(PRUNE_LOG_COLUMNS)
    assert [r[:5] for r in log["data"]] == [[1, 0, 90.0, 89.0, 32], [2, 20, 84.0, 83.0, 16]]
    assert [json.loads(r[5]) for r in log["data"]] == [{"a": 8, "b": 16}, {"a": 8, "b": 8}]
