"""The paper presets carry the paper's recipe (../shared/spec/HALP.md §4), value by value, and the
trainer turns it into the learning rates the spec describes."""
from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import experiments.run  # noqa: F401  (registers the schema and resolvers)
from experiments.engine import lr_at, param_groups
from halp.models import create_model

CONF = Path(experiments.run.__file__).resolve().parent / "conf"
SPEC = Path(__file__).resolve().parents[2] / "shared" / "spec" / "HALP.md"
PAPER = ["resnet50_imagenet_halp80", "resnet50_imagenet_halp55", "resnet50_imagenet_halp30",
         "resnet101_imagenet_halp80", "resnet101_imagenet_halp55", "resnet101_imagenet_halp30",
         "mobilenetv1_imagenet_halp42", "mobilenetv2_imagenet_halp60"]

# HALP.md §4, "Schedule and masks", in the spec's own words (left) and as config values (right)
RECIPE = {
    "prune every 40 iterations": ("prune.interval", 40),
    "starting at iteration 0": ("prune.start", 0),
    "30\npruning steps": ("prune.steps", 30),
    "global batch 1024": ("finetune.batch_size", 1024),
    "fine-tune to 90 epochs": ("finetune.epochs", 90),
    "SGD momentum 0.875": ("finetune.momentum", 0.875),
    "lr 1.024 per 1024 batch": ("finetune.lr", 1.024),
    "per 1024 batch": ("finetune.lr_batch", 1024),
    "cosine per epoch": ("finetune.schedule", "cosine_epoch"),
    "8 warm-up epochs": ("finetune.warmup_epochs", 8),
    "weight decay\n3.0517578125e-5": ("finetune.weight_decay", 3.0517578125e-5),
    "label smoothing 0.1": ("finetune.label_smoothing", 0.1),
    "mixed precision": ("trainer.amp", "fp16"),
}


def job(*overrides: str):
    with initialize_config_dir(str(CONF), version_base=None):
        return OmegaConf.to_object(compose("main", overrides=list(overrides)))


def get(cfg, dotted: str):
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def test_the_recipe_table_quotes_the_spec():
    if not SPEC.is_file():
        pytest.skip(f"the spec is not beside this checkout ({SPEC})")
    text = re.sub(r"\s+", " ", SPEC.read_text())
    for phrase in RECIPE:
        assert re.sub(r"\s+", " ", phrase) in text, phrase


@pytest.mark.parametrize("name", PAPER)
def test_paper_presets_follow_the_spec(name):
    cfg = job(f"experiment={name}")
    for phrase, (key, value) in RECIPE.items():
        assert get(cfg, key) == value, (name, key, phrase)
        if key.startswith("finetune."):  # the dense recipe (when no pretrained checkpoint) is the same
            assert get(cfg, "dense." + key.split(".", 1)[1]) == value, (name, key)
    assert cfg.trainer.device == "auto" and cfg.latency.backend == "torch-cuda" and cfg.latency.batch == 256


def test_learning_rate_follows_the_spec():
    cfg = job("experiment=resnet50_imagenet_halp55").finetune
    per_epoch, total = 1251, 90 * 1251  # ImageNet's 1.28 M images at batch 1024
    lr = [lr_at(cfg, e * per_epoch + 7, total, per_epoch) for e in range(90)]
    assert lr[0] == pytest.approx(1.024 / 8) and lr[7] == pytest.approx(1.024) and lr[8] == pytest.approx(1.024)
    assert lr_at(cfg, 5 * per_epoch, total, per_epoch) == lr_at(cfg, 6 * per_epoch - 1, total, per_epoch)  # per epoch
    assert lr[49] == pytest.approx(0.5 * 1.024 * (1 + math.cos(math.pi * 41 / 82)))
    assert lr[89] == pytest.approx(0.5 * 1.024 * (1 + math.cos(math.pi * 81 / 82))) and lr[89] < 1e-3
    half = job("experiment=resnet50_imagenet_halp55", "finetune.batch_size=512").finetune
    assert lr_at(half, 10 * per_epoch, total, per_epoch) == pytest.approx(lr[10] / 2)  # scaled by the batch


def test_no_weight_decay_on_batchnorm_or_biases_found_by_module_type():
    model = create_model("torchvision:resnet50", num_classes=10)
    decay, no_decay = param_groups(model, 3.0517578125e-5)
    assert decay["weight_decay"] == 3.0517578125e-5 and no_decay["weight_decay"] == 0.0
    norms = {id(p) for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d) for p in m.parameters()}
    biases = {id(m.bias) for m in model.modules() if getattr(m, "bias", None) is not None}
    assert {id(p) for p in no_decay["params"]} == norms | biases
    assert id(model.layer1[0].downsample[1].weight) in norms  # the reference decayed these by name
    assert {id(p) for p in decay["params"]} == {id(p) for p in model.parameters()} - norms - biases
