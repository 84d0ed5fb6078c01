"""Every preset composes into a valid typed config; the paper presets train two steps with their
full-size models (224x224, batch 2, synthetic data) through the same pruner and trainer."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
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
    assert set(PAPER) <= set(PRESETS) and {"ssd512_voc_halp", "ssd300_voc", "fashiondet_ssd", "cpu_fmnist_fast"} \
        <= set(PRESETS)
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


def write_tiny_voc(root: Path, per_split: int = 4) -> Path:
    """A VOCdevkit with VOC2007 (trainval, test) and VOC2012 (trainval) of random JPEGs, one or two
    objects each (one of them difficult now and then), in the real layout."""
    from PIL import Image

    from experiments.voc import VOC_CLASSES

    rng = np.random.default_rng(0)
    for year, splits in (("VOC2007", ("trainval", "test")), ("VOC2012", ("trainval",))):
        base = root / year
        for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
            (base / sub).mkdir(parents=True, exist_ok=True)
        for split in splits:
            stems = []
            for k in range(per_split):
                stem = f"{year[-4:]}_{split}_{k:03d}"
                w, h = int(rng.integers(80, 160)), int(rng.integers(60, 120))
                Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(base / "JPEGImages" / f"{stem}.jpg")
                objs = ""
                for j in range(1 + k % 2):
                    x1, y1 = int(rng.integers(1, w // 2)), int(rng.integers(1, h // 2))
                    objs += (f"<object><name>{VOC_CLASSES[(k + j) % 20]}</name><difficult>{int(j == 1 and k == 3)}"
                             f"</difficult><bndbox><xmin>{x1}</xmin><ymin>{y1}</ymin><xmax>{x1 + w // 3}</xmax>"
                             f"<ymax>{y1 + h // 3}</ymax></bndbox></object>")
                (base / "Annotations" / f"{stem}.xml").write_text(
                    f"<annotation><filename>{stem}.jpg</filename><size><width>{w}</width><height>{h}</height>"
                    f"<depth>3</depth></size>{objs}</annotation>")
                stems.append(stem)
            (base / "ImageSets/Main" / f"{split}.txt").write_text("\n".join(stems) + "\n")
    return root


def test_ssd512_paper_preset_runs_the_whole_job_on_a_tiny_voc_set(tmp_path):
    """halp-run experiment=ssd512_voc_halp at full size (512 x 512, ResNet-50): 2 dense training
    steps, 2 fine-tuning steps with 1 pruning step, slimming, mAP, latency, on a VOC set written here.
    The latency table is synthetic (building SSD512's on this CPU takes long); everything else is real."""
    pytest.importorskip("mmdet", reason="detection needs the det extra")
    from halp.latency.units import model_units  # noqa: F401  (the table below covers every unit)

    root = write_tiny_voc(tmp_path / "VOCdevkit", per_split=2)
    base = ["experiment=ssd512_voc_halp", f"data.root={root}", "device=cpu_b1", "trainer=cpu",
            "data.workers=0", "measure_rounds=1", f"cache_dir={tmp_path / 'cache'}", "progress=false",
            "prune.interval=1", "prune.steps=1", "latency.allow_mismatch=true",
            "latency.feedback=false"]  # the table is synthetic: nothing to correct against this CPU
    for phase in ("dense", "finetune"):
        base += [f"{phase}.epochs=1", f"{phase}.batch_size=2", f"{phase}.eval_batch_size=2", f"{phase}.threads=2"]
    cfg = job(*base)
    assert (cfg.model.name, cfg.data.name, cfg.data.image_size, cfg.dense.lr, cfg.dense.lr_batch) == \
        ("mmdet:ssd512_r50", "voc", 512, 1.0e-3, 64)
    model = create_model(cfg.model.name, num_classes=20)
    graph = ChannelGraph.build(model, (3, 512, 512))
    table = synthetic_table(graph, lin, step=64)
    table.meta["setting"] = {**cfg.latency.setting().__dict__, "memory_format": "contiguous"}
    path = table.save(tmp_path / "ssd512.json")
    cfg = job(*base, f"latency.table={path}")
    rec = run_job(cfg, tmp_path / "run")
    assert rec["task"] == "detection" and rec["metric"] == "map50" and rec["world_size"] == 1
    assert len(rec["history"]) == 1 and rec["history"][0]["iteration"] == 2  # 4 images (07+12), batch 2
    assert len(rec["prune_log"]) == 1 and rec["pruned"]["predicted_ms"] < rec["dense"]["predicted_ms"]
    assert 0.0 <= rec["dense"]["map50"] <= 100.0 and 0.0 <= rec["pruned"]["map50"] <= 100.0
    assert rec["end_to_end"]["dense_ms"] > 0 and rec["end_to_end"]["slim_ms"] > 0
    assert (tmp_path / "run" / "slim.pt").exists() and (tmp_path / "run" / "masks.json").exists()


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
