"""Experiment tracking: a thin, failure-proof mirror of our results into Weights & Biases.

Our own ``result.json`` is the source of truth; W&B is a convenience mirror. Hence every W&B call
is guarded: a W&B failure logs one warning and turns the tracker into a no-op, never killing a job.
``wandb`` is imported lazily so that importing this module (and disabled tracking) stays cheap.

Offline runs land in ``DIR/wandb/offline-run-*/run-<id>.wandb`` (``wandb sync DIR/wandb/offline-run-*``
uploads them later); the tests read them back with ``tests/wandb_offline.py``.
"""
from __future__ import annotations

import json
import logging
import netrc
import numbers
import os
import secrets
import string
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

log = logging.getLogger(__name__)

BACKENDS = ("wandb", "none")
MODES = ("offline", "online", "disabled")
ID_FILE = "wandb_id.txt"


@dataclass
class LoggerConfig:
    """Tracking options (a valid Hydra/OmegaConf structured config: primitives, lists, Optional)."""

    backend: str = "wandb"  # wandb | none
    mode: str = "offline"  # offline | online | disabled; online needs `wandb login` or WANDB_API_KEY
    project: str = "halp"
    entity: str | None = None
    group: str | None = None
    tags: list[str] = field(default_factory=list)
    dir: str | None = None  # parent of the `wandb/` folder; None = the run directory

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"LoggerConfig.backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.mode not in MODES:
            raise ValueError(f"LoggerConfig.mode must be one of {MODES}, got {self.mode!r}")
        if not isinstance(self.project, str) or not self.project.strip():
            raise ValueError(f"LoggerConfig.project must be a non-empty string, got {self.project!r}")
        for name in ("entity", "group", "dir"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise ValueError(f"LoggerConfig.{name} must be None or a non-empty string, got {value!r}")
        if isinstance(self.tags, str) or not all(isinstance(t, str) and t for t in self.tags):
            raise ValueError(f"LoggerConfig.tags must be a list of non-empty strings, got {self.tags!r}")
        self.tags = list(self.tags)  # OmegaConf hands over a ListConfig

    @classmethod
    def coerce(cls, cfg: Any) -> LoggerConfig:
        """Accept a LoggerConfig, a mapping, or an attribute object such as a Hydra DictConfig."""
        if isinstance(cfg, cls):
            return cfg
        get = cfg.get if isinstance(cfg, Mapping) else lambda k, d: getattr(cfg, k, d)
        missing = object()
        kw = {f.name: v for f in fields(cls) if (v := get(f.name, missing)) is not missing}
        if "tags" in kw and kw["tags"] is not None and not isinstance(kw["tags"], str):
            kw["tags"] = list(kw["tags"])
        return cls(**kw)


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten nested mappings into ``a/b/c`` keys (W&B's UI groups panels by the '/' prefix)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "/"))
        else:
            out[key] = v
    return out


def _scalar(v: Any) -> bool | int | float | str | None:
    """A plain Python scalar for numeric/str leaves (numpy scalars included), else None."""
    if isinstance(v, (bool, str)):
        return v
    if isinstance(v, numbers.Integral):
        return int(v)
    if isinstance(v, numbers.Real):
        return float(v)
    return None


def _plain(config: Any) -> dict[str, Any]:
    """A plain dict for wandb.init (Hydra hands over DictConfigs)."""
    if type(config).__module__.startswith("omegaconf"):
        from omegaconf import OmegaConf

        return OmegaConf.to_container(config, resolve=True)  # type: ignore[return-value]
    return dict(config or {})


def _has_credentials() -> bool:
    """Whether online mode could authenticate without prompting (env key, token file or netrc)."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    path = Path(os.environ.get("NETRC", "~/.netrc")).expanduser()
    try:
        return path.is_file() and netrc.netrc(str(path)).authenticators(host or "") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def _run_id(run_dir: Path, resume_id: str | None) -> str:
    """The W&B run id for this run directory, created once and kept across preemptions."""
    path = run_dir / ID_FILE
    run_id = resume_id or (path.read_text().strip() if path.is_file() else "")
    if not run_id:
        # Lowercase alphanumerics: valid W&B ids and safe inside file names.
        run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(12))
    if not path.is_file() or path.read_text().strip() != run_id:
        tmp = path.with_name(f".{ID_FILE}.{os.getpid()}.tmp")
        tmp.write_text(run_id + "\n")
        os.replace(tmp, path)  # atomic: a preempted job never leaves a half-written id
    return run_id


PRUNE_LOG_COLUMNS = ("step", "iteration", "target_ms", "predicted_ms", "removed", "widths")


def result_row(result: Mapping[str, Any]) -> dict[str, Any]:
    """One run as one table row: what the paper's tables show, from the job's record. ``quality``
    is the headline metric (``metric``: top-1, or a detector's mAP@0.5)."""
    metric = result.get("metric", "top1")
    dense, pruned = result.get("dense") or {}, result.get("pruned") or {}
    return {"method": result.get("method"), "model": result.get("model"), "dataset": result.get("dataset"),
            "seed": result.get("seed"), "target": result.get("target_ratio"), "metric": metric,
            "dense_quality": dense.get(metric), "quality": pruned.get(metric),
            "dense_ms": dense.get("latency_ms"), "latency_ms": pruned.get("latency_ms"),
            "speedup": result.get("speedup"), "latency_vs_target": result.get("latency_vs_target"),
            "predicted_ms": pruned.get("predicted_ms"), "macs": pruned.get("macs"), "params": pruned.get("params"),
            "git_commit": result.get("git_commit")}


class Tracker:
    """A W&B run (or a no-op). Use :meth:`start`; usable as a context manager."""

    def __init__(self, run: Any = None, run_id: str | None = None) -> None:
        self._run = run
        self.run_id = run_id

    @property
    def active(self) -> bool:
        """True while W&B receives data (False for no-op trackers and after a failure)."""
        return self._run is not None

    @classmethod
    def start(cls, cfg: LoggerConfig, run_dir: Path, name: str, config: dict, rank: int = 0,
              resume_id: str | None = None) -> Tracker:
        """Start (or resume, via ``run_dir/wandb_id.txt``) the W&B run of ``run_dir``.

        Ranks other than 0, ``backend="none"`` and ``mode="disabled"`` get a no-op tracker that
        touches neither the disk nor ``wandb``.
        """
        cfg = LoggerConfig.coerce(cfg)
        if rank != 0 or cfg.backend == "none" or cfg.mode == "disabled":
            return cls()
        run_dir = Path(run_dir)
        mode = cfg.mode
        if mode == "online" and not _has_credentials():
            log.warning("W&B mode=online but no API key/login found; logging offline instead "
                        "(`wandb sync` the run later)")
            mode = "offline"
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            run_id = _run_id(run_dir, resume_id)
            parent = Path(cfg.dir) if cfg.dir else run_dir
            parent.mkdir(parents=True, exist_ok=True)
            os.environ.setdefault("WANDB_SILENT", "true")  # read at import time by some code paths
            import wandb

            settings = wandb.Settings(
                silent=True,  # no banner/progress lines in job logs
                console="off",  # don't wrap stdout/stderr: Hydra/submitit own the job logs
                save_code=False, disable_code=True, disable_git=True,  # runs are tied to our git log
                disable_job_creation=True,  # no W&B Launch job artifacts
                init_timeout=120.0,  # fail (into a no-op) rather than hang a job on a dead network
            )
            run = wandb.init(
                project=cfg.project, entity=cfg.entity, group=cfg.group, tags=list(cfg.tags) or None,
                name=name, id=run_id, resume="allow", config=_plain(config), dir=str(parent),
                mode=mode,  # explicit, so WANDB_MODE in the environment cannot override the config
                reinit="finish_previous", settings=settings,
            )
        except Exception as e:  # noqa: BLE001 - any W&B failure must leave training running
            log.warning("W&B init failed (%s: %s); tracking disabled for this run", type(e).__name__, e)
            return cls()
        return cls(run, run_id)

    def _guard(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> None:
        if self._run is None:
            return
        try:
            fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001
            log.warning("W&B %s failed (%s: %s); tracking disabled from now on", what, type(e).__name__, e)
            run, self._run = self._run, None
            try:
                run.finish(exit_code=1)
            except Exception:  # noqa: BLE001 - already warned once
                pass

    def log(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """Log a history row; nested dicts become '/'-separated keys."""
        self._guard("log", lambda: self._run.log(flatten(metrics), step=step))

    def summary(self, result: Mapping[str, Any]) -> None:
        """Copy numeric/str leaves of ``result`` (flattened with '/') into the run summary."""
        items = {k: s for k, v in flatten(result).items() if (s := _scalar(v)) is not None}
        self._guard("summary", lambda: self._run.summary.update(items))

    def tables(self, result: Mapping[str, Any]) -> None:
        """Log the run's result row (``result/row``) and its per-step pruning log
        (``result/prune_log``) as ``wandb.Table``s: a W&B workspace (or report) can then join
        runs into the paper's tables. ``result`` is the job's record."""
        def log() -> None:
            import wandb

            row = result_row(result)
            steps = [[e.get("step"), e.get("iteration"), e.get("target_ms"), e.get("predicted_ms"),
                      e.get("removed"), json.dumps(e.get("widths") or {}, sort_keys=True)]
                     for e in result.get("prune_log") or []]
            self._run.log({"result/row": wandb.Table(columns=list(row), data=[list(row.values())]),
                           "result/prune_log": wandb.Table(columns=list(PRUNE_LOG_COLUMNS), data=steps)})

        self._guard("tables", log)

    def media(self, tables: Mapping[str, tuple[list[str], list[list[Any]]]] | None = None,
              images: Mapping[str, Path] | None = None) -> None:
        """Log ``tables`` (key -> (columns, rows)) as ``wandb.Table``s and ``images`` (key -> PNG
        file) as ``wandb.Image``s, in one history row (``halp report --paper --wandb``)."""
        def log() -> None:
            import wandb

            row = {k: wandb.Table(columns=list(cols), data=[list(r) for r in rows]) for k, (cols, rows) in (tables or {}).items()}
            row.update({k: wandb.Image(str(p)) for k, p in (images or {}).items() if Path(p).is_file()})
            self._run.log(row)

        self._guard("media", log)

    def finish(self, exit_code: int = 0) -> None:
        """Close the run (idempotent); a non-zero exit code marks it failed in W&B.

        Returns once the run's ``.wandb`` file is complete on disk.
        """
        def close() -> None:
            import wandb

            self._run.finish(exit_code=exit_code)
            # run.finish() only *informs* wandb-core, which closes (flushes) the transaction log
            # some time later; teardown waits for that, so the file can be read right after.
            if wandb.run is None:
                wandb.teardown()

        self._guard("finish", close)
        self._run = None

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.finish(exit_code=0 if exc_type is None else 1)
