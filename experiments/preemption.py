"""Checkpoint on Slurm's preemption signal, then let submitit requeue the job.

Slurm warns a job before it is preempted or reaches its time limit: submitit asks for
``--signal=USR2@<signal_delay_s>`` (USR2 is submitit's default; ``SUBMITIT_PREEMPT_SIGNAL``
changes it), and a user can send it with ``scancel --signal=USR2 JOB`` (USR1 is treated alike).
submitit installs a handler that requeues the job; acting on the signal in the middle of an
optimizer step would checkpoint a half-updated model, so :class:`PreemptionGuard` only records
it. The trainer polls :meth:`requested` after every iteration, writes its checkpoint and stops;
:meth:`hand_over` then runs submitit's handler (which requeues and exits). Outside submitit the
job exits with a message saying how to resume.
"""
from __future__ import annotations

import signal
import sys
import threading
from types import FrameType
from typing import Any


class PreemptionGuard:
    def __init__(self, signals: tuple[int, ...] = (signal.SIGUSR2, signal.SIGUSR1)) -> None:
        self.signals = signals
        self.caught: tuple[int, FrameType | None] | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> "PreemptionGuard":
        if threading.current_thread() is not threading.main_thread():
            return self  # signal handlers can only be set from the main thread
        for s in self.signals:
            self._previous[s] = signal.getsignal(s)
            signal.signal(s, self._record)
        return self

    def uninstall(self) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous.clear()

    def _record(self, signum: int, frame: FrameType | None) -> None:
        self.caught = (signum, frame)

    def requested(self) -> bool:
        return self.caught is not None

    def hand_over(self) -> None:
        """After the checkpoint: requeue through submitit's handler if there is one, else exit."""
        assert self.caught is not None
        signum, frame = self.caught
        # the handler that was there for the caught signal, else one for the others (submitit
        # handles only its own signal, but USR1 and USR2 both mean "checkpoint and requeue" here)
        handlers = [(signum, self._previous.get(signum))] + [(s, h) for s, h in self._previous.items() if s != signum]
        self.uninstall()
        for s, previous in handlers:
            if callable(previous):
                previous(s, frame)  # submitit: dump the resubmission, `scontrol requeue`, exit
                break
        sys.exit(f"halp-run: stopped on signal {signal.Signals(signum).name} after checkpointing; "
                 "run the same command again to resume")

    def __enter__(self) -> "PreemptionGuard":
        return self.install()

    def __exit__(self, *exc: object) -> None:
        self.uninstall()
