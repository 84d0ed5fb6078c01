"""Baseline pruning methods (magnitude, Taylor, EagleEye) on HALP's pruner interface.

Not implemented yet: tracked by the baselines issue. They will reuse halp's groups, masks and slimming.
"""
