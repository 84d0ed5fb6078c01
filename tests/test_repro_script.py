"""scripts/repro_cpu.sh, the one-command CPU reproduction, run against stub ``halp-run`` / ``halp``
executables: every preset is launched once, the lanes respect their barriers (a model's first job,
which times its latency table, runs alone), a failed job stops the script before the re-timing, and
a rerun after the fix resumes to the end."""
from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "repro_cpu.sh"

# The stub logs its arguments and writes the first job's record of the preset it is asked to run,
# plus one more job folder: with a record, or without one (a failed job) when FAIL names the preset.
STUB_RUN = r"""#!/usr/bin/env bash
echo "run $*" >> "$CALLS"
preset=$(printf '%s\n' "$@" | sed -n 's#^experiment=repro_cpu/##p')
method=$(printf '%s\n' "$@" | sed -n 's#^method=##p')
first=${method%%,*}
d=runs/repro_cpu/$preset
mkdir -p "$d/${first:-job}-t0.3-s0" "$d/${first:-job}-t0.5-s0"
touch "$d/${first:-job}-t0.3-s0/result.json"
[ "${FAIL:-}" = "$preset" ] || touch "$d/${first:-job}-t0.5-s0/result.json"
"""
STUB_HALP = """#!/usr/bin/env bash
echo "halp $*" >> "$CALLS"
"""

PRESETS = ["main_resnet20", "ablation_solver", "ablation_pricing", "ablation_steps", "ablation_saliency",
           "ablation_grouping", "ablation_flops", "main_mobilenetv2"]


def _stub(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path


def _run(tmp_path: Path, *args: str, fail: str = "") -> subprocess.CompletedProcess:
    env = dict(os.environ, HALP_RUN=str(_stub(tmp_path / "halp-run", STUB_RUN)),
               HALP=str(_stub(tmp_path / "halp", STUB_HALP)), CALLS=str(tmp_path / "calls.log"),
               HALP_REPRO_POLL="0.1", FAIL=fail)
    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=work, env=env, capture_output=True,
                          text=True, timeout=120)


def _calls(tmp_path: Path) -> list[str]:
    return (tmp_path / "calls.log").read_text().splitlines()


@pytest.mark.parametrize("lanes", ["1", "2"])
def test_every_preset_once_then_remeasure_and_report(tmp_path, lanes):
    proc = _run(tmp_path, "--lanes", lanes)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    calls = _calls(tmp_path)
    runs = [c for c in calls if c.startswith("run ")]
    assert len(runs) == 10  # 8 presets; the two main ones split into two method lists
    for preset in PRESETS:
        assert any(f"experiment=repro_cpu/{preset}" in c for c in runs), preset
    # ResNet-20's first job (its table) runs first; with two lanes every ResNet-20 sweep precedes
    # MobileNetV2's first job (its table), which precedes MobileNetV2's EagleEye sweep.
    idx = {c: i for i, c in enumerate(calls)}
    r20_halp = idx["run -m experiment=repro_cpu/main_resnet20 method=halp,taylor,magnitude"]
    r20_ee = idx["run -m experiment=repro_cpu/main_resnet20 method=eagleeye"]
    mb_halp = idx["run -m experiment=repro_cpu/main_mobilenetv2 method=halp,taylor,magnitude"]
    mb_ee = idx["run -m experiment=repro_cpu/main_mobilenetv2 method=eagleeye"]
    assert r20_halp == 0 and mb_halp < mb_ee
    if lanes == "2":  # the other lane waits at both barriers
        assert r20_halp < r20_ee < mb_halp
        assert all(i < mb_halp for c, i in idx.items() if c.startswith("run ") and "mobilenetv2" not in c)
    assert calls[-2:] == ["halp remeasure runs/repro_cpu",
                          "halp report --paper runs/repro_cpu --out results/paper"]


def test_failed_job_stops_before_retiming_and_rerun_resumes(tmp_path):
    proc = _run(tmp_path, "--lanes", "2", "--no-report", fail="ablation_steps")
    assert proc.returncode == 1
    log = (tmp_path / "work" / "runs/repro_cpu/lanes.log").read_text()
    assert "jobs without a record" in log and "ablation_steps/job-t0.5-s0" in log
    assert not any(c.startswith("halp ") for c in _calls(tmp_path))
    proc = _run(tmp_path, "--no-report")  # the stub now succeeds: the rerun goes through
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert _calls(tmp_path)[-1] == "halp remeasure runs/repro_cpu"


def test_bad_arguments_fail_clearly(tmp_path):
    proc = _run(tmp_path, "--lanes", "3")
    assert proc.returncode == 2 and "--lanes must be 1 or 2" in proc.stderr
    proc = subprocess.run(["bash", str(SCRIPT)], cwd=tmp_path, capture_output=True, text=True,
                          env=dict(os.environ, HALP_RUN="no-such-halp-run"))
    assert proc.returncode == 2 and "not found" in proc.stderr


def test_dry_run_prints_the_commands_and_writes_nothing(tmp_path):
    proc = _run(tmp_path, "--dry-run")
    assert proc.returncode == 0
    assert proc.stdout.count("-m experiment=repro_cpu/") == 10
    assert proc.stdout.rstrip().endswith("report --paper runs/repro_cpu --out results/paper")
    assert not (tmp_path / "work" / "runs").exists() and not (tmp_path / "calls.log").exists()
