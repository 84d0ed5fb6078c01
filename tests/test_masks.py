"""Masks: zeroing, re-application after optimizer steps, momentum clearing, files."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from halp.graph import ChannelGraph
from halp.masks import ChannelMasks, MaskApplier
from halp.models import create_model

from conftest import randomize_norms


@pytest.fixture
def graph() -> ChannelGraph:
    torch.manual_seed(0)
    return ChannelGraph.build(randomize_norms(create_model("halp:resnet20", in_chans=1)), (1, 28, 28))


def some_masks(graph: ChannelGraph, seed: int = 0) -> ChannelMasks:
    return ChannelMasks.random(graph, torch.Generator().manual_seed(seed), vanish_prob=0.3)


def test_apply_zeroes_exactly_the_pruned_channels(graph):
    masks = some_masks(graph)
    before = {k: v.clone() for k, v in graph.model.state_dict().items()}
    MaskApplier(graph, masks).apply()
    after = graph.model.state_dict()
    assert any((~m).any() for m in masks.values())
    # Oracle: every layer's weight = the old one with pruned output rows and input columns zeroed.
    for name, li in graph.layers.items():
        w = before[f"{name}.weight"].clone()
        if li.out_group is not None:
            w[~masks[li.out_group]] = 0
        if li.in_group is not None and not li.depthwise:
            w[:, ~masks[li.in_group]] = 0
        assert torch.equal(after[f"{name}.weight"], w), name
    for gid, g in graph.groups.items():
        for name in g.norms:
            for t in ("weight", "bias", "running_mean", "running_var"):
                expected = before[f"{name}.{t}"].clone()
                expected[~masks[gid]] = 0
                assert torch.equal(after[f"{name}.{t}"], expected), f"{name}.{t}"
    assert torch.equal(after["fc.bias"], before["fc.bias"])


def test_masks_hold_through_training_and_momentum_is_cleared():
    torch.manual_seed(0)
    graph = ChannelGraph.build(randomize_norms(create_model("halp:mobilenetv2", in_chans=1)), (1, 28, 28))
    masks = some_masks(graph, 1)
    model = graph.model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    gid = graph.layers["features.4.conv.2.0"].out_group  # a 32-channel residual stream
    pruned = ~masks[gid]
    assert pruned.any()
    conv = model.get_submodule(graph.groups[gid].out_layers[0])
    bn = model.get_submodule(graph.groups[gid].norms[0])
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))

    def step():
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    step()
    step()  # momentum has built up on every channel
    applier = MaskApplier(graph, masks)
    applier.apply()
    step()
    # Momentum from before pruning moves the pruned weights again: this is what clearing prevents.
    assert conv.weight[pruned].abs().sum() > 0 and bn.bias[pruned].abs().sum() > 0
    applier.apply()
    applier.clear_optimizer_state(opt)
    for p_ in (conv.weight, bn.weight, bn.bias):
        assert torch.all(opt.state[p_]["momentum_buffer"][pruned] == 0)
    for _ in range(3):
        step()
        # With the momentum cleared, pruned channels get no gradient and stay exactly zero.
        assert torch.all(conv.weight[pruned] == 0) and torch.all(bn.bias[pruned] == 0)
        assert torch.all(bn.running_var[pruned] == 0) and torch.all(bn.running_mean[pruned] == 0)
        applier.apply()
    assert conv.weight[~pruned].abs().sum() > 0


def test_file_round_trip_and_format(graph, tmp_path):
    masks = some_masks(graph, 2)
    path = masks.save(tmp_path / "masks.json", model_name="halp:resnet20")
    data = json.loads(path.read_text())
    assert data["format"] == "halp-channel-masks" and data["version"] == 1
    assert set(data["groups"]) == set(graph.groups)
    gid = next(iter(graph.groups))
    assert data["groups"][gid]["kept"] == int(masks[gid].sum())
    assert ChannelMasks.load(path) == masks
    assert ChannelMasks.load(path).model == data["model"] == "halp:resnet20" and masks.model is None
    assert ChannelMasks.load(path).to_dict()["model"] == "halp:resnet20"  # kept when saved again
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left


def test_masks_must_be_of_the_same_model_exactly(graph, tmp_path):
    """Masks of ResNet-20 name a subset of ResNet-56's groups with the same widths: fit, but foreign."""
    mine = ChannelMasks.load(some_masks(graph).save(tmp_path / "m.json", model_name="halp:resnet20"))
    mine.check_model(graph, "halp:resnet20")
    mine.check_model(graph, "resnet20")  # a bare name is a halp: one
    big = ChannelGraph.build(create_model("halp:resnet56", in_chans=1), (1, 28, 28))
    mine.validate(big)  # a partial mask set fits...
    with pytest.raises(ValueError, match="these masks belong to halp:resnet20, not halp:resnet56"):
        mine.check_model(big, "halp:resnet56")  # ...but is not this model's
    anonymous = ChannelMasks(dict(mine))  # a file without "model": the groups must match exactly
    with pytest.raises(ValueError, match=r"masks lack 18 group\(s\) the model has: .*masks from another model"):
        anonymous.check_model(big, "halp:resnet56")
    narrow = ChannelGraph.build(create_model("halp:resnet20", in_chans=1, width=0.5), (1, 28, 28))
    with pytest.raises(ValueError, match=r"mask has 16 channels, model has 8 \(masks for halp:resnet20\)"):
        mine.check_model(narrow, "halp:resnet20")


def test_ranges_text_is_exact():
    keep = torch.ones(12, dtype=torch.bool)
    keep[[0, 1, 2, 5, 9, 10]] = False
    d = ChannelMasks({"g": keep}).to_dict()
    assert d["groups"]["g"]["pruned"] == "0-2,5,9-10"
    assert torch.equal(ChannelMasks.from_dict(d)["g"], keep)


def test_masks_load_in_another_process(graph, tmp_path):
    """A fresh process builds the model, loads the mask file, applies it: same outputs."""
    masks = some_masks(graph, 3)
    masks.save(tmp_path / "m.json")
    torch.save(graph.model.state_dict(), tmp_path / "w.pt")
    x = torch.randn(2, 1, 28, 28)
    torch.save(x, tmp_path / "x.pt")
    MaskApplier(graph, masks).apply()
    with torch.no_grad():
        expected = graph.model.eval()(x)
    code = f"""
import torch
from halp.models import create_model
from halp.graph import ChannelGraph
from halp.masks import ChannelMasks, MaskApplier
m = create_model('halp:resnet20', in_chans=1)
m.load_state_dict(torch.load(r'{tmp_path / "w.pt"}'))
g = ChannelGraph.build(m, (1, 28, 28))
MaskApplier(g, ChannelMasks.load(r'{tmp_path / "m.json"}')).apply()
with torch.no_grad():
    torch.save(m.eval()(torch.load(r'{tmp_path / "x.pt"}')), r'{tmp_path / "y.pt"}')
"""
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "WANDB_MODE": "disabled"})
    torch.testing.assert_close(torch.load(tmp_path / "y.pt"), expected, rtol=0, atol=0)


def test_bad_masks_are_clear_errors(graph, tmp_path):
    full = ChannelMasks.full(graph)
    with pytest.raises(ValueError, match="does not have"):
        ChannelMasks({**full, "nope.conv": torch.ones(3, dtype=torch.bool)}).validate(graph)
    with pytest.raises(ValueError, match="mask has 5 channels, model has 16"):
        ChannelMasks({**full, "conv1": torch.ones(5, dtype=torch.bool)}).validate(graph)
    with pytest.raises(ValueError, match="keep no channel"):
        ChannelMasks({**full, "conv1": torch.zeros(16, dtype=torch.bool)}).validate(graph)
    ChannelMasks({**full, "layer1.0.conv1": torch.zeros(16, dtype=torch.bool)}).validate(graph)
    bad = full.to_dict()
    bad["version"] = 99
    with pytest.raises(ValueError, match="version 99"):
        ChannelMasks.from_dict(bad)
    bad = full.to_dict()
    bad["groups"]["conv1"]["pruned"] = "3-40"
    with pytest.raises(ValueError, match="outside 0..15"):
        ChannelMasks.from_dict(bad)
    with pytest.raises(ValueError, match="not a halp mask file"):
        ChannelMasks.from_dict({"groups": {}})


def test_failed_save_leaves_nothing(graph, tmp_path, monkeypatch):
    target = tmp_path / "masks.json"
    target.write_text("previous contents")

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        ChannelMasks.full(graph).save(target)
    assert target.read_text() == "previous contents"
    assert [p.name for p in tmp_path.iterdir()] == ["masks.json"]


def test_applying_twice_changes_nothing(graph):
    applier = MaskApplier(graph, some_masks(graph, 4))
    applier.apply()
    once = {k: v.clone() for k, v in graph.model.state_dict().items()}
    applier.apply()
    assert all(torch.equal(once[k], v) for k, v in graph.model.state_dict().items())


def test_unsupported_members_are_named():
    class GN(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.gn, self.c2 = nn.Conv2d(3, 8, 3), nn.GroupNorm(2, 8), nn.Conv2d(8, 4, 1)
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(self.c2(self.gn(self.c1(x))).mean((2, 3)))
    graph = ChannelGraph.build(GN(), (3, 16, 16))
    assert graph.groups["c1"].unsupported == ("GroupNorm gn",)
    keep = dict(ChannelMasks.full(graph))
    keep["c1"] = torch.tensor([True] * 7 + [False])
    with pytest.raises(ValueError, match="GroupNorm gn"):
        ChannelMasks(keep).validate(graph)


def test_wrong_input_shape_names_the_layer():
    with pytest.raises(ValueError, match="layer 'conv1'.*to have 3 channels"):
        ChannelGraph.build(create_model("halp:resnet20", in_chans=3), (1, 28, 28))
    with pytest.raises(ValueError, match="no Conv2d"):
        ChannelGraph.build(nn.Sequential(nn.Flatten(), nn.Linear(12, 2)), (3, 2, 2))
