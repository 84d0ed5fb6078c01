"""DDP on the CPU (gloo): two processes prune to the same masks as one process on the same data
order (one process with two micro-batches sees exactly the shards the two ranks see)."""
from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))

from experiments import distributed  # noqa: E402
from experiments.batches import LoaderConfig  # noqa: E402
from experiments.engine import TrainConfig, Trainer  # noqa: E402
from halp.pruners import HalpPruner, PruneConfig  # noqa: E402


def _setup():
    from test_pruner import make_data, setup
    graph, pruner = setup(PruneConfig(target=0.5, interval=3, steps=4, chunk=4), seed=0)
    return graph, pruner, make_data(128, 1), make_data(32, 2)


def _train(out: Path, micro_batches: int, de: distributed.DistEnv, workers: int = 0) -> None:
    torch.set_num_threads(1)
    graph, pruner, train, val = _setup()
    cfg = TrainConfig(epochs=4, lr=0.05, batch_size=32, threads=1, seed=3, micro_batches=micro_batches)
    Trainer(graph.model, train, val, cfg, pruner=pruner, progress=False, dist=de,
            loader=LoaderConfig(workers=workers)).fit()
    if de.is_main:
        torch.save({"masks": dict(pruner.masks.items()), "log": [e.widths for e in pruner.log],
                    "params": {k: v.detach().clone() for k, v in graph.model.named_parameters()}}, out)


def _rank(rank: int, world: int, port: int, out: str, workers: int = 0) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    de = distributed.init("gloo")
    try:
        _train(Path(out), 1, de, workers)
    finally:
        distributed.shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("workers", [0, 2])
def test_two_gloo_ranks_prune_like_one_process_with_two_micro_batches(tmp_path, monkeypatch, workers):
    """Each rank loads only its shards (with ``workers`` loader processes of its own); the single
    process loads in-process."""
    for var in ("RANK", "WORLD_SIZE", "SLURM_NTASKS", "SLURM_PROCID"):
        monkeypatch.delenv(var, raising=False)
    _train(tmp_path / "one.pt", 2, distributed.SINGLE)
    mp.spawn(_rank, args=(2, _free_port(), str(tmp_path / "two.pt"), workers), nprocs=2, join=True)
    one = torch.load(tmp_path / "one.pt", weights_only=False)
    two = torch.load(tmp_path / "two.pt", weights_only=False)
    assert len(one["log"]) == 4 and one["log"] == two["log"]
    for gid in one["masks"]:
        assert torch.equal(one["masks"][gid], two["masks"][gid]), gid
    assert sum(int(m.sum()) for m in one["masks"].values()) < sum(m.numel() for m in one["masks"].values())
    for k, v in one["params"].items():  # same gradients up to the order of a two-term sum
        torch.testing.assert_close(two["params"][k], v, rtol=1e-4, atol=1e-5, msg=k)


def test_detect_reads_torchrun_and_slurm_environments(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID"):
        monkeypatch.delenv(var, raising=False)
    assert distributed.detect() == distributed.SINGLE
    monkeypatch.setenv("SLURM_NTASKS", "4")
    monkeypatch.setenv("SLURM_PROCID", "3")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    assert distributed.detect() == distributed.DistEnv(3, 4, 1)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert distributed.detect() == distributed.DistEnv(1, 2, 0)  # torchrun wins inside a Slurm task
    assert distributed._first_host("node[01-04,07]").startswith("node0")


def test_batch_must_split_over_ranks_and_micro_batches():
    with pytest.raises(ValueError, match="micro_batches=3 must divide batch_size=32"):
        TrainConfig(batch_size=32, micro_batches=3)
    graph, pruner, train, val = _setup()
    with pytest.raises(ValueError, match="split evenly over 3 process"):
        Trainer(graph.model, train, val, TrainConfig(batch_size=32), dist=distributed.DistEnv(0, 3))
    assert isinstance(pruner, HalpPruner)


def test_torchrun_job_with_two_processes_prunes_like_one_process(tmp_path, monkeypatch):
    """The whole job (``halp-run``) under torchrun: gloo, two ranks, rank 0 writes the record."""
    import json
    import subprocess

    from experiments.job import run_job
    from toy_job import ROOT, compose, overrides

    for var in ("RANK", "WORLD_SIZE", "SLURM_NTASKS", "SLURM_PROCID"):
        monkeypatch.delenv(var, raising=False)
    args = overrides(tmp_path, samples=256, batch=32, finetune_epochs=2, interval=2, steps=4) + ["prune.target=0.5"]
    one = run_job(compose(*args, "finetune.micro_batches=2"), tmp_path / "one")  # also caches the dense model
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "experiments.run", f"hydra.run.dir={tmp_path / 'two'}", *args],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "result.json").read_text())
    assert (one["world_size"], two["world_size"]) == (1, 2)
    masks = [json.loads((tmp_path / d / "masks.json").read_text())["groups"] for d in ("one", "two")]
    assert masks[0] == masks[1]
    assert [e["widths"] for e in one["prune_log"]] == [e["widths"] for e in two["prune_log"]]
    assert any(g["kept"] < g["width"] for g in masks[0].values())
