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
