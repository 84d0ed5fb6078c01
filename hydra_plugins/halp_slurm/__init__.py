"""Hydra launcher plugin: submitit's Slurm launcher with a pre-flight check.

(Hydra accepts launchers only from its ``hydra_plugins`` namespace package, hence this place.)

Without it, a sweep sent to a machine with no Slurm (or with Slurm but no controller answering)
ends in a submitit traceback. :class:`SlurmLauncher` checks before submitting anything that the
client commands exist, that the controller answers, and that the partition is there, and stops
with one line saying what to do. Selected by ``_target_`` in ``conf/hydra/launcher/slurm*.yaml``.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from typing import Any, Sequence

from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher as _SubmititSlurm

LOCAL_HINT = ("for the local test cluster: `bash slurm/cluster.sh install && bash slurm/cluster.sh start`, "
              "then `source /tmp/halp-slurm/env.sh`; or run the sweep here with hydra/launcher=local")


class SlurmUnavailable(RuntimeError):
    """Slurm cannot take jobs from this machine (the message says why and what to do)."""


def _path() -> str:
    # Debian puts some Slurm and munge tools in sbin, often missing from a user's PATH
    return os.environ.get("PATH", os.defpath) + ":/usr/sbin:/sbin"


def check_slurm(partition: str | None, timeout_s: float = 20.0) -> None:
    """Raise :class:`SlurmUnavailable` unless sbatch/srun exist, the controller answers and
    ``partition`` (if given) is one of its partitions."""
    missing = [c for c in ("sbatch", "srun", "sinfo") if shutil.which(c, path=_path()) is None]
    if missing:
        raise SlurmUnavailable(f"this launcher submits to Slurm, but {', '.join(missing)} "
                               f"{'is' if len(missing) == 1 else 'are'} not installed here; {LOCAL_HINT}")
    sinfo = shutil.which("sinfo", path=_path())
    try:
        out = subprocess.run([sinfo, "-h", "-o", "%R"], capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise SlurmUnavailable(f"the Slurm controller did not answer within {timeout_s:.0f} s "
                               f"(SLURM_CONF={os.environ.get('SLURM_CONF', 'unset')}); {LOCAL_HINT}") from None
    if out.returncode != 0:
        why = (out.stderr.strip().splitlines() or ["no output"])[-1]
        raise SlurmUnavailable(f"Slurm is installed but its controller does not answer ({why}; "
                               f"SLURM_CONF={os.environ.get('SLURM_CONF', 'unset')}); {LOCAL_HINT}")
    parts = sorted({p.strip() for p in out.stdout.split()})
    if partition and partition not in parts:
        raise SlurmUnavailable(f"partition {partition!r} does not exist on this cluster (it has: "
                               f"{', '.join(parts) or 'none'}); set hydra.launcher.partition=...")


class SlurmLauncher(_SubmititSlurm):
    """submitit's Slurm launcher, refusing with a clear message when Slurm cannot take the jobs."""

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Any:
        try:
            check_slurm(self.params.get("partition"))
        except SlurmUnavailable as e:
            print(f"halp-run: error: {e}", file=sys.stderr)
            sys.exit(2)  # SystemExit: Hydra prints no traceback
        return super().launch(job_overrides, initial_job_idx)
