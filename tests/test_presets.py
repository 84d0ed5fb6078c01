"""Every preset composes into a valid typed config; the paper presets train two steps with their
full-size models (224x224, batch 2, synthetic data) through the same pruner and trainer."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import experiments.run  # noqa: F401  (registers the schema and resolvers)
from experiments.config import JobConfig
from experiments.job import make_pruner, run_job
from experiments.data import DataConfig, build_datasets
from experiments.engine import Trainer
from halp.graph import ChannelGraph
from halp.latency.cost import CostModel
from halp.models import create_model

from conftest import synthetic_table

CONF = Path(experiments.run.__file__).resolve().parent / "conf"
PRESETS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
PAPER = ["resnet50_imagenet_halp80", "resnet50_imagenet_halp55", "resnet50_imagenet_halp30",
         "resnet101_imagenet_halp80", "resnet101_imagenet_halp55", "resnet101_imagenet_halp30",
         "mobilenetv1_imagenet_halp42", "mobilenetv2_imagenet_halp60"]


def job(*overrides: str) -> JobConfig:
    with initialize_config_dir(str(CONF), version_base=None):
        return OmegaConf.to_object(compose("main", overrides=list(overrides)))


def test_every_preset_composes_to_a_valid_config():
    assert set(PAPER) <= set(PRESETS) and "ssd_voc" in PRESETS and "cpu_fmnist_fast" in PRESETS
    for name in PRESETS:
        cfg = job(f"experiment={name}")
        assert isinstance(cfg, JobConfig), name
    r50 = job("experiment=resnet50_imagenet_halp55")
    assert (r50.model.name, r50.data.name, r50.prune.target, r50.prune.interval, r50.prune.steps) == \
        ("torchvision:resnet50", "imagenet", 0.55, 40, 30)
    assert (r50.finetune.lr, r50.finetune.momentum, r50.finetune.weight_decay, r50.finetune.label_smoothing,
            r50.finetune.warmup_epochs, r50.trainer.amp) == (1.024, 0.875, 3.0517578125e-5, 0.1, 8, "fp16")
    for method in ("halp", "magnitude", "taylor", "eagleeye", "dense"):
        assert job(f"method={method}").method_name == method


def test_ssd_placeholder_says_so(tmp_path):
    with pytest.raises(NotImplementedError, match="placeholder"):
        run_job(job("experiment=ssd_voc"), tmp_path / "ssd")
    assert not (tmp_path / "ssd").exists()


def lin(spec, ci, co):
    return 1e-4 * ci * co * spec.kernel[0] * spec.kernel[1] * spec.input_hw[0] * spec.input_hw[1] / 9 / 49 + 0.01


@pytest.mark.parametrize("name", PAPER)
def test_paper_preset_trains_two_steps_full_size(name):
    cfg = job(f"experiment={name}", "prune.interval=1", "prune.steps=2")
    torch.manual_seed(0)
    data = DataConfig(name="synthetic", synthetic_shape=(3, 224, 224), synthetic_samples=4, synthetic_classes=10)
    train, val, _, info = build_datasets(data)
    model = create_model(cfg.model.name, num_classes=info.num_classes, in_chans=3)
    graph = ChannelGraph.build(model, info.input_shape)
    cost = CostModel.create(graph, synthetic_table(graph, lin, step=64), overhead="none")
    pruner = make_pruner(cfg, graph, cost)
    tcfg = dataclasses.replace(cfg.finetune, batch_size=2, epochs=1, threads=2, eval_batch_size=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = Trainer(model, train, torch.utils.data.Subset(val, [0]), tcfg, pruner=pruner, progress=False)
    st = trainer.fit()
    assert st.iteration == 2 and pruner.step == 2
    assert pruner.predicted_ms() <= pruner.target_ms(2) * (1 + 1e-9) < pruner.dense_ms
    assert any(not torch.equal(v, before[k]) for k, v in model.state_dict().items())
