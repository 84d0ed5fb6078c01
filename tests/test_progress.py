"""Progress bars: drawn freely on a terminal, throttled when the output is a file (Slurm logs)."""
from __future__ import annotations

import io

from halp import progress


class Stream(io.StringIO):
    def __init__(self, tty: bool) -> None:
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


def bar_lines(monkeypatch, tty: bool, steps: int = 2000, **kwargs) -> int:
    """Redraws of a bar over ``steps`` fast iterations, with standard error a terminal or not."""
    err = Stream(tty)
    monkeypatch.setattr(progress.sys, "stderr", err)
    for _ in progress.progress_bar(range(steps), desc="work", file=err, **kwargs):
        pass
    return err.getvalue().count("\r") + err.getvalue().count("\n")


def test_bars_are_throttled_when_not_on_a_terminal(monkeypatch):
    monkeypatch.setattr(progress, "LOG_INTERVAL_S", 60.0)
    assert bar_lines(monkeypatch, tty=False) <= 3  # the first draw, the last, and the close
    assert bar_lines(monkeypatch, tty=True, mininterval=0) > 100  # a terminal gets every redraw asked for


def test_disabled_bars_write_nothing(monkeypatch):
    err = Stream(False)
    monkeypatch.setattr(progress.sys, "stderr", err)
    for _ in progress.progress_bar(range(10), enabled=False, file=err):
        pass
    assert err.getvalue() == ""
