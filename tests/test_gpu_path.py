"""The GPU-cluster path exercised on the CPU through the same code: one device setting honoured by
the whole job, bf16 autocast and channels_last, loader workers that change nothing but speed, a
pretrained start without dense training, and the settings that must be refused."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from experiments.batches import EpochBatches, LoaderConfig, batch_iterator
from experiments.data import DataConfig, build_datasets
from experiments.distributed import pick_backend
from experiments.job import run_job
from experiments.runtime import RuntimeConfig
from halp.graph import ChannelGraph
from halp.models import create_model

from conftest import synthetic_table
from test_job import tiny
from toy_job import lin


def masks_of(run: Path) -> dict:
    return json.loads((run / "masks.json").read_text())["groups"]


def test_job_on_cpu_with_workers_channels_last_and_bf16(tmp_path):
    """The issue's CPU run of the GPU path; loader workers change nothing but speed."""
    flags = dict(trainer=RuntimeConfig(device="cpu", amp="bf16", channels_last=True))
    with_workers = tiny(tmp_path, **flags, data=dataclasses.replace(tiny(tmp_path).data, workers=2))
    r = run_job(with_workers, tmp_path / "w2")
    assert r["runtime"] == {"device": "cpu", "description": r["runtime"]["description"], "amp": "bf16",
                            "channels_last": True, "loader_workers": 2}
    for phase in ("dense", "finetune"):
        tp = r["throughput"][phase]
        assert tp["train_images_per_s"] > 0 and tp["eval_images_per_s"] > 0 and tp["peak_memory_mb"] > 0
        assert 0 <= tp["data_wait_fraction"] < 1 and tp["skipped_steps"] == 0
    assert any(g["kept"] < g["width"] for g in masks_of(tmp_path / "w2").values())
    assert r["pruned"]["predicted_ms"] <= r["pruned"]["target_predicted_ms"] * (1 + 1e-9)
    # the same job loading in the training process: same batches, so the same dense model and masks
    r0 = run_job(tiny(tmp_path, **flags, cache_dir=str(tmp_path / "cache0")), tmp_path / "w0")
    assert r0["dense"]["top1"] == r["dense"]["top1"] and r0["pruned"]["widths"] == r["pruned"]["widths"]
    assert masks_of(tmp_path / "w0") == masks_of(tmp_path / "w2")


def test_loader_workers_deliver_the_batches_of_the_training_process():
    train = build_datasets(DataConfig(name="synthetic", synthetic_samples=96, synthetic_shape=(1, 8, 8)))[0]
    source = EpochBatches(train, 16, seed=5, shards=2, mine=[1])
    keys = [(0, 0), (0, 5), (1, 2)]
    inline = list(batch_iterator(source, keys, LoaderConfig(workers=0), pin=False))
    workers = list(batch_iterator(source, keys, LoaderConfig(workers=2), pin=False))
    for (xa, ya), (xb, yb) in zip(inline, workers, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb) and len(ya) == 8
    # rank 1's shard is the second half of the global batch, fetched with that shard's own seed
    whole = EpochBatches(train, 16, seed=5, shards=2, mine=[0, 1])[(0, 5)]
    assert torch.equal(whole[1][8:], inline[1][1]) and torch.equal(whole[0][8:], inline[1][0])


def test_pretrained_checkpoint_starts_the_job_without_dense_training(tmp_path):
    shape = (1, 16, 16)
    model = create_model("torchvision:resnet18", num_classes=4, in_chans=1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    path = tmp_path / "resnet18-published.pth"
    torch.save(model.state_dict(), path)  # the layout torchvision publishes: a plain state dict
    table = synthetic_table(ChannelGraph.build(create_model("torchvision:resnet18", num_classes=4, in_chans=1), shape),
                            lin, step=4)
    table.meta["model"] = "torchvision:resnet18"
    table.save(tmp_path / "table.json")
    base = tiny(tmp_path)
    cfg = dataclasses.replace(
        base, model=dataclasses.replace(base.model, name="torchvision:resnet18"),
        data=dataclasses.replace(base.data, synthetic_shape=shape),
        dense=dataclasses.replace(base.dense, checkpoint=str(path)),
        latency=dataclasses.replace(base.latency, table=str(tmp_path / "table.json")))
    r = run_job(cfg, tmp_path / "run")
    assert r["dense"]["checkpoint"] == str(path) and r["wall_seconds"]["dense_train"] == 0.0
    assert not (tmp_path / "cache" / "dense").exists()  # nothing was trained or cached
    assert r["throughput"]["dense"] is None and any(g["kept"] < g["width"] for g in masks_of(tmp_path / "run").values())
    # the record's dense accuracy is the loaded weights' accuracy
    from halp.evaluation import evaluate
    val = build_datasets(cfg.data)[1]
    assert r["dense"]["top1"] == evaluate(model, val, cfg.dense.eval_batch_size)["top1"]
    wrong = dataclasses.replace(cfg, dense=dataclasses.replace(cfg.dense, checkpoint=str(tmp_path / "none.pth")))
    with pytest.raises(FileNotFoundError, match="none.pth"):
        run_job(wrong, tmp_path / "bad")
    assert not (tmp_path / "bad" / "result.json").exists()


def test_settings_that_cannot_run_here_are_refused_up_front(tmp_path):
    with pytest.raises(ValueError, match="trainer.device must be one of"):
        RuntimeConfig(device="tpu")
    with pytest.raises(ValueError, match="trainer.amp must be one of"):
        RuntimeConfig(amp="fp8")
    with pytest.raises(ValueError, match="fp16 needs CUDA"):
        RuntimeConfig(device="cpu", amp="fp16").resolve()
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="is_available"):
            RuntimeConfig(device="cuda").resolve()
        assert RuntimeConfig(device="auto").resolve().device == torch.device("cpu")
    with pytest.raises(ValueError, match="NCCL"):
        pick_backend("nccl", "cpu")
    assert (pick_backend("auto", "cpu"), pick_backend("auto", "cuda"), pick_backend("gloo", "cuda")) == \
        ("gloo", "nccl", "gloo")
    with pytest.raises(ValueError, match="nccl needs trainer.device=cuda"):
        tiny(tmp_path, trainer=RuntimeConfig(device="cpu"), dist_backend="nccl")


def test_runtime_settings_keep_old_dense_caches_valid(tmp_path):
    """Adding trainer.*, loader knobs and lr_batch did not orphan caches: the default job's dense key
    is the one commit 90bb4bb (before them) computed; precision and memory format change it."""
    from experiments.assets import dense_path
    from toy_job import compose

    assert dense_path(compose(), tmp_path).name == "halp_resnet20-9aa3f2b27918.pt"
    assert dense_path(compose("data.workers=2", "trainer.device=cpu"), tmp_path).name == "halp_resnet20-9aa3f2b27918.pt"
    assert dense_path(compose("trainer.amp=bf16"), tmp_path) != dense_path(compose(), tmp_path)
    assert dense_path(compose("trainer.channels_last=true"), tmp_path) != dense_path(compose(), tmp_path)


def test_training_throughput_leaves_out_the_pruning_steps():
    """Hand-computed: 300 images in 4 s of training of which 1 s was pruning steps and 0.6 s
    waiting for data -> 100 images/s and a 20 % data wait (not 75 images/s and 15 %)."""
    from experiments.engine import TrainState
    st = TrainState(images=300, train_seconds=4.0, prune_seconds=1.0, data_wait_seconds=0.6,
                    eval_images=50, eval_seconds=0.5)
    tp = st.throughput()
    assert tp["train_images_per_s"] == pytest.approx(100.0)
    assert tp["data_wait_fraction"] == pytest.approx(0.2)
    assert tp["eval_images_per_s"] == pytest.approx(100.0)
    assert TrainState().throughput()["train_images_per_s"] is None
