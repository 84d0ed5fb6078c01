"""End-to-end checks against the local single-node Slurm cluster (slurm/cluster.sh).

Run with `pytest -m slurm tests/test_slurm.py`; skipped with a reason when the cluster cannot be
started (not root, no apt-get). The deadlines below only stop a hung test; nothing asserts how
long anything took.
"""
from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from slurm_cluster import slurm_cluster, wait_until  # noqa: F401  (session fixture)

submitit = pytest.importorskip("submitit")

pytestmark = pytest.mark.slurm

TESTS_DIR = str(Path(__file__).resolve().parent)


@pytest.fixture
def slurm_env(slurm_cluster, monkeypatch):  # noqa: F811
    """The cluster's env vars set in os.environ (inherited by sbatch, hence by the jobs), and
    this directory on PYTHONPATH so a submitit job can unpickle functions defined here."""
    for key, value in slurm_cluster.items():
        monkeypatch.setenv(key, value)
    path = os.environ.get("PYTHONPATH")
    monkeypatch.setenv("PYTHONPATH", TESTS_DIR + (os.pathsep + path if path else ""))
    return slurm_cluster


def _executor(folder: Path, env: dict):
    ex = submitit.AutoExecutor(folder=folder, cluster="slurm")
    ex.update_parameters(slurm_partition=env["HALP_SLURM_PARTITION"], timeout_min=10,
                         cpus_per_task=1, nodes=1, tasks_per_node=1, slurm_signal_delay_s=30)
    return ex


def _sacct_state(job_id: str) -> str:
    out = subprocess.run(["sacct", "-j", job_id, "-n", "-X", "-P", "-o", "State"],
                         capture_output=True, text=True)
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else ""


def test_sbatch_runs_and_is_accounted(slurm_env, tmp_path):
    out = tmp_path / "job-%j.out"
    sub = subprocess.run(["sbatch", "--parsable", "-J", "halp-hello", "-o", str(out),
                          "--wrap", "echo hello-from-slurm; echo host=$(hostname)"],
                         capture_output=True, text=True, check=True)
    job_id = sub.stdout.strip().split(";")[0]
    assert job_id.isdigit(), sub.stdout

    terminal = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"}
    wait_until(lambda: _sacct_state(job_id).split(" ")[0] in terminal, f"job {job_id} in sacct")
    assert _sacct_state(job_id) == "COMPLETED"

    text = (tmp_path / f"job-{job_id}.out").read_text()
    assert "hello-from-slurm" in text
    # slurmctld sends the job's records to slurmdbd asynchronously: its name and partition may land
    # a moment after its final state
    want = f"halp-hello|{slurm_env['HALP_SLURM_PARTITION']}|0:0"

    def acct() -> str:
        return subprocess.run(["sacct", "-j", job_id, "-n", "-X", "-P", "-o", "JobName,Partition,ExitCode"],
                              capture_output=True, text=True, check=True).stdout.strip()
    wait_until(lambda: acct() == want, f"the accounting record of job {job_id} to read {want!r}")


def multiply(a: int, b: int) -> dict:
    return {"product": a * b, "job_id": os.environ.get("SLURM_JOB_ID")}


def test_submitit_job_returns_value(slurm_env, tmp_path):
    job = _executor(tmp_path, slurm_env).submit(multiply, 6, 7)
    result = job.result()
    assert result == {"product": 42, "job_id": str(job.job_id)}
    # submitit reads the state from sacct, which may lag the result file by a poll or two
    wait_until(lambda: job.state == "COMPLETED", f"sacct to report job {job.job_id} COMPLETED")


class CountingCheckpointable(submitit.helpers.Checkpointable):
    """Counts its runs in a file. The first run marks itself started and waits for the
    preemption signal; submitit then calls checkpoint() (inherited: resubmits the same call)
    and requeues the job; the second run returns."""

    def __call__(self, workdir: str, value: int) -> dict:
        work = Path(workdir)
        counter = work / "runs.txt"
        runs = int(counter.read_text()) + 1 if counter.exists() else 1
        counter.write_text(str(runs))
        if runs == 1:
            (work / "started").write_text(os.environ.get("SLURM_JOB_ID", ""))
            for _ in range(600):  # wait to be preempted (the test signals it)
                time.sleep(1)
            raise RuntimeError("never preempted")
        return {"value": value * 2, "runs": runs,
                "restarts": int(os.environ.get("SLURM_RESTART_COUNT", "0"))}


def test_submitit_checkpoint_requeue_resumes(slurm_env, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    job = _executor(tmp_path / "submitit", slurm_env).submit(CountingCheckpointable(), str(work), 21)

    wait_until(lambda: (work / "started").exists(), "the first run to start")
    job._interrupt()  # SIGTERM (bypassed) then the preemption signal: checkpoint + requeue

    result = job.result()
    assert result == {"value": 42, "runs": 2, "restarts": 1}
    assert (work / "runs.txt").read_text() == "2"
    assert (work / "started").read_text() == str(job.job_id)
    wait_until(lambda: job.state == "COMPLETED", "sacct to report the requeued job COMPLETED")
