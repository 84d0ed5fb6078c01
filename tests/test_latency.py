"""Latency tables and the cost model: formulas, interpolation, files, resume, shards, errors.

Most tests use a deterministic fake backend (latency = a formula of the unit's shape), so that
results are exact and no test depends on wall-clock timing.
"""
from __future__ import annotations

import math
import pickle

import numpy as np
import pytest
import torch
from torch import nn

from halp.graph import ChannelGraph
from halp.latency import backends as B
from halp.latency import build as build_mod
from halp.latency.backends import Backend, Setting
from halp.latency.build import build_table, parse_shard, plan_build
from halp.latency.cost import CostModel, UnitCurve
from halp.latency.quality import chunk_sizes, monotonicity_violations, smooth_monotone
from halp.latency.table import Entry, LatencyTable, from_reference, load_reference, merge
from halp.latency.timing import Protocol
from halp.latency.units import UnitSpec, model_units, reachable_widths
from halp.models import create_model

from conftest import synthetic_table


def formula(module: nn.Module, x: torch.Tensor) -> float:
    """Fake latency: 1 ms per 1e6 MACs, c_out rounded up to 16 (a staircase), + BN/act terms."""
    conv = module[0] if isinstance(module, nn.Sequential) else module
    if not isinstance(conv, (nn.Conv2d, nn.Linear)):  # a whole network: proportional to its size
        return 1e-5 * sum(p.numel() for p in module.parameters())
    if isinstance(conv, nn.Linear):
        return conv.in_features * conv.out_features / 1e6 + 0.001
    hw = x.shape[-1] * x.shape[-2] / conv.stride[0] ** 2
    cout16 = math.ceil(conv.out_channels / 16) * 16
    per_group = conv.in_channels // conv.groups
    ms = x.shape[0] * cout16 * per_group * conv.kernel_size[0] ** 2 * hw / 1e6 + 0.002
    if isinstance(module, nn.Sequential) and len(module) > 1:
        ms += 0.0001 * conv.out_channels * (len(module) - 1)
    return ms


class FakeBackend(Backend):
    def prepare(self, module, x, weight_pool=None):
        value = formula(module, x)
        return lambda: value

    def time_ms(self, run, n):
        return run()


@pytest.fixture
def fake(monkeypatch):
    monkeypatch.setitem(B.BACKENDS, "fake", FakeBackend)
    return Setting(backend="fake", batch=2)


@pytest.fixture(scope="module")
def graph() -> ChannelGraph:
    torch.manual_seed(0)
    return ChannelGraph.build(create_model("halp:resnet20", num_classes=10, in_chans=1, width=0.5), (1, 12, 12))


QUICK = Protocol(rounds=2)


# ---------------------------------------------------------------- units and grid
def test_reachable_widths_and_units(graph):
    assert reachable_widths(64, 16) == [16, 32, 48, 64]
    assert reachable_widths(24, 16) == [8, 24]
    assert reachable_widths(5, 8) == [5]
    units = model_units(graph)
    assert units["layer1.0.conv1"].norm and units["layer1.0.conv1"].act == "ReLU"
    assert units["layer2.0.downsample.0"].norm and units["layer2.0.downsample.0"].act is None
    assert units["fc"].kind == "linear"
    assert units["layer2.0.conv1"].stride == (2, 2) and units["layer2.0.conv1"].input_hw == (12, 12)
    assert units["layer3.2.conv1"].pool is None and units["layer3.2.conv2"].pool == "AdaptiveAvgPool2d:1"
    # a stem followed by BN, ReLU and max-pool is measured as one unit
    rn = ChannelGraph.build(create_model("torchvision:resnet18", num_classes=10), (3, 64, 64))
    stem = model_units(rn)["conv1"]
    assert (stem.norm, stem.act, stem.pool) == (True, "ReLU", "MaxPool2d:3:2:1")
    assert isinstance(stem.build(3, 16)[-1], nn.MaxPool2d)
    assert len(stem.build(3, 16, fused=False)) == 1


def test_depthwise_units_keep_cin_equal_cout():
    g = ChannelGraph.build(create_model("halp:mobilenetv2", num_classes=10, in_chans=1, width=0.5), (1, 16, 16))
    plan = plan_build(g, "halp:mobilenetv2", Setting(), step=8)
    dw = {k for k, u in plan.specs.items() if u.depthwise}
    assert dw and all(ci == co for k, ci, co in plan.points if k in dw)


# ---------------------------------------------------------------- cost model formulas
def lin(spec: UnitSpec, ci: int, co: int) -> float:
    return 0.01 * ci + 0.1 * math.ceil(co / 8) + (0.5 if spec.stride[0] == 2 else 0.0)


def test_total_and_chunk_costs_by_hand(graph):
    table = synthetic_table(graph, lin)
    cm = CostModel.create(graph, table, overhead="none", two_sided=False)  # the paper's writers-only prices
    widths = {gid: g.width for gid, g in graph.groups.items()}
    widths["layer2.1.conv1"] = 8
    io = graph.layer_widths(widths)
    units = model_units(graph)
    expected = sum(lin(units[n], *io[n]) for n in graph.layers)
    assert cm.total_ms(widths) == pytest.approx(expected)

    # Chunk costs of the stage-2 stream (16 channels, chunk 4): hand-computed from `lin`.
    gid = graph.layers["layer2.0.downsample.0"].out_group
    g = graph.groups[gid]
    costs = cm.chunk_costs(gid, widths, 4)
    n = widths[gid]
    hand = []
    for i in range(n // 4):
        hi, lo = n - 4 * i, n - 4 * (i + 1)
        hand.append(sum(lin(units[l], io[l][0], hi) - (lin(units[l], io[l][0], lo) if lo > 0 else 0.0)
                        for l in g.out_layers))
    np.testing.assert_allclose(costs, hand)
    # Two-sided: also the readers' c_in shrink.
    two = CostModel.create(graph, table, overhead="none", two_sided=True).chunk_costs(gid, widths, 4)
    extra = [sum(0.01 * 4 for _ in g.in_layers)] * (n // 4)
    extra[-1] = sum(lin(units[l], 4, io[l][1]) for l in g.in_layers)  # the last chunk empties the readers
    np.testing.assert_allclose(two - costs, extra)

    # Overhead calibration: offset adds the dense gap, scale multiplies, affine meets the dense and
    # smallest anchors, anchors is piecewise linear through all of them.
    full = graph.full_widths()
    dense = cm.total_ms(full)
    small_w = {gid: reachable_widths(g.width, 4)[0] for gid, g in graph.groups.items()}
    half_w = {gid: max(4, g.width // 2) for gid, g in graph.groups.items()}
    small, half = cm.total_ms(small_w), cm.total_ms(half_w)
    table.calibration = {"anchors": [{"name": "dense", "ms": 100.0, "widths": full},
                                     {"name": "half", "ms": 50.0, "widths": half_w},
                                     {"name": "smallest", "ms": 30.0, "widths": small_w}]}
    off = CostModel.create(graph, table, overhead="offset")
    assert off.total_ms(full) == pytest.approx(100.0)
    assert off.total_ms(widths) == pytest.approx(cm.total_ms(widths) + 100.0 - dense)
    sc = CostModel.create(graph, table, overhead="scale")
    assert sc.total_ms(widths) == pytest.approx(cm.total_ms(widths) * 100.0 / dense)
    aff = CostModel.create(graph, table, overhead="affine", two_sided=False)
    assert aff.total_ms(full) == pytest.approx(100.0) and aff.total_ms(small_w) == pytest.approx(30.0)
    b = 70.0 / (dense - small)
    assert aff.total_ms(widths) == pytest.approx(100.0 + b * (cm.total_ms(widths) - dense))
    np.testing.assert_allclose(aff.chunk_costs(gid, widths, 4), b * costs)
    anc = CostModel.create(graph, table, overhead="anchors", two_sided=False)
    assert [anc.total_ms(w) for w in (full, half_w, small_w)] == pytest.approx([100.0, 50.0, 30.0])
    u = cm.total_ms(widths)
    lo, hi = ((small, 30.0), (half, 50.0)) if u <= half else ((half, 50.0), (dense, 100.0))
    slope = (hi[1] - lo[1]) / (hi[0] - lo[0])
    assert anc.total_ms(widths) == pytest.approx(lo[1] + slope * (u - lo[0]))
    np.testing.assert_allclose(anc.chunk_costs(gid, widths, 4), slope * costs)
    # fresh anchors given at creation replace the table's
    fresh = {"anchors": [dict(a, ms=2 * a["ms"]) for a in table.calibration["anchors"]]}
    assert CostModel.create(graph, table, calibration=fresh).total_ms(full) == pytest.approx(200.0)
    conv = CostModel.create(graph, table, overhead="none", conv_only=True)
    assert conv.total_ms(widths) == pytest.approx(cm.total_ms(widths) / 2)


def test_emptied_branch_costs_nothing(graph):
    cm = CostModel.create(graph, synthetic_table(graph, lin), overhead="none")
    widths = graph.full_widths()
    full = cm.total_ms(widths)
    widths["layer1.1.conv1"] = 0
    units = model_units(graph)
    io = graph.layer_widths(graph.full_widths())
    saved = lin(units["layer1.1.conv1"], *io["layer1.1.conv1"]) + lin(units["layer1.1.conv2"], *io["layer1.1.conv2"])
    assert cm.total_ms(widths) == pytest.approx(full - saved)


# ---------------------------------------------------------------- interpolation
def test_unit_curve_interpolation():
    pts = {(ci, co): ci * 1.0 + co * 10.0 for ci in (16, 32) for co in (16, 32, 48)}
    c = UnitCurve(pts, depthwise=False)
    assert c.at(16, 32) == 16 + 320
    assert c.at(24, 32) == pytest.approx(24 + 320)  # linear in c_in
    assert c.at(16, 20) == 16 + 320  # c_out: the next measured stair up
    assert c.at(16, 48) == 16 + 480
    assert c.at(8, 16) == pytest.approx((16 + 160) * 8 / 16)  # below the grid: proportional
    assert c.at(16, 0) == 0.0 and c.at(0, 16) == 0.0
    lin_c = UnitCurve(pts, depthwise=False, cout_mode="linear")
    assert lin_c.at(16, 20) == pytest.approx(16 + 200)
    dw = UnitCurve({(c_, c_): float(c_) for c_ in (8, 16, 24)}, depthwise=True)
    assert dw.at(12, 12) == 16.0 and dw.at(24, 24) == 24.0


def test_monotonicity_report_finds_the_cliff():
    spec = UnitSpec("conv", (3, 3), (1, 1), (1, 1), input_hw=(8, 8))
    t = LatencyTable(meta={})
    for co, ms in ((16, 1.0), (32, 2.0), (48, 1.2), (64, 3.0)):
        t.add(spec.key, spec, 16, co, Entry(ms, spread=0.01))
    v = monotonicity_violations(t)
    assert len(v) == 1 and v[0]["c_out"] == (32, 48) and v[0]["drop_pct"] == pytest.approx(40)


def test_monotone_smoothing_is_isotonic():
    spec = UnitSpec("conv", (3, 3), (1, 1), (1, 1), input_hw=(8, 8))
    t = LatencyTable(meta={})
    for co, ms in ((16, 1.0), (32, 2.0), (48, 1.2), (64, 3.0), (80, 2.9)):
        t.add(spec.key, spec, 16, co, Entry(ms, spread=0.01, samples=5))
    t.add(spec.key, spec, 32, 16, Entry(5.0, samples=5))  # another row, already monotone
    assert smooth_monotone(t) == 4
    row = [t.entries[spec.key][(16, co)].ms for co in (16, 32, 48, 64, 80)]
    assert row == pytest.approx([1.0, 1.6, 1.6, 2.95, 2.95])  # pooled means of the violators
    assert t.entries[spec.key][(32, 16)].ms == 5.0
    assert monotonicity_violations(t) == []


def test_onnxruntime_backend_builds_a_table(graph, tmp_path):
    pytest.importorskip("onnxruntime")
    plan = plan_build(graph, "halp:resnet20", Setting(backend="onnxruntime", batch=2), step=16)
    table = build_table(plan, tmp_path / "ort.json", Protocol(rounds=1), progress=False)
    assert table.meta["setting"]["backend"] == "onnxruntime" and "onnxruntime" in table.meta["versions"]
    assert all(e.ms > 0 for v in table.entries.values() for e in v.values())
    CostModel.create(graph, table)


def test_chunk_sizes_follow_the_staircase(graph):
    def stairs(period):
        return lambda spec, ci, co: 0.01 * ci + 0.1 * math.ceil(co / period)
    # grid step 4; writers' latency flat within blocks of 8 (or 16) channels
    sizes8 = chunk_sizes(graph, synthetic_table(graph, stairs(8)))
    assert {sizes8[gid] for gid, g in graph.groups.items() if g.width >= 16} == {8}
    assert {sizes8[gid] for gid, g in graph.groups.items() if g.width == 8} == {4}  # at most half the width
    sizes16 = chunk_sizes(graph, synthetic_table(graph, stairs(16)))
    assert sizes16[graph.layers["layer3.0.downsample.0"].out_group] == 16  # 32 wide: 2 chunks of 16
    assert sizes16["conv1"] == 4  # 8 wide: a chunk may be at most half the width
    assert set(chunk_sizes(graph, synthetic_table(graph, lambda s, ci, co: 0.01 * ci + 0.1 * co)).values()) == {4}


# ---------------------------------------------------------------- files
def test_reference_pickle_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    ref = {}
    for cin in (3, 64, 128):
        for cout in (32, 64):
            ref[f"1_{cin}_{cout}_56_3_1_1"] = float(rng.uniform(0.1, 2))
            ref[f"1_{cin}_{cout}_28_1_2_1"] = float(rng.uniform(0.1, 2))
    for c in (32, 64):
        ref[f"1_{c}_{c}_112_3_2_{c}"] = float(rng.uniform(0.1, 2))
    path = tmp_path / "ref.pkl"
    path.write_bytes(pickle.dumps(ref))
    table = load_reference(path)
    assert table.n_points == len(ref)
    table.save(tmp_path / "t.json")
    out = tmp_path / "back.pkl"
    LatencyTable.load(tmp_path / "t.json").save_reference(out)
    assert pickle.loads(out.read_bytes()) == ref
    with pytest.raises(ValueError, match="mixes batch sizes"):
        from_reference({"1_3_8_8_3_1_1": 1.0, "2_3_8_8_3_1_1": 1.0})
    with pytest.raises(ValueError, match="is not"):
        from_reference({"1_3_8": 1.0})


def test_corrupt_and_foreign_files(tmp_path, graph, fake):
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": "halp-latency-table", "version": 1, "meta": {}, "units": {')
    with pytest.raises(ValueError, match="corrupt latency table"):
        LatencyTable.load(bad)
    (tmp_path / "x.json").write_text('{"hello": 1}')
    with pytest.raises(ValueError, match="not a halp latency table"):
        LatencyTable.load(tmp_path / "x.json")
    with pytest.raises(FileNotFoundError, match="halp lut build"):
        LatencyTable.load(tmp_path / "missing.json")
    table = build_table(plan_build(graph, "halp:resnet20", fake, 8), tmp_path / "t.json", QUICK, progress=False)
    other = ChannelGraph.build(create_model("halp:mobilenetv2", num_classes=10, in_chans=1, width=0.5), (1, 12, 12))
    with pytest.raises(ValueError, match="built for halp:resnet20"):
        CostModel.create(other, table)
    bigger = ChannelGraph.build(create_model("halp:resnet20", num_classes=10, in_chans=1, width=0.5), (1, 16, 16))
    with pytest.raises(ValueError, match="another model or input size"):
        CostModel.create(bigger, table)


# ---------------------------------------------------------------- build: resume, shards, errors
def test_build_resume_after_interruption(graph, fake, tmp_path, monkeypatch):
    plan = plan_build(graph, "halp:resnet20", fake, 4)
    full = build_table(plan, tmp_path / "full.json", QUICK, progress=False, chunk=10)

    calls = {"n": 0}
    real = build_mod.measure

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*a, **k)
    monkeypatch.setattr(build_mod, "measure", flaky)
    out = tmp_path / "resumed.json"
    with pytest.raises(KeyboardInterrupt):
        build_table(plan, out, QUICK, progress=False, chunk=10)
    partial = out.with_name(out.name + ".partial")
    assert partial.exists() and not out.exists()
    assert len(partial.read_text().splitlines()) == 1 + 20  # header + two finished chunks
    with open(partial, "a") as f:
        f.write('{"u": "cut in the mid')  # the interruption cut a line
    monkeypatch.setattr(build_mod, "measure", real)
    resumed = build_table(plan, out, QUICK, progress=False, chunk=10)
    assert not partial.exists()
    assert resumed.entries == full.entries
    # a partial file from other settings is refused, not mixed in
    partial.write_text('{"signature": {"model": "other"}}\n')
    with pytest.raises(ValueError, match="other settings"):
        build_table(plan, out, QUICK, progress=False)


def test_shards_merge_to_the_full_table(graph, fake, tmp_path):
    full = build_table(plan_build(graph, "halp:resnet20", fake, 4), tmp_path / "full.json", QUICK, progress=False)
    parts = [build_table(plan_build(graph, "halp:resnet20", fake, 4, shard=(i, 3)), tmp_path / f"p{i}.json",
                         QUICK, progress=False) for i in range(3)]
    assert sum(p.n_points for p in parts) == full.n_points
    assert all(p.n_points < full.n_points for p in parts)
    merged = merge([LatencyTable.load(tmp_path / f"p{i}.json") for i in (2, 0, 1)])
    assert merged.entries == full.entries
    CostModel.create(graph, merged)  # complete
    with pytest.raises(ValueError, match="missing shard"):
        merge(parts[:2])
    with pytest.raises(ValueError, match="incomplete"):
        CostModel.create(graph, merge(parts[:2], allow_partial=True))
    with pytest.raises(ValueError, match="given twice"):
        merge([parts[0], parts[0]])
    assert parse_shard("1/4") == (1, 4)
    with pytest.raises(ValueError, match="0 <= i < n"):
        parse_shard("4/4")


def test_missing_point_and_setting_mismatch(graph, fake, tmp_path):
    table = build_table(plan_build(graph, "halp:resnet20", fake, 8), tmp_path / "t.json", QUICK, progress=False)
    key = next(iter(table.entries))
    table.entries[key].pop(next(iter(table.entries[key])))
    with pytest.raises(ValueError, match="incomplete: 1 grid point"):
        CostModel.create(graph, table)
    setting = dict(table.meta["setting"])
    dev = table.meta["device"]["name"]
    assert table.check_setting(setting, dev) == []
    with pytest.raises(ValueError, match="batch: table 2, now 8"):
        table.check_setting({**setting, "batch": 8}, dev)
    with pytest.raises(ValueError, match="device: table"):
        table.check_setting(setting, "Some Other CPU")
    assert table.check_setting({**setting, "threads": 2}, dev, allow_mismatch=True)


def test_bad_build_input(graph):
    with pytest.raises(ValueError, match="positive number"):
        plan_build(graph, "m", Setting(), 0)
    with pytest.raises(ValueError, match="unknown backend"):
        Setting(backend="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="not available"):
            with B.get_backend(Setting(backend="torch-cuda")):
                pass


def test_real_cpu_build_show_validate(tmp_path, capsys):
    """The real torch backend end to end on a tiny model (timings are not asserted)."""
    from halp.cli import main

    out = tmp_path / "lut.json"
    args = ["--input-shape", "1,12,12", "--num-classes", "10"]
    assert main(["lut", "build", "halp:resnet20", *args, "--batch", "2", "--step", "16",
                 "--rounds", "2", "--out", str(out), "--quiet"]) == 0
    table = LatencyTable.load(out)
    assert table.n_points > 0 and all(a["ms"] > 0 for a in table.calibration["anchors"])
    assert all(e.ms > 0 and e.conv_ms > 0 for v in table.entries.values() for e in v.values())
    assert main(["lut", "show", str(out), "--png", str(tmp_path / "s.png")]) == 0
    assert (tmp_path / "s.png").stat().st_size > 10_000
    assert main(["lut", "validate", str(out), "halp:resnet20", "-k", "3", "--rounds", "2", "--quiet",
                 "--json", str(tmp_path / "v.json")]) == 0
    text = capsys.readouterr().out
    assert "median |err|" in text and "conv-only" in text
    assert main(["lut", "build", "halp:resnet20", *args, "--step", "0", "--out", str(tmp_path / "x.json")]) == 2
    assert "positive number" in capsys.readouterr().err


def test_anchor_map_falls_back_to_scale_when_anchors_contradict_themselves():
    from halp.latency.anchors import apply_knots, overhead_knots
    dense = (1.70, 1.93)
    good = [(1.60, 1.61), (1.65, 1.75), dense]
    xs, ys = overhead_knots("anchors", good, dense)
    assert xs.tolist() == [1.60, 1.65, 1.70] and ys.tolist() == [1.61, 1.75, 1.93]
    # the "half" network measured faster than the "smallest" one: slopes would be <= 0
    with pytest.warns(RuntimeWarning, match="not increasing"):
        xs, ys = overhead_knots("anchors", [(1.60, 1.61), (2.10, 1.81), (1.70, 1.93)], dense)
    assert xs.tolist() == [0.0, 1.70] and ys.tolist() == [0.0, 1.93]
    value, slope = apply_knots(xs, ys, 0.85)
    assert value == pytest.approx(1.93 / 2) and slope == pytest.approx(1.93 / 1.70)


def test_anchor_map_does_not_grow_the_overhead_past_the_dense_anchor():
    """RegNetX's numbers (results/lut_accuracy.md): anchors at units 5.96 / 9.25 / 13.31 ms measured
    7.13 / 10.70 / 17.98 ms, a last slope of 1.79. A configuration narrowed inside its grouped convs
    sums its units to 22.98 ms and measured 24.36 ms; extending the last segment said 35.3 ms.
    Past the dense knot the map adds unit time one to one."""
    from halp.latency.anchors import apply_knots, overhead_knots
    dense = (13.31, 17.98)
    xs, ys = overhead_knots("anchors", [(5.96, 7.13), (9.25, 10.70), dense], dense)
    value, slope = apply_knots(xs, ys, 22.98)
    assert slope == 1.0 and value == pytest.approx(17.98 + (22.98 - 13.31))
    assert abs(value / 24.36 - 1) < 0.15  # was 45 % over
    # inside the anchors nothing changes: the last segment's own slope up to the dense knot
    inside, s_in = apply_knots(xs, ys, 12.0)
    assert s_in == pytest.approx((17.98 - 10.70) / (13.31 - 9.25))
    assert inside == pytest.approx(10.70 + s_in * (12.0 - 9.25))
    assert apply_knots(xs, ys, 13.31)[0] == pytest.approx(17.98)  # continuous at the knot
    # a gentle last slope (below 1) is kept past the knot; below the first knot the map extends as before
    xs2, ys2 = overhead_knots("anchors", [(5.0, 7.0), (10.0, 10.5), (14.0, 13.3)], (14.0, 13.3))
    assert apply_knots(xs2, ys2, 16.0) == pytest.approx((13.3 + 0.7 * 2.0, 0.7))
    assert apply_knots(xs, ys, 4.0)[1] == pytest.approx((10.70 - 7.13) / (9.25 - 5.96))


def test_table_from_another_torch_is_refused_and_each_interface_names_its_switch(graph, fake, tmp_path):
    table = build_table(plan_build(graph, "halp:resnet20", fake, 8), tmp_path / "t.json", QUICK, progress=False)
    assert table.meta["versions"]["torch"] == B.torch_version() == torch.__version__.split("+")[0]
    setting, dev = dict(table.meta["setting"]), table.meta["device"]["name"]
    table.meta["versions"] = {"torch": "1.0.0"}
    with pytest.raises(ValueError, match=r"torch: table '1.0.0', now '[^']+'.*\(--allow-lut-mismatch\)"):
        table.check_setting(setting, dev)  # the `halp lut` flag by default
    with pytest.raises(ValueError, match=r"torch: table '1.0.0'.*\(latency.allow_mismatch=true\)") as e:
        table.check_setting(setting, dev, override="latency.allow_mismatch=true", rebuild="delete it")
    assert "--allow-lut-mismatch" not in str(e.value) and "; delete it, or override" in str(e.value)
    assert table.check_setting(setting, dev, allow_mismatch=True) == [f"torch: table '1.0.0', now '{B.torch_version()}'"]
    # a table from before tables recorded the torch version: unknown, so not refused, but said
    del table.meta["versions"]
    with pytest.warns(UserWarning, match="records no torch version"):
        assert table.check_setting(setting, dev) == []


def test_weight_views_start_64_byte_aligned_like_real_weights():
    from halp.latency.backends import _weight_views
    pool = torch.randn(10_000)[3:]  # a pool that itself starts off the 64-byte grid
    for shape in ((296, 1, 5, 5), (7, 3, 3, 3), (10, 13)):
        w = torch.empty(shape)
        views = _weight_views(pool, w, channels_last=False)
        assert len(views) == (pool.numel() - 13 - w.numel()) // (-(-w.numel() // 16) * 16) + 1
        assert all(v.data_ptr() % 64 == 0 and v.shape == w.shape for v in views)
        assert views[-1].data_ptr() + 4 * w.numel() <= pool.data_ptr() + 4 * pool.numel()
    big = torch.empty(20_000)  # larger than the pool: its own weights
    assert _weight_views(pool, big, channels_last=False)[0].data_ptr() == big.data_ptr()


def test_a_tiny_weight_gets_a_bounded_number_of_views_spread_over_the_pool():
    from halp.latency.backends import MAX_VIEWS, _weight_views
    pool = torch.randn(2**21)[5:]  # 8 MB, off the 64-byte grid
    w = torch.empty(8, 6, 1, 1)  # 192 bytes: one view per 64 bytes would be ~130,000 views
    views = _weight_views(pool, w, channels_last=False)
    ptrs = [v.data_ptr() for v in views]
    assert MAX_VIEWS // 2 <= len(views) <= MAX_VIEWS + 1
    assert all(p % 64 == 0 for p in ptrs) and len(set(ptrs)) == len(ptrs)
    gaps = {b - a for a, b in zip(ptrs, ptrs[1:])}
    assert len(gaps) == 1 and gaps.pop() >= 4 * (pool.numel() // (MAX_VIEWS + 1)) - 64  # evenly spaced
    assert ptrs[-1] + 4 * w.numel() <= pool.data_ptr() + 4 * pool.numel()
    assert ptrs[-1] - ptrs[0] >= 0.99 * 4 * (pool.numel() - w.numel() - 16)  # spans the whole pool
