"""The architecture holds: import contracts (``lint-imports``, contracts in pyproject.toml) pass on
this tree and catch a library module that imports the suite."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or shutil.which("lint-imports")


def lint(root: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([LINT, "--no-cache"], cwd=root, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def linter():
    if LINT is None:
        pytest.skip("lint-imports is not installed (it comes with the dev extras: bash scripts/bootstrap.sh install)")
    return LINT


def test_import_contracts_hold(linter):
    out = lint(ROOT)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert "Contracts: 4 kept, 0 broken." in out.stdout, out.stdout[-2000:]


def test_a_library_module_importing_the_suite_breaks_the_contracts(linter, tmp_path):
    for part in ("halp", "baselines", "experiments"):
        shutil.copytree(ROOT / part, tmp_path / part, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    solver = tmp_path / "halp" / "solver.py"
    solver.write_text(solver.read_text() + "\nfrom experiments import report  # noqa: E402,F401\n")
    out = lint(tmp_path)
    assert out.returncode != 0
    assert "The library imports neither the suite nor the baselines BROKEN" in out.stdout, out.stdout[-3000:]
    assert "halp.solver -> experiments.report" in out.stdout, out.stdout[-3000:]
