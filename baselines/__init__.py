"""Baseline pruning methods on HALP's pruner interface (``halp.pruning.Pruner``).

Each shares HALP's channel groups, cost model, masks, training loop, slimming and measurement;
only the criterion and the schedule differ. ``prune.target`` is the budget for all of them.

- ``magnitude``: L1 filter norm (Li et al. 2017), one-shot or iterative;
- ``taylor``: first-order Taylor on BatchNorm, squared, EMA across steps (Molchanov et al. 2019);
- ``eagleeye``: random width search, adaptive BN, holdout scoring (Li et al. 2020).
"""
from .eagleeye import EagleEyeConfig, EagleEyePruner, adaptive_bn
from .magnitude import MagnitudeConfig, MagnitudePruner
from .taylor import TaylorConfig, TaylorPruner

__all__ = ["EagleEyeConfig", "EagleEyePruner", "MagnitudeConfig", "MagnitudePruner", "TaylorConfig",
           "TaylorPruner", "adaptive_bn"]
