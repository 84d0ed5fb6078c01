"""One set of end-to-end anchors per (latency table, setting): measured once, kept in the cache,
reused by every later job of a sweep (so all price with the same budget), re-measured on request."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from experiments import assets
from experiments.assets import latency_table, pin_anchors
from experiments.config import JobConfig, LatencyConfig, ModelConfig
from halp.graph import ChannelGraph
from halp.latency.backends import cpu_name
from halp.latency.table import LatencyTable
from halp.models import create_model

from toy_job import run_together, toy_table

SHAPE = (1, 12, 12)

# two jobs asking for the same table at once (as in tests/test_job.py), at the smallest useful size
LUT_SCRIPT = """
import json, logging, sys
from pathlib import Path
logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="[halp] %(message)s")
from experiments.assets import latency_table
from experiments.config import JobConfig, LatencyConfig, ModelConfig
from halp.graph import ChannelGraph
from halp.models import create_model
cfg = JobConfig(model=ModelConfig("halp:resnet20", width=0.5), latency=LatencyConfig(batch=2, step=8, rounds=1),
                cache_dir=sys.argv[1], progress=False)
graph = ChannelGraph.build(create_model("halp:resnet20", num_classes=4, in_chans=1, width=0.5), (1, 12, 12))
info = latency_table(cfg, graph, Path(sys.argv[1]))
print(json.dumps({"reused": info.reused, "id": info.id, "path": str(info.path), "anchor_id": info.anchor_id,
                  "measured": info.anchors_measured, "anchors": info.table.calibration}))
"""


def job(cache: Path, remeasure: bool = False, **lat) -> JobConfig:
    return JobConfig(model=ModelConfig("halp:resnet20", width=0.5),
                     latency=LatencyConfig(**{"batch": 2, "step": 8, "rounds": 1, "remeasure_anchors": remeasure, **lat}),
                     cache_dir=str(cache), progress=False)


def graph() -> ChannelGraph:
    return ChannelGraph.build(create_model("halp:resnet20", num_classes=4, in_chans=1, width=0.5), SHAPE)


def test_jobs_of_a_sweep_share_one_set_of_anchors(tmp_path):
    cache = tmp_path / "cache"
    outs = run_together(LUT_SCRIPT, str(cache))
    first, second = sorted((json.loads(o[0].strip().splitlines()[-1]) for o in outs), key=lambda i: i["reused"])
    # one built the table and measured the anchors; the other waited, and measured nothing
    assert (first["reused"], first["measured"]) == (False, True)
    assert (second["reused"], second["measured"]) == (True, False)
    assert first["anchor_id"] == second["anchor_id"] and first["anchors"] == second["anchors"]
    kept = [p for p in (cache / "anchors").iterdir() if not p.name.endswith(".lock")]
    assert len(kept) == 1 and json.loads(kept[0].read_text())["anchor_id"] == first["anchor_id"]
    assert kept[0].name.startswith(Path(first["path"]).stem + ".anchors-")
    assert not [p for d in ("luts", "anchors") for p in (cache / d).iterdir() if p.name.endswith((".tmp", ".partial"))]
    # a later job reuses them too (no measuring)
    g = graph()
    later = latency_table(job(cache), g, cache)
    assert later.anchor_id == first["anchor_id"] and not later.anchors_measured and later.seconds == 0.0
    # the explicit option measures new ones, which then replace the kept ones for later jobs
    fresh = latency_table(job(cache, remeasure=True), g, cache)
    assert fresh.anchors_measured and fresh.anchor_id != first["anchor_id"] and fresh.id == first["id"]
    assert fresh.table.calibration != first["anchors"]
    assert latency_table(job(cache), g, cache).anchor_id == fresh.anchor_id


def test_given_table_anchors_are_kept_pinned_and_remeasured(tmp_path, monkeypatch):
    """A table given by path: its anchors are kept in the cache; a resumed run keeps its pinned ones."""
    calls = []

    def fake_recalibrate(graph, table, setting):
        calls.append(setting)
        return {"anchors": [{"name": "dense", "ms": 1.0 + len(calls), "spread": 0.0, "widths": {}}], "batch": 2}

    monkeypatch.setattr(assets, "recalibrate", fake_recalibrate)
    cache, g = tmp_path / "cache", graph()
    table = toy_table(tmp_path)
    over = {"table": table, "allow_mismatch": True, "overhead": "none"}
    a = latency_table(job(cache, **over), g, cache)
    b = latency_table(job(cache, **over), g, cache)
    assert len(calls) == 1 and a.anchors_measured and not b.anchors_measured and a.anchor_id == b.anchor_id
    assert list((cache / "anchors").glob("toy-*.anchors-*.json"))  # in the cache, not beside the given file
    assert not list(Path(table).parent.glob("*.anchors-*"))
    pinned = tmp_path / "run" / "lut-anchors.json"
    pin_anchors(b, pinned)
    c = latency_table(job(cache, remeasure=True, **over), g, cache)
    assert len(calls) == 2 and c.anchor_id != a.anchor_id
    # a resumed run prices with the anchors it pinned, whatever the cache holds now
    resumed = latency_table(job(cache, **over), g, cache, pinned=pinned)
    assert resumed.anchor_id == a.anchor_id and resumed.table.calibration == a.table.calibration and len(calls) == 2
    # another setting (here: batch) has anchors of its own
    d = latency_table(job(cache, **{**over, "batch": 4}), g, cache)
    assert len(calls) == 3 and d.anchor_id not in (a.anchor_id, c.anchor_id)


def test_table_from_another_torch_is_refused_naming_the_hydra_switch(tmp_path, monkeypatch):
    monkeypatch.setattr(assets, "recalibrate", lambda graph, table, setting: {"anchors": [], "batch": 2})
    path = Path(toy_table(tmp_path))
    t = LatencyTable.load(path)
    cfg = job(tmp_path / "cache", table=str(tmp_path / "old-torch.json"), overhead="none")
    s = cfg.latency.setting()
    t.meta.update(setting={**s.__dict__, "memory_format": s.memory_format}, device={"name": cpu_name()},
                  versions={"torch": "1.0.0"})  # this setting, this device, another torch
    t.save(tmp_path / "old-torch.json")
    with pytest.raises(ValueError, match=r"another setting \(torch: table '1.0.0', now '[^']+'\)") as e:
        latency_table(cfg, graph(), tmp_path / "cache")
    assert "latency.allow_mismatch=true" in str(e.value) and "--allow-lut-mismatch" not in str(e.value)
    cfg = job(tmp_path / "cache", table=str(tmp_path / "old-torch.json"), overhead="none", allow_mismatch=True)
    assert latency_table(cfg, graph(), tmp_path / "cache").table.meta["versions"]["torch"] == "1.0.0"
