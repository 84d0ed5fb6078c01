"""``halp-run`` sweeps on the local Slurm cluster: a 12-job method x target sweep with W&B offline
logging and a report, preemption with requeue and exact resume, and one job as two Slurm tasks
(DDP). Skipped with a reason when the cluster cannot be started (see tests/slurm_cluster.py).

Toy jobs (tests/toy_job.py): synthetic images, a synthetic latency table, so decisions do not
depend on machine load. Deadlines only stop a hung test; nothing asserts how long anything took.
"""
from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import torch

from slurm_cluster import slurm_cluster, wait_until  # noqa: F401  (session fixture)
from toy_job import compose, halp_run, overrides

pytest.importorskip("submitit")
pytestmark = pytest.mark.slurm

METHODS = ("halp", "magnitude", "taylor", "eagleeye")
TARGETS = (0.3, 0.5, 0.7)


@pytest.fixture
def slurm_env(slurm_cluster, monkeypatch):  # noqa: F811
    for key, value in slurm_cluster.items():
        monkeypatch.setenv(key, value)
    return slurm_cluster


def _masks(run_dir: Path) -> dict:
    return json.loads((run_dir / "masks.json").read_text())["groups"]


def test_twelve_job_sweep_lands_logs_to_wandb_and_reports(slurm_env, tmp_path):
    from wandb_offline import read_offline_metrics, read_offline_summary, read_offline_table
    from halp.cli import main as halp_main

    sweep = tmp_path / "sweep"
    out = halp_run("-m", "hydra/launcher=slurm_local", f"hydra.sweep.dir={sweep}", "logger=wandb",
                   f"method={','.join(METHODS)}", f"prune.target={','.join(map(str, TARGETS))}",
                   *overrides(tmp_path), cwd=tmp_path, timeout=1800)
    assert out.returncode == 0, out.stderr[-3000:]
    runs = sorted(p.parent for p in sweep.glob("*/result.json"))
    assert len(runs) == 12, (sorted(p.name for p in sweep.iterdir()), out.stderr[-2000:])
    ids = set()
    for run in runs:
        r = json.loads((run / "result.json").read_text())
        assert r["pruned"]["predicted_ms"] <= r["pruned"]["target_predicted_ms"] * (1 + 1e-9), run.name
        ids.add(r["lut"]["id"])
        # W&B offline: one run directory per job; what it logged reads back and matches the record
        assert len(list((run / "wandb").glob("offline-run-*"))) == 1, run.name
        rows = read_offline_metrics(run)
        assert any("val/top1" in row for row in rows), run.name
        assert sum("prune/predicted_ms" in row for row in rows) == len(r["prune_log"]), run.name
        summary = read_offline_summary(run)
        assert summary["pruned/top1"] == pytest.approx(r["pruned"]["top1"])
        table = read_offline_table(run, "result/row")  # the paper's row, as a wandb.Table
        row = dict(zip(table["columns"], table["data"][0]))
        assert (row["method"], row["target"], row["quality"]) == (r["method"], r["target_ratio"],
                                                                 pytest.approx(r["pruned"]["top1"]))
        assert len(read_offline_table(run, "result/prune_log")["data"]) == len(r["prune_log"])
    assert len(ids) == 1  # every job priced with the same table
    assert len(list((tmp_path / "cache" / "dense").glob("*.pt"))) == 1  # trained once, reused by 11 jobs

    report = tmp_path / "report"
    assert halp_main(["report", str(sweep), "--out", str(report)]) == 0
    table = (report / "table.md").read_text()
    for label in ("HALP", "Magnitude", "Taylor", "EagleEye"):
        for t in TARGETS:
            assert re.search(rf"\| {label} \| {t:.0%} \|", table), (label, t, table)
    assert (report / "pareto.png").stat().st_size > 10_000
    assert (report / "table.csv").read_text().count("\n") == 1 + 12 + 1  # header, 12 groups, the dense row


def _job_id(sweep: Path) -> str:
    dirs = [p.name for p in (sweep / ".submitit").glob("*") if re.fullmatch(r"\d+(_\d+)?", p.name)]
    return dirs[0] if dirs else ""


def _pruning_step(checkpoint: Path) -> int:
    try:
        return int(torch.load(checkpoint, map_location="cpu", weights_only=False)["pruner"]["step"])
    except (OSError, EOFError, RuntimeError, KeyError, TypeError):
        return 0  # not written yet (files are replaced atomically, so never half-read)


# submitit's preemption signal, and the one users often send; the same code path handles both, so
# the default run takes USR2 and the slow suite (-m slow) adds USR1 (95 s each)
@pytest.mark.parametrize("sig", ["USR2", pytest.param("USR1", marks=pytest.mark.slow)])
def test_preempted_job_requeues_resumes_mid_pruning_and_matches_an_uninterrupted_run(slurm_env, tmp_path, sig):
    steps = 10
    args = overrides(tmp_path, width=1.0, shape=(1, 28, 28), samples=2048, batch=64, finetune_epochs=3,
                     interval=8, steps=steps) + ["prune.target=0.5"]
    sweep = tmp_path / "sweep"
    proc = halp_run("-m", "hydra/launcher=slurm_local", f"hydra.sweep.dir={sweep}", *args, cwd=tmp_path,
                    popen=True)
    try:
        wait_until(lambda: _job_id(sweep), "the job to be submitted", 300, 0.2)
        job = _job_id(sweep)
        run = sweep / "halp-halp_resnet20-t0.5-s0"
        wait_until(lambda: _pruning_step(run / "checkpoint.pt") >= 1, "the first pruning step", 300, 0.2)
        # Slurm's preemption warning, as a user or the scheduler sends it
        subprocess.run(["scancel", f"--signal={sig}", job], check=True)
        stdout, stderr = proc.communicate(timeout=900)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr[-3000:]
    log = "\n".join(p.read_text() for p in (sweep / ".submitit" / job).glob("*_log.*"))
    assert "Requeued job" in log, log[-3000:]
    result = json.loads((run / "result.json").read_text())
    resumed = result["resumed"]
    assert resumed is not None and resumed["slurm_restarts"] == 1, (resumed, log[-3000:])
    assert 1 <= resumed["prune_step"] < steps  # it stopped in the middle of pruning
    assert resumed["iteration"] < result["prune_log"][-1]["iteration"]
    states = subprocess.run(["sacct", "-j", job.split("_")[0], "-n", "-X", "-P", "-D", "-o", "State"],
                            capture_output=True, text=True).stdout.split()
    assert "REQUEUED" in states, states  # Slurm's own accounting saw the requeue
    assert len(result["prune_log"]) == steps

    from experiments.job import run_job
    straight = run_job(compose(*args), tmp_path / "straight")  # same dense model from the cache
    assert _masks(run) == _masks(tmp_path / "straight")
    assert [e["widths"] for e in result["prune_log"]] == [e["widths"] for e in straight["prune_log"]]
    assert result["pruned"]["top1"] == straight["pruned"]["top1"]


def test_one_job_as_two_slurm_tasks_prunes_like_one_process(slurm_env, tmp_path):
    from experiments.job import run_job
    args = overrides(tmp_path, samples=256, batch=32, finetune_epochs=2, interval=2, steps=4) + ["prune.target=0.5"]
    # the single-process reference first: it trains the dense model both runs start from
    one = run_job(compose(*args, "finetune.micro_batches=2"), tmp_path / "one")
    sweep = tmp_path / "sweep"
    out = halp_run("-m", "hydra/launcher=slurm_local", f"hydra.sweep.dir={sweep}", "hydra.launcher.tasks_per_node=2",
                   "hydra.launcher.cpus_per_task=1", *args, cwd=tmp_path, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    run = sweep / "halp-halp_resnet20-t0.5-s0"
    two = json.loads((run / "result.json").read_text())
    assert two["world_size"] == 2 and one["world_size"] == 1
    assert _masks(run) == _masks(tmp_path / "one")
    assert [e["widths"] for e in two["prune_log"]] == [e["widths"] for e in one["prune_log"]]


def test_a_reproduction_preset_sweeps_on_slurm_resumes_and_makes_its_page(slurm_env, tmp_path):
    """experiment=repro_cpu/ablation_solver (toy scale) on the local Slurm: 3 seeds; the rerun
    finds every job done; the re-timing and the page follow from the same folder."""
    from halp.cli import main as halp_main

    sweep = tmp_path / "runs" / "repro_cpu" / "ablation_solver"
    # the page takes runs at the main comparison's knobs: ten steps, chunks from the table's staircase
    toy = [o if o != "prune.chunk=4" else "prune.chunk=auto" for o in overrides(tmp_path, interval=1, steps=10)]
    args = ("-m", "hydra/launcher=slurm_local", "experiment=repro_cpu/ablation_solver", f"hydra.sweep.dir={sweep}", *toy)
    out = halp_run(*args, cwd=tmp_path, timeout=1800, env={"WANDB_MODE": "disabled"})
    assert out.returncode == 0, out.stderr[-3000:]
    names = sorted(p.parent.name for p in sweep.glob("*/result.json"))
    assert names == ["solver_greedy-s0", "solver_greedy-s1", "solver_greedy-s2"], out.stderr[-2000:]
    records = [json.loads((sweep / n / "result.json").read_text()) for n in names]
    assert {(r["config"]["method"]["solver"], r["seed"]) for r in records} == {("greedy", s) for s in (0, 1, 2)}
    again = halp_run(*args, cwd=tmp_path, timeout=1800, env={"WANDB_MODE": "disabled"})
    assert again.returncode == 0, again.stderr[-3000:]
    logs = "".join(p.read_text(errors="replace") for p in (sweep / ".submitit").rglob("*_log.*"))
    assert logs.count("already holds this job's result") == 3  # resumed: nothing ran twice
    assert [json.loads((sweep / n / "result.json").read_text()) for n in names] == records
    root = tmp_path / "runs" / "repro_cpu"
    assert halp_main(["remeasure", str(root), "--rounds", "1", "--repeat", "1", "--no-progress"]) == 0
    assert halp_main(["report", "--paper", str(root), "--out", str(tmp_path / "paper"), "--no-figures"]) == 0
    page = (tmp_path / "paper" / "ablation_solver.md").read_text()
    assert "| greedy | 50% | 3 (0,1,2) |" in page and "n = 0: no confidence interval" in page  # no exact arm here
