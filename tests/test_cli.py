"""The ``halp`` command line."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from halp.cli import main


def test_help_explains():
    out = subprocess.run([sys.executable, "-m", "halp.cli", "inspect", "--help"],
                         capture_output=True, text=True, check=True).stdout
    assert "channel groups" in out and "--input-shape" in out and "round trip" in out
    top = subprocess.run([sys.executable, "-m", "halp.cli", "--help"], capture_output=True, text=True, check=True)
    assert "inspect" in top.stdout


def test_inspect_prints_groups_and_round_trip(tmp_path, capsys):
    rc = main(["inspect", "halp:resnet20", "--input-shape", "1,28,28", "--json", str(tmp_path / "r.json")])
    out = capsys.readouterr().out
    assert rc == 0
    assert "12 channel groups" in out and "layer2.0.conv2" in out and "-> OK" in out
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["roundtrip"]["ok"] and data["roundtrip"]["max_abs_diff"] < 1e-4
    assert data["roundtrip"]["slim_params"] == data["roundtrip"]["predicted_params"]
    conv = next(li for li in data["layers"] if li["name"] == "layer2.0.conv1")
    assert conv["input_hw"] == [28, 28] and conv["stride"] == [2, 2] and conv["in_group"] == "conv1"


def test_bad_input_is_one_clear_line(capsys):
    assert main(["inspect", "halp:nope"]) == 2
    err = capsys.readouterr().err
    assert "unknown model halp:nope" in err and "Traceback" not in err
    assert main(["inspect", "halp:resnet20", "--checkpoint", "/nonexistent.pt"]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["inspect", "halp:resnet20", "--input-shape", "28,28"])
    assert e.value.code == 2
    assert "C,H,W" in capsys.readouterr().err


def test_slim_command_and_foreign_or_corrupt_masks(tmp_path, capsys):
    import torch

    from halp.graph import ChannelGraph
    from halp.masks import ChannelMasks
    from halp.models import create_model

    model = create_model("halp:resnet20", num_classes=10, in_chans=1)
    torch.save(model.state_dict(), tmp_path / "w.pt")
    graph = ChannelGraph.build(model, (1, 28, 28))
    ChannelMasks.random(graph, torch.Generator().manual_seed(0), vanish_prob=0.3).save(tmp_path / "m.json")
    rc = main(["slim", "halp:resnet20", "--checkpoint", str(tmp_path / "w.pt"), "--masks",
               str(tmp_path / "m.json"), "--out", str(tmp_path / "s.pt"), "--onnx", str(tmp_path / "s.onnx")])
    assert rc == 0 and (tmp_path / "s.pt").exists() and (tmp_path / "s.onnx").exists()
    assert "MACs" in capsys.readouterr().out
    # a mask file for another model
    other = ChannelGraph.build(create_model("halp:mobilenetv2", in_chans=1), (1, 28, 28))
    ChannelMasks.full(other).save(tmp_path / "other.json")
    assert main(["slim", "halp:resnet20", "--masks", str(tmp_path / "other.json"), "--out", str(tmp_path / "x.pt")]) == 2
    assert "does not have" in capsys.readouterr().err
    # the masks of a ResNet-20 run on ResNet-56: its groups include ResNet-20's, but the masks are not its own
    ChannelMasks.load(tmp_path / "m.json").save(tmp_path / "rn20.json", model_name="halp:resnet20")
    assert main(["slim", "halp:resnet56", "--masks", str(tmp_path / "rn20.json"), "--out", str(tmp_path / "x.pt")]) == 2
    assert "these masks belong to halp:resnet20, not halp:resnet56" in capsys.readouterr().err
    ChannelMasks.load(tmp_path / "m.json").save(tmp_path / "anon.json")  # no model named: groups must match
    assert main(["slim", "halp:resnet56", "--masks", str(tmp_path / "anon.json"), "--out", str(tmp_path / "x.pt")]) == 2
    assert "masks lack 18 group(s) the model has" in capsys.readouterr().err
    assert not (tmp_path / "x.pt").exists()
    # a corrupt one
    (tmp_path / "bad.json").write_text('{"format": "halp-channel-masks", "version": 1, "groups": {"conv1": 3')
    assert main(["slim", "halp:resnet20", "--masks", str(tmp_path / "bad.json"), "--out", str(tmp_path / "x.pt")]) == 2
    assert "corrupt" in capsys.readouterr().err
    assert not (tmp_path / "x.pt").exists()
    # a checkpoint of another shape
    assert main(["slim", "halp:resnet20", "--num-classes", "5", "--checkpoint", str(tmp_path / "w.pt"),
                 "--masks", str(tmp_path / "m.json"), "--out", str(tmp_path / "x.pt")]) == 2
    assert "does not fit" in capsys.readouterr().err
