"""Toy jobs for the tests that launch ``halp-run`` (sweeps, Slurm, preemption, DDP).

Not a test file: tests import it. A toy job trains a small ResNet-20 on synthetic images and
prices channels with a deterministic synthetic latency table, so that feasibility and pruning
decisions never depend on how busy the machine is. Latency is still *measured* at the end.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from conftest import synthetic_table

ROOT = Path(__file__).resolve().parents[1]
# the tests' own config groups (schedule=toy and the baselines' scale for it), added to Hydra's path
TEST_CONF = Path(__file__).resolve().parent / "conf"


def lin(spec, ci, co):
    """Latency of a unit: proportional to its MACs per pixel, plus a constant."""
    return 0.01 * ci * co * spec.kernel[0] * spec.kernel[1] / 9 + 0.05


def toy_table(folder: Path, name: str = "halp:resnet20", width: float = 0.5,
              shape: tuple[int, int, int] = (1, 12, 12)) -> str:
    """Write (once) a synthetic latency table for ``name`` at ``width`` and input ``shape``."""
    from halp.graph import ChannelGraph
    from halp.models import create_model

    path = Path(folder) / f"toy-{name.replace(':', '_')}-w{width}-{'x'.join(map(str, shape))}.json"
    if not path.exists():
        model = create_model(name, num_classes=4, in_chans=shape[0], width=width)
        table = synthetic_table(ChannelGraph.build(model, shape), lin, step=4)
        table.meta["model"] = name
        table.save(path)
    return str(path)


def overrides(folder: Path, *, width: float = 0.5, shape: tuple[int, int, int] = (1, 12, 12),
              samples: int = 192, batch: int = 32, dense_epochs: float = 1, finetune_epochs: float = 2,
              interval: int = 2, steps: int = 3) -> list[str]:
    """Hydra overrides for a toy job whose cache (dense model) lives in ``folder/cache``."""
    table = toy_table(folder, width=width, shape=shape)
    return [
        "model.name=halp:resnet20", f"model.width={width}",
        "data.name=synthetic", f"data.synthetic_shape=[{','.join(map(str, shape))}]",
        f"data.synthetic_samples={samples}", "data.synthetic_classes=4",
        f"dense.epochs={dense_epochs}", f"dense.batch_size={batch}", "dense.threads=1",
        f"finetune.epochs={finetune_epochs}", f"finetune.batch_size={batch}", "finetune.threads=1",
        f"prune.interval={interval}", f"prune.steps={steps}", "prune.chunk=4",
        f"latency.table={table}", "latency.allow_mismatch=true", "latency.overhead=none", "latency.batch=2",
        "latency.feedback=false",  # measured feedback would make decisions depend on the machine's load
        f"hydra.searchpath=[file://{TEST_CONF}]", "schedule=toy",
        f"cache_dir={Path(folder) / 'cache'}", "progress=false", "measure_rounds=3",
    ]


def halp_run(*args: str, cwd: Path, env: dict | None = None, timeout: float = 900,
             popen: bool = False) -> subprocess.CompletedProcess | subprocess.Popen:
    """``halp-run ARGS`` in ``cwd`` with this interpreter (finished, or running with ``popen``)."""
    cmd = [sys.executable, "-m", "experiments.run", *args]
    env = {**os.environ, **(env or {})}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    if popen:
        return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def run_together(script: str, *args: str, n: int = 2, timeout: float = 600) -> list[tuple[str, str]]:
    """Run ``python -c script ARGS`` in ``n`` processes at once (jobs of a sweep racing for the
    same cache); asserts they all succeed and returns each one's (stdout, stderr)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", script, *args], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for _ in range(n)]
    outs = [p.communicate(timeout=timeout) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    return outs


def compose(*args: str):
    """The JobConfig ``halp-run ARGS`` would run (Hydra's compose API, in this process)."""
    from hydra import compose as _compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    import experiments.run  # noqa: F401  (registers the schema and resolvers)

    conf = Path(experiments.run.__file__).resolve().parent / "conf"
    with initialize_config_dir(str(conf), version_base=None):
        return OmegaConf.to_object(_compose("main", overrides=list(args)))
