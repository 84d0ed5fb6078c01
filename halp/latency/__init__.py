"""Latency lookup tables and the cost model that prices width configurations from them.

A regular package (not a namespace one) so that the import contracts in pyproject.toml, which
``lint-imports`` checks, can see its modules and keep pricing apart from measuring and slimming.
"""
