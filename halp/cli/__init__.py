"""The ``halp`` command line: ``halp <command> --help`` explains each command.

The library's own commands live here; installed packages add more through the ``halp.commands``
entry-point group (the experiment suite adds ``halp report`` that way), so that the library never
imports the suite that builds on it.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from importlib.metadata import entry_points

# Subcommand modules; each defines ``register(subparsers)`` and sets ``func`` on its parser.
COMMANDS = ("inspect", "slim", "lut")
PLUGIN_GROUP = "halp.commands"


class UserError(Exception):
    """A problem with the user's input: printed as one clear line, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="halp",
        description="Hardware-aware latency pruning: inspect a model's channel groups, build and "
                    "validate latency tables for your device, prune, and report.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"halp.cli.{name}").register(sub)
    for ep in sorted(entry_points(group=PLUGIN_GROUP), key=lambda e: e.name):
        if ep.name in COMMANDS:
            continue  # a plugin may not replace a library command
        try:
            ep.load().register(sub)
        except ImportError as e:  # a plugin whose extras are missing must not break the other commands
            print(f"halp: command {ep.name!r} unavailable ({e})", file=sys.stderr)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (UserError, FileNotFoundError, ValueError) as e:
        print(f"halp {args.command}: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # e.g. `halp inspect ... | head`
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print(f"halp {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
