"""Pruning methods: the shared base class, HALP's pruner and a registry of methods by name.

``create_pruner(name, graph, cost, prune_cfg, method_cfg)`` builds any registered method, the way
:func:`halp.models.create_model` builds models; HALP registers itself here and the baselines in
``baselines/``. A new method is one module that subclasses :class:`Pruner` and registers it.
"""
from .base import PruneConfig, Pruner, PrunerContext, StepLog
from .halp import HalpConfig, HalpPruner
from .registry import (PrunerEntry, create_pruner, method_config, pruner_entry, pruner_label, pruner_names,
                       register_pruner)

__all__ = ["HalpConfig", "HalpPruner", "PruneConfig", "Pruner", "PrunerContext", "PrunerEntry", "StepLog",
           "create_pruner", "method_config", "pruner_entry", "pruner_label", "pruner_names", "register_pruner"]
