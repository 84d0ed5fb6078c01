"""Baseline pruning methods on HALP's pruner interface (:class:`halp.pruners.Pruner`).

Each shares HALP's channel groups, cost model, masks, training loop, slimming and measurement;
only the criterion and the schedule differ. ``prune.target`` is the budget for all of them.

- ``magnitude``: L1 filter norm, one global ranking (Li et al. 2017), one-shot or iterative;
- ``taylor``: first-order Taylor on BatchNorm, squared, EMA across steps (Molchanov et al. 2019);
- ``eagleeye``: random width search, adaptive BN, holdout scoring (Li et al. 2020); its candidate
  scoring is ``eagleeye_scoring``.

Each method's default is its paper's; the variants are options (``README.md`` in this package).

Every module of this package is imported here, and each registers its method with
:func:`halp.pruners.register_pruner`, so a new baseline is one new module and nothing else.
"""
import importlib
import pkgutil

# the order of the methods' registration is the order in which help texts list them
from .magnitude import MagnitudeConfig, MagnitudePruner  # isort: skip
from .taylor import TaylorConfig, TaylorPruner  # isort: skip
from .eagleeye import EagleEyeConfig, EagleEyePruner, adaptive_bn  # isort: skip

for _mod in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_mod.name}")

__all__ = ["EagleEyeConfig", "EagleEyePruner", "MagnitudeConfig", "MagnitudePruner", "TaylorConfig",
           "TaylorPruner", "adaptive_bn"]
