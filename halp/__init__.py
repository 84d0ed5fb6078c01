"""HALP: hardware-aware latency pruning."""
__version__ = "0.1.0"
