"""Progress bars that suit where the output goes.

A bar redraws itself many times a second; on a terminal that is one line, but in a file (a Slurm
log, Hydra's run log, CI output) every redraw is a new line, and one training run wrote thousands
of them. So when standard error is not a terminal, bars update at most every ``LOG_INTERVAL_S``
seconds (and at their end), which keeps a log readable and still shows that work goes on.
"""
from __future__ import annotations

import os
import sys
from typing import Any

from tqdm.auto import tqdm

LOG_INTERVAL_S = float(os.environ.get("HALP_PROGRESS_INTERVAL", "60"))


def is_terminal() -> bool:
    """Whether progress bars draw on a terminal (standard error is a TTY)."""
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stream
        return False


def progress_bar(iterable: Any = None, *, enabled: bool = True, **kwargs: Any) -> tqdm:
    """A tqdm bar (``kwargs`` as for tqdm), disabled unless ``enabled``, throttled to one update
    every ``LOG_INTERVAL_S`` seconds when standard error is not a terminal."""
    if not is_terminal():
        kwargs.setdefault("mininterval", LOG_INTERVAL_S)
        kwargs.setdefault("maxinterval", max(LOG_INTERVAL_S, 10.0))
    return tqdm(iterable, disable=not enabled, **kwargs)
