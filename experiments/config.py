"""The job's typed configuration (the schema Hydra validates every config and override against)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from enum import Enum

from baselines import EagleEyeConfig, MagnitudeConfig, TaylorConfig
from halp.data import DataConfig
from halp.engine import TrainConfig
from halp.latency.backends import Setting
from halp.pruning import PruneConfig

from .tracking import LoggerConfig


class Method(str, Enum):
    """What ``method=`` may name. ``dense`` records the unpruned model (no fine-tuning)."""
    HALP = "halp"
    MAGNITUDE = "magnitude"
    TAYLOR = "taylor"
    EAGLEEYE = "eagleeye"
    DENSE = "dense"


LABELS = {Method.HALP: "HALP", Method.MAGNITUDE: "Magnitude", Method.TAYLOR: "Taylor",
          Method.EAGLEEYE: "EagleEye", Method.DENSE: "dense"}


@dataclass
class ModelConfig:
    name: str = "halp:resnet20"
    width: float = 1.0  # width multiplier, halp: models only


@dataclass
class LatencyConfig(Setting):
    """The deployment setting (backend, batch, threads, ...) plus how to get its table."""

    batch: int = 32
    step: int = 8
    rounds: int = 5
    overhead: str = "anchors"
    table: str | None = None  # an existing table file; default: build or reuse one in the cache
    allow_mismatch: bool = False

    def setting(self) -> Setting:
        return Setting(**{f.name: getattr(self, f.name) for f in dataclasses.fields(Setting)})


@dataclass
class JobConfig:
    method: str = "halp"
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    dense: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=3, lr=0.1, warmup_epochs=0.2))
    finetune: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=2, lr=0.02))
    prune: PruneConfig = field(default_factory=lambda: PruneConfig(target=0.5, interval=20, steps=10))
    latency: LatencyConfig = field(default_factory=LatencyConfig)
    magnitude: MagnitudeConfig = field(default_factory=MagnitudeConfig)
    taylor: TaylorConfig = field(default_factory=TaylorConfig)
    eagleeye: EagleEyeConfig = field(default_factory=EagleEyeConfig)
    logger: LoggerConfig = field(default_factory=lambda: LoggerConfig(backend="none"))
    dist_backend: str = "auto"  # auto | gloo | nccl: for jobs started as several processes
    cache_dir: str = ".halp-cache"
    progress: bool = True
    measure_rounds: int = 9

    def __post_init__(self) -> None:
        method_of(self)
        if self.dist_backend not in ("auto", "gloo", "nccl"):
            raise ValueError(f"dist_backend must be auto, gloo or nccl, got {self.dist_backend!r}")


def method_of(cfg: JobConfig) -> Method:
    try:
        return Method(cfg.method)
    except ValueError:
        raise ValueError(f"unknown method {cfg.method!r}; choose one of "
                         f"{', '.join(m.value for m in Method)}") from None
