"""The local single-node Slurm cluster (slurm/cluster.sh) for tests.

Not a test file: tests import it.

    from slurm_cluster import slurm_cluster   # session fixture -> dict of env vars

    @pytest.mark.slurm
    def test_x(slurm_cluster, monkeypatch):
        for k, v in slurm_cluster.items():
            monkeypatch.setenv(k, v)
        ...

`ensure_cluster()` uses a cluster that is already running in the state directory
($HALP_SLURM_DIR, default /tmp/halp-slurm) and leaves it running; otherwise it installs the
Debian packages if missing and starts one, which the `slurm_cluster` fixture stops at the end
of the session. When that cannot be done (not root, no apt-get, the start fails) it calls
pytest.skip with the reason.
"""
from __future__ import annotations

import atexit
import os
import shlex
import shutil
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "slurm" / "cluster.sh"

# Per-process state: the env of the cluster in use, and whether this process started it.
_state: dict = {"env": None, "started_here": False, "skip": None}


def _run(cmd: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), cmd], capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def _tail(text: str, n: int = 8) -> str:
    return " | ".join(text.strip().splitlines()[-n:])


def _parse_env(text: str) -> dict:
    """`export K=V` lines (V shell-quoted) -> {K: V}."""
    env = {}
    for line in text.splitlines():
        words = shlex.split(line)
        if len(words) == 2 and words[0] == "export" and "=" in words[1]:
            key, _, value = words[1].partition("=")
            env[key] = value
    return env


def _skip(reason: str):
    _state["skip"] = reason
    pytest.skip(reason)


def ensure_cluster() -> dict:
    """Env vars for clients of a running local cluster: SLURM_CONF, HALP_SLURM_DIR and
    HALP_SLURM_PARTITION. Starts the cluster (once per process) when none runs; skips the
    calling test when it cannot."""
    if _state["env"] is not None:
        return dict(_state["env"])
    if _state["skip"] is not None:
        pytest.skip(_state["skip"])
    if not SCRIPT.is_file():
        _skip(f"{SCRIPT} is missing")
    if os.name != "posix" or os.geteuid() != 0:
        _skip("the local Slurm cluster runs its daemons as root: run the tests as root "
              "(or start it yourself: see slurm/README.md)")

    status = _run("status", timeout=60)
    if status.returncode != 0:  # not (fully) running: install if needed, then start
        if shutil.which("slurmctld", path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin") is None \
                and shutil.which("apt-get") is None:
            _skip("Slurm is not installed and there is no apt-get to install it")
        install = _run("install", timeout=1200)
        if install.returncode != 0:
            _skip(f"could not install Slurm: {_tail(install.stderr)}")
        start = _run("start", timeout=600)
        if start.returncode != 0:
            _skip(f"could not start the local Slurm cluster: {_tail(start.stderr, 25)}")
        _state["started_here"] = "already running" not in start.stderr
        if _state["started_here"]:
            atexit.register(stop_cluster)  # safety net; the fixture stops it first

    out = _run("env", timeout=60)
    env = _parse_env(out.stdout)
    if out.returncode != 0 or "SLURM_CONF" not in env:
        _skip(f"the local Slurm cluster gave no env: {_tail(out.stderr)}")
    _state["env"] = env
    return dict(env)


def stop_cluster() -> None:
    """Stop the cluster if (and only if) this process started it."""
    if _state["started_here"]:
        _state["started_here"] = False
        _state["env"] = None
        _run("stop", timeout=300)


@pytest.fixture(scope="session")
def slurm_cluster():
    """Session fixture: env vars (dict) of the running local cluster. Starts it once if needed and
    stops it after the session only if this session started it."""
    env = ensure_cluster()
    try:
        yield env
    finally:
        stop_cluster()


def wait_until(predicate, what: str, deadline_s: float = 120, interval: float = 0.5) -> None:
    """Poll ``predicate`` until it is true; fail the test after ``deadline_s`` (a hang, not a
    timing check: nothing asserts how long anything took)."""
    end = time.monotonic() + deadline_s
    while not predicate():
        if time.monotonic() > end:
            pytest.fail(f"gave up after {deadline_s:.0f} s waiting for {what}")
        time.sleep(interval)
