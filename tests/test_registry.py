"""The pruner registry: methods by name, their settings validated, and a new method added the way
the README says (one module plus one YAML file) runs a whole job through ``halp-run``."""
from __future__ import annotations

import json
import textwrap
from dataclasses import asdict, dataclass

import pytest

import baselines  # noqa: F401  (registers the baselines)
from experiments.config import DENSE, JobConfig, method_choices, resolve_method
from halp.pruners import (HalpConfig, HalpPruner, Pruner, PruneConfig, create_pruner, method_config, pruner_label,
                          pruner_names, register_pruner)
from test_pruner import setup
from toy_job import TEST_CONF, halp_run, overrides


def test_builtin_methods_are_registered_in_a_stable_order():
    assert pruner_names()[:4] == ["halp", "magnitude", "taylor", "eagleeye"]
    assert method_choices()[-1] == DENSE
    assert [pruner_label(n) for n in ("halp", "eagleeye", "unknown")] == ["HALP", "EagleEye", "unknown"]


def test_create_pruner_builds_and_validates_settings():
    graph, reference = setup(PruneConfig(target=0.5, chunk=4))
    p = create_pruner("halp", graph, reference.cost, PruneConfig(target=0.5, chunk=4), {"solver": "greedy"})
    assert isinstance(p, HalpPruner) and p.hcfg == HalpConfig(solver="greedy") and p.method == "halp"
    assert p.chunks == reference.chunks and p.dense_ms == reference.dense_ms
    with pytest.raises(ValueError, match="method 'halp' has no setting.* neurons; its settings are budget_tolerance, lookahead, max_resolve"):
        method_config("halp", {"neurons": 3})
    with pytest.raises(ValueError, match="unknown solver 'dp'"):
        method_config("halp", {"solver": "dp"})
    with pytest.raises(ValueError, match="unknown pruning method 'slim'; registered: halp, magnitude"):
        create_pruner("slim", graph, reference.cost, PruneConfig())


def test_register_pruner_refuses_what_it_cannot_build():
    @dataclass
    class Cfg:
        x: int = 1

    with pytest.raises(TypeError, match="must be a dataclass"):
        register_pruner("bad", dict)
    with pytest.raises(TypeError, match="not a halp Pruner subclass"):
        register_pruner("bad", Cfg)(object)
    with pytest.raises(ValueError, match="already registered by halp.pruners.halp.HalpPruner"):
        register_pruner("halp", Cfg)(type("Other", (Pruner,), {}))
    assert "bad" not in pruner_names()


def test_job_config_holds_only_its_own_methods_settings():
    cfg = JobConfig(method={"name": "taylor", "neurons": 7})
    assert cfg.method_name == "taylor" and cfg.method_cfg.neurons == 7
    assert cfg.method == {"name": "taylor", "neurons": 7, "momentum": 0.9, "chunk": 1}
    assert not hasattr(cfg, "eagleeye") and not hasattr(cfg, "magnitude")
    assert resolve_method("dense") == ("dense", None)
    with pytest.raises(ValueError, match="method 'taylor' has no setting.* candidates"):
        JobConfig(method={"name": "taylor", "candidates": 3})
    with pytest.raises(ValueError, match="cannot import its module 'no_such_module_xyz'"):
        JobConfig(method={"name": "toy", "module": "no_such_module_xyz"})


TOY_MODULE = '''
"""A toy method: removes the highest-numbered channels first, a few per step."""
from dataclasses import dataclass

import torch

from halp.pruners import Pruner, register_pruner


@dataclass
class ToyConfig:
    per_step: int = 4


@register_pruner("toy", ToyConfig, label="Toy")
class ToyPruner(Pruner):
    def __init__(self, graph, cost, config, method_cfg=None, context=None):
        self.tcfg = method_cfg or ToyConfig()
        super().__init__(graph, cost, config, context=context)

    def prune_step(self):
        scores = {g.id: -torch.arange(g.width, dtype=torch.float32) for g in self.groups}
        target = self.target_ms(self.step + 1)
        limit = None if self.step + 1 >= self.steps_total else self.tcfg.per_step
        removed, predicted = self.remove_in_order(self.ranked_units(scores), target, limit)
        return self.record(target, predicted, removed)
'''


def test_a_new_method_is_one_module_and_one_yaml(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "halp_toy_method.py").write_text(textwrap.dedent(TOY_MODULE))
    (tmp_path / "conf" / "method").mkdir(parents=True)
    (tmp_path / "conf" / "method" / "toy.yaml").write_text(
        "# A method outside the repository: its module registers it.\nname: toy\nmodule: halp_toy_method\nper_step: 6\n")
    args = [a for a in overrides(tmp_path) if not a.startswith("hydra.searchpath=")]
    run = tmp_path / "run"
    out = halp_run("method=toy", "prune.target=0.6", f"hydra.run.dir={run}",
                   f"hydra.searchpath=[file://{tmp_path / 'conf'},file://{TEST_CONF}]", *args,
                   cwd=tmp_path, env={"PYTHONPATH": str(tmp_path / "pkg"), "WANDB_MODE": "disabled"})
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads((run / "result.json").read_text())
    assert r["method"] == "toy" and r["config"]["method"] == {"name": "toy", "module": "halp_toy_method", "per_step": 6}
    assert r["pruned"]["predicted_ms"] <= r["pruned"]["target_predicted_ms"] * (1 + 1e-9)
    assert len(r["prune_log"]) == 3 and r["pruned"]["macs"] < r["dense"]["macs"]
    # the toy's criterion removes the highest channel indices first: every group keeps a prefix
    masks = json.loads((run / "masks.json").read_text())["groups"]
    cut = {gid: g for gid, g in masks.items() if g["kept"] < g["width"]}
    assert cut and all(g["kept"] == r["pruned"]["widths"][gid] for gid, g in masks.items())
    for g in cut.values():
        assert g["pruned"] == (f"{g['kept']}-{g['width'] - 1}" if g["kept"] < g["width"] - 1 else str(g["kept"]))
    log = (run / "run.log").read_text()  # the run's story is in Hydra's job log
    assert "Toy: pruning to 60% of" in log and "step 3: target" in log and "measured / target" in log


def test_records_from_before_the_registry_still_load():
    """Configs of result.json files in the earlier layout upgrade to today's config. The fixtures are
    the ``config`` blocks of results/cpu/compare50/*.result.json at commit 17fce40."""
    from omegaconf import OmegaConf

    from experiments.config import upgrade_record_config

    root = TEST_CONF.parent / "data" / "configs_before_registry"
    configs = {p.stem: json.loads(p.read_text()) for p in sorted(root.glob("*.json"))}
    assert set(configs) == {"halp", "magnitude", "taylor", "eagleeye"}
    for name, old in configs.items():
        cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(JobConfig), upgrade_record_config(old)))
        assert cfg.method_name == name and cfg.prune.target == old["prune"]["target"]
        if name == "halp":
            assert cfg.method_cfg == HalpConfig(old["prune"]["solver"], old["prune"]["saliency"],
                                                old["prune"]["max_resolve"])
        else:
            # the old settings, as today's settings class reads them (e.g. max_rate None = "auto")
            assert {k: cfg.method[k] for k in old[name]} == asdict(type(cfg.method_cfg)(**old[name]))
