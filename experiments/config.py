"""The job's typed configuration (the schema Hydra validates every config and override against).

The pruning method is a config node of its own (``method/<name>.yaml``: ``name`` plus that
method's settings only), validated against the settings dataclass the method registered with
:func:`halp.pruners.register_pruner`. A method that lives outside this repository names the module
that registers it in ``method.module``; the job imports it before validating.
"""
from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass, field
from typing import Any, Mapping

import baselines  # noqa: F401  (registers magnitude, taylor and eagleeye)
from halp.latency.backends import Setting
from halp.latency.cost import COUT_MODES, OVERHEAD_MODES
from halp.latency.refine import Refinement
from halp.pruners import PruneConfig, method_config, pruner_names

from .data import DataConfig
from .engine import TrainConfig
from .runtime import RuntimeConfig
from .tracking import LoggerConfig

DENSE = "dense"  # not a pruner: records the unpruned model, measured like the others


@dataclass
class DenseConfig(TrainConfig):
    """The dense model's training recipe, or ``checkpoint``: a local state dict (torchvision's or
    timm's published files, a ``dense/*.pt`` of this project, a DDP ``module.`` prefix) that is
    loaded instead of training. Nothing is downloaded."""

    checkpoint: str | None = None


@dataclass
class ModelConfig:
    name: str = "halp:resnet20"
    width: float = 1.0  # width multiplier, halp: models only


@dataclass
class LatencyConfig(Setting):
    """The deployment setting (backend, batch, threads, ...) plus how to get its table, how the
    cost model prices with it (``overhead``, ``conv_only``, ``two_sided``, ``cout_mode``: see
    :meth:`halp.latency.cost.CostModel.create`) and which resource the budget constrains
    (``cost``: the table's latency, or MACs for the FLOPs-aware ablation)."""

    batch: int = 32
    step: int = 8
    rounds: int = 5
    refine: bool = True        # coarse lattice refined where latency bends, the rest interpolated (False: every point)
    refine_tol: float = 0.03   # a cell is accepted when interpolation predicts its midpoints this well
    refine_budget: float = 0.3  # measure at most this fraction of the reachable points
    time_limit_s: float = 3600.0  # a table build's wall-time bound (past it: refinement stops, rest interpolated)
    cost: str = "latency"      # the constrained resource: latency (the table's) | macs (FLOPs-aware)
    overhead: str = "anchors"
    conv_only: bool = False
    two_sided: bool = True     # price every latency a chunk changes (False: writers only, the paper's eq.)
    cout_mode: str = "ceil"
    remeasure_anchors: bool = False  # measure the table's end-to-end anchors again instead of reusing them
    table: str | None = None  # an existing table file; default: build or reuse one in the cache
    allow_mismatch: bool = False
    # measured feedback (halp.latency.feedback): HALP's last step times the network it chose against
    # the dense one on this machine and re-solves until the measurement is within
    # feedback_tolerance below the target (at most feedback_rounds timings). Only right when this
    # machine is the deployment device; off here = the paper's open loop (the device presets set it)
    feedback: bool = False
    feedback_tolerance: float = 0.02
    feedback_rounds: int = 8

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.overhead not in OVERHEAD_MODES:
            raise ValueError(f"latency.overhead must be one of {', '.join(OVERHEAD_MODES)}, got {self.overhead!r}")
        if self.cost not in ("latency", "macs"):
            raise ValueError(f"latency.cost must be 'latency' or 'macs', got {self.cost!r}")
        if self.cout_mode not in COUT_MODES:
            raise ValueError(f"latency.cout_mode must be one of {', '.join(COUT_MODES)}, got {self.cout_mode!r}")
        if self.time_limit_s <= 0:
            raise ValueError(f"latency.time_limit_s must be positive seconds, got {self.time_limit_s}")
        self.refinement()  # validates refine_tol and refine_budget
        if not 0 < self.feedback_tolerance < 1:
            raise ValueError(f"latency.feedback_tolerance must be in (0, 1), got {self.feedback_tolerance}")
        if self.feedback_rounds < 1:
            raise ValueError(f"latency.feedback_rounds must be >= 1, got {self.feedback_rounds}")

    def refinement(self) -> Refinement:
        """How the table build samples its grid (:mod:`halp.latency.refine`)."""
        if not self.refine:
            return Refinement.off()
        try:
            return Refinement(tol=self.refine_tol, budget=self.refine_budget)
        except ValueError as e:
            raise ValueError(f"latency.{e}".replace("refine ", "refine_", 1)) from None

    def setting(self) -> Setting:
        return Setting(**{f.name: getattr(self, f.name) for f in dataclasses.fields(Setting)})

    def cost_options(self) -> dict[str, Any]:
        """Keyword arguments of :meth:`halp.latency.cost.CostModel.create`."""
        return {"overhead": self.overhead, "conv_only": self.conv_only, "two_sided": self.two_sided,
                "cout_mode": self.cout_mode}


def method_choices() -> list[str]:
    return [*pruner_names(), DENSE]


def resolve_method(method: Any) -> tuple[str, Any]:
    """(name, settings) of a ``method`` config node: a name, a mapping with ``name`` (and
    optionally ``module``, the Python module that registers the method) plus the method's
    settings, or a registered settings dataclass. Settings are ``None`` for ``dense``."""
    if isinstance(method, str):
        method = {"name": method}
    elif dataclasses.is_dataclass(method) and not isinstance(method, type):
        name = next((n for n in pruner_names() if isinstance(method, type(method_config(n)))), None)
        if name is None:
            raise ValueError(f"{type(method).__name__} is not the settings class of a registered method")
        return name, method
    if not isinstance(method, Mapping) or not method.get("name"):
        raise ValueError(f"method must be a method name or a mapping with a 'name', got {method!r}")
    settings = {k: v for k, v in method.items() if k not in ("name", "module")}
    name, module = str(method["name"]), method.get("module")
    if module:
        try:
            importlib.import_module(str(module))
        except ImportError as e:
            raise ValueError(f"method {name!r}: cannot import its module {module!r} ({e})") from None
    if name == DENSE:
        if settings:
            raise ValueError(f"method 'dense' takes no settings, got {', '.join(sorted(settings))}")
        return name, None
    if name not in pruner_names():
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(method_choices())}")
    return name, method_config(name, settings)


@dataclass
class JobConfig:
    """One job: one method at one latency target. ``method`` is the ``method/`` config group's
    node (see :func:`resolve_method`); after construction ``method_name`` and ``method_cfg`` hold
    its parsed form."""

    method: Any = field(default_factory=lambda: {"name": "halp"})
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: RuntimeConfig = field(default_factory=RuntimeConfig)
    dense: DenseConfig = field(default_factory=lambda: DenseConfig(epochs=3, lr=0.1, warmup_epochs=0.2))
    finetune: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=2, lr=0.02))
    prune: PruneConfig = field(default_factory=lambda: PruneConfig(target=0.5, interval=20, steps=10))
    latency: LatencyConfig = field(default_factory=LatencyConfig)
    logger: LoggerConfig = field(default_factory=lambda: LoggerConfig(backend="none"))
    dist_backend: str = "auto"  # auto | gloo | nccl: for jobs started as several processes
    cache_dir: str = ".halp-cache"
    progress: bool = True
    measure_rounds: int = 9
    measure_repeats: int = 3  # interleaved runs of the final dense/slim timing; the median-ratio run is kept

    def __post_init__(self) -> None:
        if not isinstance(self.dense, DenseConfig):  # a plain TrainConfig (or mapping) from Python callers
            self.dense = DenseConfig(**(dataclasses.asdict(self.dense) if dataclasses.is_dataclass(self.dense)
                                        else dict(self.dense)))
        self.method_name, self.method_cfg = resolve_method(self.method)
        # the record keeps the node in one shape: name, module (if any), every setting
        node = {"name": self.method_name}
        if isinstance(self.method, Mapping) and self.method.get("module"):
            node["module"] = str(self.method["module"])
        if self.method_cfg is not None:
            node.update(dataclasses.asdict(self.method_cfg))
        self.method = node
        if self.measure_rounds < 1 or self.measure_repeats < 1:
            raise ValueError(f"measure_rounds and measure_repeats must be >= 1, got {self.measure_rounds} and "
                             f"{self.measure_repeats}")
        if self.dist_backend not in ("auto", "gloo", "nccl"):
            raise ValueError(f"dist_backend must be auto, gloo or nccl, got {self.dist_backend!r}")
        if self.dist_backend == "nccl" and self.trainer.device == "cpu":
            raise ValueError("dist_backend=nccl needs trainer.device=cuda (NCCL carries only CUDA tensors); "
                             "use gloo or auto on the CPU")


# keys of records written before the method became a config node of its own (git 17fce40 and older)
_OLD_METHOD_KEYS = ("magnitude", "taylor", "eagleeye")
_OLD_HALP_KEYS = ("solver", "saliency", "max_resolve")
_OLD_DATA_KEYS = ("batch_size", "eval_batch_size", "workers")


def upgrade_record_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The ``config`` of a ``result.json`` in today's layout. Records written before the method
    registry kept every baseline's settings beside ``method: <name>``, HALP's knobs under
    ``prune`` and unused loader keys under ``data``; records written before ``trainer.*`` kept a
    CPU-only ``amp`` flag per training phase. Those are moved or dropped."""
    cfg = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in config.items()}
    if isinstance(cfg.get("method"), str):
        name = cfg["method"]
        node: dict[str, Any] = {"name": name}
        if name in _OLD_METHOD_KEYS:
            node.update(cfg.get(name) or {})
        prune = cfg.get("prune") or {}
        if name == "halp":
            node.update({k: prune[k] for k in _OLD_HALP_KEYS if k in prune})
        cfg["method"] = node
    for key in _OLD_METHOD_KEYS:
        cfg.pop(key, None)
    for key in _OLD_HALP_KEYS:
        (cfg.get("prune") or {}).pop(key, None)
    for key in _OLD_DATA_KEYS:
        (cfg.get("data") or {}).pop(key, None)
    if isinstance(cfg.get("data"), dict):  # fields added later, at the values every older run had
        defaults = DataConfig()
        for key in DataConfig.VOC_KEYS:
            cfg["data"].setdefault(key, list(v) if isinstance(v := getattr(defaults, key), tuple) else v)
    # before trainer.* existed, dense.amp / finetune.amp (bool) meant bfloat16 autocast on the CPU
    amp = [bool((cfg.get(phase) or {}).pop("amp")) for phase in ("dense", "finetune") if "amp" in (cfg.get(phase) or {})]
    if amp and "trainer" not in cfg:
        cfg["trainer"] = {"device": "cpu", "amp": "bf16" if any(amp) else "off"}
    return cfg


def config_of_record(config: Mapping[str, Any]) -> JobConfig:
    """The typed config of a record's ``config`` (any layout :func:`upgrade_record_config` reads).
    Keys newer than the record take their defaults: a new setting's default keeps the behaviour
    that existed before it, so the record still describes the same job."""
    from omegaconf import OmegaConf

    merged = OmegaConf.merge(OmegaConf.structured(JobConfig), upgrade_record_config(config))
    return OmegaConf.to_object(merged)
