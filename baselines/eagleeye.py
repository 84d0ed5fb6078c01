"""EagleEye (Li et al., ECCV 2020): random search over per-layer widths with adaptive-BN scoring.

Before fine-tuning, on the trained dense model: (1) draw per-group prune ratios r_g = U(0, 1) ·
``max_rate`` (the paper's fixed per-model rate; ``"auto"`` bisects for the rate at which half of the
draws land under the target), round each width to the unit grid, and keep a candidate only if its
resource (the cost model's latency by default, MACs with ``resource="flops"``) lies in the window
around the target: the paper's ±``tolerance`` (``window="symmetric"``), or ``window="below"``,
[T·(1 − 2·tol), T], as wide but never over the budget. At aggressive targets almost every such draw
is rejected; ``sampler="auto"`` then switches to scaling each draw's ratios by a common factor into
the window (``"scale"`` from the start; ``"reject"`` keeps the paper's sampler only). A residual
branch may be drawn to zero channels when ``prune.allow_vanish`` is set, as for HALP. (2) prune each
candidate by L1 filter norm, apply its masks to the dense model, re-estimate its BatchNorm
statistics (adaptive BN) and score its holdout top-1 (:mod:`baselines.eagleeye_scoring`). (3) keep
the best candidate's masks and its re-estimated statistics, so that the model fine-tuned is the
model scored. Method and variants: ``baselines/README.md``.
"""
from __future__ import annotations

import multiprocessing as mp
from dataclasses import asdict, dataclass
from enum import Enum

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from halp.counting import count
from halp.graph import ChannelGraph
from halp.latency.cost import CostModel
from halp.masks import ChannelMasks
from halp.progress import progress_bar
from halp.pruners import PruneConfig, Pruner, PrunerContext, StepLog, register_pruner
from halp.pruners.base import check_chunk
from halp.saliency import filter_norms

from .eagleeye_scoring import adaptive_bn, calibration_batches, load_norm_buffers, score_candidates

__all__ = ["AUTO_RATE", "EagleEyeConfig", "EagleEyePruner", "acceptance_window", "adaptive_bn",
           "calibration_batches"]

AUTO_RATE = "auto"  # max_rate: bisect for the rate whose median draw hits the target (our variant)
# The paper's fixed max rates (ResNet-50: 0.4 / 0.7 / 0.8 for -25 / -50 / -75 % FLOPs; MobileNetV1
# at -50 %: 0.7). The default is the -50 % one; the paper presets pick theirs (README.md).
PAPER_MAX_RATE = 0.7


class Resource(str, Enum):
    LATENCY = "latency"
    FLOPS = "flops"


class Sampler(str, Enum):
    AUTO = "auto"      # REJECT, switching to SCALE when its acceptance rate is too low
    REJECT = "reject"  # the paper's: uniform ratios, keep the draws inside the window
    SCALE = "scale"    # uniform ratio shapes scaled into the window (aggressive targets)


class Window(str, Enum):
    SYMMETRIC = "symmetric"  # the paper's [T(1 - tol), T(1 + tol)]
    BELOW = "below"          # [T(1 - 2 tol), T]: never over the budget


@dataclass
class EagleEyeConfig:
    candidates: int = 50
    max_rate: float | str = PAPER_MAX_RATE  # in (0, 1], or "auto" (bisection; None is read as "auto")
    tolerance: float = 0.005
    window: str = "symmetric"
    resource: str = "latency"
    holdout: int = 5000             # training samples (evaluation transforms) used to score candidates
    calib_batches: int = 100
    batch_size: int = 128
    max_draws: int = 50_000
    sampler: str = "auto"           # auto | reject | scale (see Sampler)
    workers: int | None = None      # None: as many as threads allow
    start_method: str = "spawn"     # fork is faster to start but unsafe after OpenMP use
    chunk: int | str = 1
    reduce: str = "first"

    def __post_init__(self) -> None:
        Resource(self.resource)
        Window(self.window)
        Sampler(self.sampler)
        if self.candidates < 1 or self.calib_batches < 0 or self.holdout < 1 or self.batch_size < 1:
            raise ValueError("eagleeye.candidates, holdout and batch_size must be >= 1 (calib_batches >= 0)")
        if not 0 < self.tolerance < 0.5:
            raise ValueError(f"eagleeye.tolerance must be in (0, 0.5), got {self.tolerance}")
        if self.max_rate is None:
            self.max_rate = AUTO_RATE  # the old spelling of the bisection
        if self.max_rate != AUTO_RATE:
            try:
                rate = float(self.max_rate)
            except (TypeError, ValueError):
                rate = -1.0
            if not 0 < rate <= 1:
                raise ValueError(f"eagleeye.max_rate must be a number in (0, 1] or 'auto', got {self.max_rate!r}")
            self.max_rate = rate
        if self.workers is not None and self.workers < 1:
            raise ValueError(f"eagleeye.workers must be >= 1, got {self.workers}")
        if self.start_method not in mp.get_all_start_methods():
            raise ValueError(f"eagleeye.start_method must be one of {mp.get_all_start_methods()}")
        check_chunk(self.chunk)


def acceptance_window(target: float, tolerance: float, window: str | Window) -> tuple[float, float]:
    """The resource interval a candidate must fall in."""
    if Window(window) is Window.BELOW:
        return target * (1 - 2 * tolerance), target
    return target * (1 - tolerance), target * (1 + tolerance)


@register_pruner("eagleeye", EagleEyeConfig, label="EagleEye")
class EagleEyePruner(Pruner):
    CHECK = 2000  # draws between checks of the rejection sampler's acceptance rate (sampler="auto")

    def __init__(self, graph: ChannelGraph, cost: CostModel, config: PruneConfig,
                 method_cfg: EagleEyeConfig | None = None, context: PrunerContext | None = None,
                 chunk_sizes: dict[str, int] | None = None) -> None:
        self.ecfg = method_cfg or EagleEyeConfig()
        context = context or PrunerContext(threads=2)
        super().__init__(graph, cost, config, chunk_sizes, chunk=self.ecfg.chunk, context=context)
        self.steps_total = 1
        self.seed, self.threads, self.progress = context.seed, context.threads, context.progress
        self.device, self.score = context.device, context.score
        self.resource = Resource(self.ecfg.resource)
        self.dense_resource = self.measure(graph.full_widths())
        self.window = acceptance_window(config.target * self.dense_resource, self.ecfg.tolerance, self.ecfg.window)
        self.search: dict = {}

    @property
    def active(self) -> bool:
        return False  # all pruning happens in setup()

    def measure(self, widths: dict[str, int]) -> float:
        """The resource the candidates are filtered on: predicted ms, or MACs."""
        if self.resource is Resource.FLOPS:
            return float(count(self.graph, widths).macs)
        return self.cost.total_ms(widths)

    # ------------------------------------------------------------------ sampling
    def widths_at(self, ratios: dict[str, float]) -> dict[str, int]:
        """Widths for per-group prune ratios: rounded to the unit grid, never below the minimum
        (zero for a residual branch when ``prune.allow_vanish``)."""
        widths = self.graph.full_widths()
        for g in self.groups:
            c, need = self.chunks[g.id], self.min_keep(g)
            cut = c * int(round(g.width * min(1.0, ratios[g.id]) / c))
            lowest = g.width - c * ((g.width - need) // c) if need > 0 else 0  # on the grid
            widths[g.id] = max(g.width - cut, lowest)
        return widths

    def draw(self, rng: np.random.Generator, max_rate: float) -> dict[str, int]:
        """One random candidate of the paper's sampler: r_g = U(0, 1) · max_rate per group."""
        return self.widths_at({g.id: rng.uniform(0, 1) * max_rate for g in self.groups})

    def draw_scaled(self, rng: np.random.Generator) -> dict[str, int] | None:
        """One random candidate with its budget met by construction: r_g = min(1, s · u_g) with
        u_g = U(0, 1) and the common scale s bisected into the window (None if no s lands there,
        e.g. when a grid step jumps over it). Keeps the random per-group shape of a draw."""
        u = {g.id: rng.uniform(1e-6, 1) for g in self.groups}
        lo_w, hi_w = self.window
        lo, hi = 0.0, 1.0 / min(u.values())  # at hi every group is at its minimum
        if self.measure(self.widths_at({k: hi * v for k, v in u.items()})) > hi_w:
            return None
        for _ in range(50):
            mid = (lo + hi) / 2
            w = self.widths_at({k: mid * v for k, v in u.items()})
            r = self.measure(w)
            if lo_w <= r <= hi_w:
                return w
            lo, hi = (mid, hi) if r > hi_w else (lo, mid)
        return None

    def auto_rate(self, draws: int = 64) -> float:
        """Bisection for the max rate at which the median draw's resource equals the target."""
        lo, hi, target = 0.0, 1.0, self.cfg.target * self.dense_resource
        for _ in range(20):
            mid = (lo + hi) / 2
            rng = np.random.default_rng(self.seed)
            med = float(np.median([self.measure(self.draw(rng, mid)) for _ in range(draws)]))
            lo, hi = (mid, hi) if med > target else (lo, mid)
        return hi

    def sample(self) -> tuple[list[dict[str, int]], int, float, str]:
        """Accepted candidates (distinct), the number of draws it took, the rate and the sampler(s).

        ``sampler="auto"`` starts with the paper's rejection sampling and switches to budget-scaled
        draws once its acceptance rate says ``max_draws`` would not find ``candidates`` (checked
        every ``CHECK`` draws): aggressive targets that uniform ratios almost never reach."""
        rate = self.auto_rate() if self.ecfg.max_rate == AUTO_RATE else float(self.ecfg.max_rate)
        mode = Sampler(self.ecfg.sampler)
        scaled = mode is Sampler.SCALE
        rng = np.random.default_rng(self.seed + 1)
        lo, hi = self.window
        found, seen, draws, used = [], set(), 0, set()
        while len(found) < self.ecfg.candidates and draws < self.ecfg.max_draws:
            if mode is Sampler.AUTO and not scaled and draws and draws % self.CHECK == 0:
                scaled = not found or draws * self.ecfg.candidates / len(found) > self.ecfg.max_draws
            draws += 1
            used.add(Sampler.SCALE if scaled else Sampler.REJECT)
            w = self.draw_scaled(rng) if scaled else self.draw(rng, rate)
            if w is None:
                continue
            key = tuple(w[g.id] for g in self.groups)
            if key not in seen and lo <= self.measure(w) <= hi:
                seen.add(key)
                found.append(w)
        kinds = "+".join(k.value for k in (Sampler.REJECT, Sampler.SCALE) if k in used)
        if not found:
            unit = "ms" if self.resource is Resource.LATENCY else "MACs"
            floor = self.measure(self.widths_at({g.id: 1.0 for g in self.groups}))
            raise ValueError(f"EagleEye found no candidate in [{lo:.4g}, {hi:.4g}] {unit} after {draws} draws "
                             f"({kinds} sampler, max_rate {rate:.3f}; the smallest candidate is {floor:.4g} "
                             f"{unit}); set eagleeye.sampler=scale or eagleeye.max_rate, widen eagleeye.tolerance, "
                             "raise eagleeye.max_draws, or allow prune.allow_vanish")
        return found, draws, rate, kinds

    # ------------------------------------------------------------------ search
    def candidate_masks(self, widths: dict[str, int]) -> ChannelMasks:
        scores = {g.id: filter_norms(self.graph, g, 1, self.ecfg.reduce) for g in self.groups}
        return ChannelMasks.top_k(self.graph, scores, {g.id: widths[g.id] for g in self.groups})

    def evaluate_candidates(self, masks: list[ChannelMasks], train_set: Dataset, holdout: Dataset,
                            calib: list[list[int]]) -> tuple[list[float], dict[str, torch.Tensor]]:
        """Each candidate's holdout top-1 after adaptive BN, and the best one's BatchNorm buffers."""
        workers = min(self.ecfg.workers or self.threads, len(masks))
        if torch.device(self.device).type != "cpu":
            workers = 1  # one process owns the GPU; candidates are scored one after another on it
        payload = {"model": self.graph.model, "input_shape": self.graph.input_shape, "train": train_set,
                   "holdout": holdout, "calib": calib, "seed": self.seed, "eval_batch": 512,
                   "device": self.device, "score": self.score}
        bar = progress_bar(total=len(masks), enabled=self.progress, desc="EagleEye candidates", leave=False)
        try:
            return score_candidates(payload, masks, workers, self.threads, self.ecfg.start_method, bar.update)
        finally:
            bar.close()

    def setup(self, model: nn.Module, train_set: Dataset, holdout: Dataset | None = None) -> None:
        if self.done:
            return
        if holdout is None:
            raise ValueError("EagleEye needs a held-out split of the training set to score candidates")
        widths, draws, rate, sampler = self.sample()
        masks = [self.candidate_masks(w) for w in widths]
        calib = calibration_batches(train_set, self.ecfg.calib_batches, self.ecfg.batch_size, self.seed)
        scores, buffers = self.evaluate_candidates(masks, train_set, holdout, calib)
        best = int(np.argmax(scores))  # first of equals, like score_candidates
        self.set_masks(dict(masks[best].items()))
        load_norm_buffers(model, buffers)  # the masked model is now the one scored, statistics included
        self.applier.apply()
        self.search = {"draws": draws, "max_rate": rate, "sampler": sampler, "window": list(self.window), "best": best,
                       "candidates": [{"widths": {g.id: w[g.id] for g in self.groups}, "resource": self.measure(w),
                                       "predicted_ms": self.cost.total_ms(w),
                                       # top-1 by default; the context's own score (a detector's mAP) is named so
                                       ("holdout_top1" if self.score is None else "holdout_score"): s}
                                      for w, s in zip(widths, scores)]}
        self.record(self.final_target_ms, self.predicted_ms(), sum(g.width for g in self.groups)
                    - sum(self.widths()[g.id] for g in self.groups))

    def holdout_size(self) -> int:
        return self.ecfg.holdout

    def prune_step(self) -> StepLog:
        raise RuntimeError("EagleEye prunes once, in setup(), before fine-tuning")

    def config_state(self) -> dict:
        # how the work is spread over processes does not change the result: not part of the identity
        search = {k: v for k, v in asdict(self.ecfg).items() if k not in ("workers", "start_method")}
        return {**asdict(self.cfg), "eagleeye": search, "seed": self.seed}

    def extra_state(self) -> dict:
        return {"search": self.search}

    def load_extra_state(self, state: dict) -> None:
        self.search = state.get("search", {})
