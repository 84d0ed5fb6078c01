"""A robust timing protocol for many small workloads on a noisy machine.

1. Warm-up: every workload runs once untimed (the first pass over new shapes is 35-60 % slow),
   then is timed once to choose how many back-to-back calls make one sample (>= ``sample_ms``).
2. Rounds: each round visits all workloads in a fresh random order, one sample each, so slow
   drifts of the machine spread over all workloads instead of biasing some. Each sample starts
   with ``warm_calls`` untimed calls: the workload before it evicted this one's weights from the
   caches, and a deployed model that runs back to back does not pay that.
3. Statistic: the median of the samples; spread = interquartile range / median.
4. Workloads whose spread exceeds ``max_spread`` get more rounds (at most ``max_extra`` times),
   noisiest first, within ``extra_budget`` × the samples of step 2: on a machine too noisy for
   the protocol, measuring stops at a known cost and the workloads still too noisy say so
   (``Timing.noisy``) instead of being measured again and again.

Table builds also set ``weight_pool_mb``: a unit then reads its weights from a rotating slice of a
pool as large as the model's parameters (capped at ``max_pool_mb``), because inside the network
the other layers have evicted them from the caches. Without it, isolated units of a ResNet-50
came out ~7 % faster than the same convs inside the network on our 32 MB-L3 CPUs.

On the CUDA backend the paper's protocol replaces whatever protocol the caller passes
(:data:`CUDA_EVENTS`, :func:`protocol_for`): ``warmup`` = 10 untimed forwards, then 30 rounds of one
forward each between CUDA events, median; no re-measuring, no weight pool. Rounds still visit the
workloads in random order.
"""
from __future__ import annotations

import dataclasses
import math
import random
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import numpy as np

from .backends import Backend, CudaBackend, Runner


@dataclass(frozen=True)
class Protocol:
    rounds: int = 5
    sample_ms: float = 4.0
    max_calls: int = 200
    max_spread: float = 0.08
    extra_rounds: int = 4
    max_extra: int = 2
    extra_budget: float = 0.2
    warm_calls: int = 1
    weight_pool_mb: float | None = None
    seed: int = 0
    warmup: int = 1  # untimed calls of each workload before its first sample

    def __post_init__(self) -> None:
        if self.rounds < 1:
            raise ValueError(f"rounds must be >= 1, got {self.rounds}")
        if self.extra_budget < 0:
            raise ValueError(f"extra_budget must be >= 0, got {self.extra_budget}")
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {self.warmup}")

    def to_dict(self) -> dict:
        """The fields, less ``warmup`` at its default: tables and partial builds written before the
        field existed keep the same record (a resume compares it)."""
        d = asdict(self)
        if d["warmup"] == 1:
            del d["warmup"]
        return d


# The paper's GPU protocol (HALP: 10 warm-up + 30 timed forwards with CUDA events), one forward per
# sample, median. Unverified on a GPU.
CUDA_EVENTS = Protocol(rounds=30, warmup=10, sample_ms=0.0, max_calls=1, warm_calls=0, max_extra=0,
                       weight_pool_mb=0.0)


def protocol_for(backend: Backend, protocol: Protocol) -> Protocol:
    """The protocol ``backend`` is timed with: ``protocol``, except on CUDA, where it is
    :data:`CUDA_EVENTS` with ``protocol``'s seed (whoever asks, tables, anchors and a job's
    dense/slim measurement all follow the paper there)."""
    if isinstance(backend, CudaBackend):
        return dataclasses.replace(CUDA_EVENTS, seed=protocol.seed)
    return protocol


@dataclass(frozen=True)
class Timing:
    ms: float
    spread: float
    samples: int
    remeasured: bool = False
    noisy: bool = False  # still above the protocol's max_spread when its re-measuring budget ran out


def summarize(samples: Sequence[float]) -> tuple[float, float]:
    a = np.asarray(samples, dtype=float)
    med = float(np.median(a))
    q75, q25 = np.percentile(a, [75, 25])
    return med, float((q75 - q25) / med) if med > 0 else 0.0


def measure(backend: Backend, runners: Sequence[Runner], protocol: Protocol,
            tick: Callable[[int], None] | None = None) -> list[Timing]:
    """Time every runner with the protocol above (on CUDA: :func:`protocol_for`'s). ``tick(n)``
    reports n finished samples."""
    protocol = protocol_for(backend, protocol)
    rng = random.Random(protocol.seed)
    n = len(runners)
    calls = []
    for run in runners:
        for _ in range(protocol.warmup):
            run()  # first calls on new shapes (and cuDNN's choice of algorithm): discarded
        if protocol.max_calls == 1:  # one call per sample: nothing to choose
            calls.append(1)
            continue
        t = backend.time_ms(run, 1)
        calls.append(max(1, min(protocol.max_calls, math.ceil(protocol.sample_ms / max(t, 1e-6)))))
    samples: list[list[float]] = [[] for _ in range(n)]

    def do_rounds(idx: list[int], rounds: int) -> None:
        for _ in range(rounds):
            order = idx[:]
            rng.shuffle(order)
            for i in order:
                for _ in range(protocol.warm_calls):
                    runners[i]()
                samples[i].append(backend.time_ms(runners[i], calls[i]))
            if tick:
                tick(len(order))

    do_rounds(list(range(n)), protocol.rounds)
    remeasured = set()
    left = int(protocol.extra_budget * n * protocol.rounds)
    for _ in range(protocol.max_extra):
        spread = {i: summarize(samples[i])[1] for i in range(n)}
        noisy = sorted((i for i in range(n) if spread[i] > protocol.max_spread), key=lambda i: -spread[i])
        noisy = noisy[:left // max(protocol.extra_rounds, 1)]
        if not noisy:
            break
        remeasured.update(noisy)
        left -= len(noisy) * protocol.extra_rounds
        do_rounds(noisy, protocol.extra_rounds)
    out = []
    for i in range(n):
        ms, spread = summarize(samples[i])
        out.append(Timing(ms, spread, len(samples[i]), i in remeasured, spread > protocol.max_spread))
    return out
