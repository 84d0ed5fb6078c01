"""The main job as a Hydra app: ``halp-run`` (or ``python -m experiments.run``).

    halp-run                                   # defaults: CPU, Fashion-MNIST, ResNet-20, 50 % latency
    halp-run prune.target=0.3 seed=1           # any field of the config (halp-run --cfg job shows them)
    halp-run method=taylor                     # a baseline, same budget and everything else
    halp-run -m method=halp,taylor,eagleeye,magnitude prune.target=0.3,0.5,0.7 seed=0,1,2
    halp-run experiment=resnet50_imagenet_halp55 data.root=/data/imagenet   # a paper preset
"""
from __future__ import annotations

import logging
import sys

import hydra
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from experiments.job import JobConfig, format_result, run_job

log = logging.getLogger("experiments.run")


class NotFileOnly(logging.Filter):
    """Keeps records marked ``file_only`` off the console (conf/hydra/job_logging/halp.yaml)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(record, "file_only", False)


ConfigStore.instance().store(name="job_schema", node=JobConfig)
if not OmegaConf.has_resolver("slug"):
    OmegaConf.register_new_resolver("slug", lambda s: str(s).replace(":", "_").replace("/", "_"))
if not OmegaConf.has_resolver("idiv"):  # ${idiv:200,${prune.steps}}: a fixed window split into steps
    OmegaConf.register_new_resolver("idiv", lambda a, b: int(a) // int(b))

# Errors a user can fix: one line, no traceback.
USER_ERRORS = (ValueError, FileNotFoundError, FloatingPointError, NotImplementedError, PermissionError,
               NotADirectoryError, TimeoutError)


@hydra.main(version_base=None, config_path="conf", config_name="main")
def main(cfg: DictConfig) -> None:
    hc = HydraConfig.get()
    try:
        job: JobConfig = OmegaConf.to_object(cfg)
        result = run_job(job, hc.runtime.output_dir)
    except USER_ERRORS as e:
        log.error("halp-run: error: %s", e, extra={"file_only": True})  # stderr has it already
        print(f"halp-run: error: {e}", file=sys.stderr)
        if hc.mode == RunMode.MULTIRUN:  # fail this job of the sweep, not the whole sweep
            raise RuntimeError(f"{hc.runtime.output_dir}: {e}") from None
        sys.exit(2)
    if result is None:  # not rank 0 of a multi-process job
        return
    log.info("result\n%s", format_result(result))
    log.info(f"result: {hc.runtime.output_dir}/result.json")


if __name__ == "__main__":
    main()
