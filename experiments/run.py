"""The main job as a Hydra app: ``halp-run`` (or ``python -m experiments.run``).

    halp-run                                   # defaults: CPU, Fashion-MNIST, ResNet-20, 50 % latency
    halp-run prune.target=0.3 seed=1     # any field of the config (halp-run --cfg job shows them)
    halp-run +preset=resnet50_imagenet data.root=/data/imagenet   # the paper's ResNet-50 schedule
"""
from __future__ import annotations

import sys

import hydra
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from experiments.job import JobConfig, format_result, run_job

ConfigStore.instance().store(name="job_schema", node=JobConfig)
if not OmegaConf.has_resolver("slug"):
    OmegaConf.register_new_resolver("slug", lambda s: str(s).replace(":", "_").replace("/", "_"))

# Errors a user can fix: one line, no traceback.
USER_ERRORS = (ValueError, FileNotFoundError, FloatingPointError, NotImplementedError)


@hydra.main(version_base=None, config_path="conf", config_name="main")
def main(cfg: DictConfig) -> None:
    try:
        job: JobConfig = OmegaConf.to_object(cfg)
        result = run_job(job, HydraConfig.get().runtime.output_dir)
    except USER_ERRORS as e:
        print(f"halp-run: error: {e}", file=sys.stderr)
        sys.exit(2)
    print(format_result(result))
    print(f"result: {HydraConfig.get().runtime.output_dir}/result.json")


if __name__ == "__main__":
    main()
