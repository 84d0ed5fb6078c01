"""Pruning methods by name, the way models are created by name in :mod:`halp.models`.

A method is a :class:`~halp.pruners.base.Pruner` subclass plus a dataclass of its own settings,
registered under a name::

    @register_pruner("mine", MineConfig, label="Mine (2031)")
    class MinePruner(Pruner):
        def __init__(self, graph, cost, config, method_cfg, context): ...

    pruner = create_pruner("mine", graph, cost, PruneConfig(target=0.5), {"alpha": 0.1})

The registry lets the experiment suite (and any other driver) offer every method without naming
any of them: a new method is one module that registers itself, nothing else changes. HALP's own
pruner registers itself in ``halp/pruners/halp.py``, the baselines in ``baselines/``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from ..graph import ChannelGraph
from ..latency.cost import CostModel
from .base import PruneConfig, Pruner, PrunerContext

__all__ = ["PrunerEntry", "create_pruner", "method_config", "pruner_entry", "pruner_label", "pruner_names",
           "register_pruner"]


@dataclass(frozen=True)
class PrunerEntry:
    name: str
    cls: type[Pruner]
    config_cls: type
    label: str


_REGISTRY: dict[str, PrunerEntry] = {}


def register_pruner(name: str, config_cls: type, label: str | None = None) -> Callable[[type], type]:
    """Class decorator: register a :class:`Pruner` subclass under ``name`` with its settings
    dataclass ``config_cls``; ``label`` is how reports print the method (default: ``name``).

    The class is constructed as ``cls(graph, cost, prune_cfg, method_cfg, context)``."""
    if not dataclasses.is_dataclass(config_cls):
        raise TypeError(f"config_cls of pruner {name!r} must be a dataclass, got {config_cls!r}")

    def decorate(cls: type) -> type:
        if not (isinstance(cls, type) and issubclass(cls, Pruner)):
            raise TypeError(f"{cls!r} registered as pruner {name!r} is not a halp Pruner subclass")
        old = _REGISTRY.get(name)
        if old is not None and (old.cls.__module__, old.cls.__qualname__) != (cls.__module__, cls.__qualname__):
            raise ValueError(f"pruner {name!r} is already registered by {old.cls.__module__}.{old.cls.__qualname__}")
        cls.method = name
        _REGISTRY[name] = PrunerEntry(name, cls, config_cls, label or name)
        return cls
    return decorate


def pruner_names() -> list[str]:
    """Names of the registered methods, in the order they were registered."""
    return list(_REGISTRY)


def pruner_entry(name: str) -> PrunerEntry:
    """The registration of ``name``; an unknown name is a ValueError that lists the known ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown pruning method {name!r}; registered: {', '.join(pruner_names()) or 'none'}"
                         ) from None


def pruner_label(name: str) -> str:
    """How reports print method ``name`` (the name itself for an unregistered one)."""
    entry = _REGISTRY.get(name)
    return entry.label if entry is not None else name


def method_config(name: str, settings: Any = None) -> Any:
    """The settings dataclass of method ``name`` from ``settings``: ``None`` (defaults), an instance
    of the method's config class, or a mapping of its fields. Unknown fields are a ValueError that
    names the fields the method has."""
    entry = pruner_entry(name)
    if settings is None:
        return entry.config_cls()
    if isinstance(settings, entry.config_cls):
        return settings
    if not isinstance(settings, Mapping):
        raise TypeError(f"settings of method {name!r} must be a {entry.config_cls.__name__} or a mapping, "
                        f"got {type(settings).__name__}")
    fields = {f.name for f in dataclasses.fields(entry.config_cls) if f.init}
    unknown = sorted(set(settings) - fields)
    if unknown:
        raise ValueError(f"method {name!r} has no setting(s) {', '.join(unknown)}; its settings are "
                         f"{', '.join(sorted(fields)) or 'none'}")
    return entry.config_cls(**settings)


def create_pruner(name: str, graph: ChannelGraph, cost: CostModel, prune_cfg: PruneConfig,
                  method_cfg: Any = None, context: PrunerContext | None = None) -> Pruner:
    """The pruner registered as ``name`` on ``graph`` and ``cost``: ``prune_cfg`` is the budget and
    schedule every method shares, ``method_cfg`` the method's own settings (see
    :func:`method_config`), ``context`` what the driver knows about the run (seed, threads)."""
    entry = pruner_entry(name)
    return entry.cls(graph, cost, prune_cfg, method_config(name, method_cfg), context or PrunerContext())
