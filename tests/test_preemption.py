"""PreemptionGuard: record the signal, hand over to the handler that was there (submitit's)."""
from __future__ import annotations

import os
import signal

import pytest

from experiments.preemption import PreemptionGuard


@pytest.mark.parametrize("sent", [signal.SIGUSR2, signal.SIGUSR1])
def test_guard_records_then_hands_over_to_the_previous_handler(sent):
    calls = []

    def submitit_like(signum, frame):  # submitit handles only its own signal (USR2) and exits
        calls.append(signum)
        raise SystemExit("requeued")

    old = {s: signal.signal(s, signal.SIG_DFL) for s in (signal.SIGUSR1, signal.SIGUSR2)}
    try:
        signal.signal(signal.SIGUSR2, submitit_like)
        guard = PreemptionGuard().install()
        assert not guard.requested()
        os.kill(os.getpid(), sent)  # recorded only: nothing stops mid-step
        assert guard.requested() and calls == []
        with pytest.raises(SystemExit, match="requeued"):
            guard.hand_over()
        assert calls == [signal.SIGUSR2]  # the USR2 handler, whichever signal came
        assert signal.getsignal(signal.SIGUSR2) is submitit_like  # handlers restored
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def test_guard_without_submitit_exits_with_how_to_resume():
    old = {s: signal.signal(s, signal.SIG_DFL) for s in (signal.SIGUSR1, signal.SIGUSR2)}
    try:
        guard = PreemptionGuard().install()
        os.kill(os.getpid(), signal.SIGUSR1)
        with pytest.raises(SystemExit, match="run the same command again to resume"):
            guard.hand_over()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
