"""EagleEye's candidate scoring: adaptive BN on the masked model, holdout top-1, in worker processes.

A module of its own because the score must be of exactly the model that the job then fine-tunes:
a candidate is the dense model with its masks applied (pruned channels zero), its BatchNorm
statistics are re-estimated in place from the same training minibatches for every candidate
(adaptive BN), the masks are applied again, and that masked model is scored on the holdout. The
re-estimated buffers of the best candidate travel back and are loaded into the job's model, so the
fine-tuning starts from the scored model bit for bit. Slimming first (from the dense statistics)
would not do: an emptied residual branch would keep the constant β − γμ/σ of its last BN, while the
masked model, whose emptied branch feeds zeros into that BN, emits β once recalibrated or trained
(see :mod:`halp.residual`). Candidates are scored in processes, one fresh copy of the dense state
per candidate, so the scores do not depend on how many processes share the work.
"""
from __future__ import annotations

import copy
import io
import multiprocessing as mp
from collections.abc import Callable, Iterable

import torch
from torch import nn
from torch.utils.data import Dataset

from halp.evaluation import evaluate, fetch_batch, reseed_dataset
from halp.graph import ChannelGraph
from halp.masks import ChannelMasks, MaskApplier


@torch.no_grad()
def adaptive_bn(model: nn.Module, batches: Iterable[torch.Tensor]) -> int:
    """Re-estimate every BatchNorm's running statistics from ``batches`` (train-mode forwards, no
    gradients, an exact average over the batches); weights are untouched. Returns batches used."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    was_training = model.training
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average
    model.train()
    n = 0
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    for x in batches:
        model(x.to(device, non_blocking=True))
        n += 1
    for m, mom in zip(norms, momenta):
        m.momentum = mom
    model.train(was_training)
    return n


def calibration_batches(train_set: Dataset, n: int, batch_size: int, seed: int) -> list[list[int]]:
    """``n`` minibatches of training indices from a seeded permutation (reused for every candidate)."""
    perm = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(seed)).tolist()
    size = min(batch_size, len(train_set))
    return [[perm[(i * size + j) % len(perm)] for j in range(size)] for i in range(n)]


def calib_inputs(train_set: Dataset, index_lists: list[list[int]], seed: int):
    """The calibration minibatches' images, with the same augmentation for every candidate."""
    for b, idx in enumerate(index_lists):
        reseed_dataset(train_set, seed * 100_003 + b)
        yield fetch_batch(train_set, idx)[0]


def norm_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the BatchNorm buffers (running statistics, batch counts): what adaptive BN sets."""
    return {f"{n}.{b}" if n else b: t.detach().cpu().clone() for n, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm)
            for b, t in m.named_buffers(recurse=False) if t is not None}


@torch.no_grad()
def load_norm_buffers(model: nn.Module, buffers: dict[str, torch.Tensor]) -> None:
    own = dict(model.named_buffers())
    for k, v in buffers.items():
        own[k].copy_(v)


# ---------------------------------------------------------------------- per-process state
_WORK: dict = {}


def init_worker(payload: bytes | dict, threads: int) -> None:
    """Set up a scoring process (or the calling one). The payload comes as ``torch.save`` bytes to
    a spawned process: plain bytes travel as they are (tensors pickled by multiprocessing would be
    shared through file descriptors, which a pool's initializer cannot pass). In the calling
    process the model is copied, so the caller's model is never touched."""
    torch.set_num_threads(threads)
    if isinstance(payload, bytes):
        payload = torch.load(io.BytesIO(payload), weights_only=False)
        model = payload["model"]
    else:
        model = copy.deepcopy(payload["model"])
    model.to(payload.get("device", "cpu"))  # scoring runs on the job's device (a copy: the caller's model is untouched)
    dense = {k: v.detach().clone() for k, v in model.state_dict().items()}
    _WORK.update(model=model, dense=dense, graph=ChannelGraph.build(model, payload["input_shape"]), **{
        k: payload[k] for k in ("train", "holdout", "calib", "seed", "eval_batch")}, score=payload.get("score"))


def calibrated_model(masks: ChannelMasks) -> nn.Module:
    """The candidate as scored and then fine-tuned: the dense model, ``masks`` applied, adaptive BN
    over the calibration batches, the masks applied again (a pruned BN channel's statistics zero).
    The process's one working model, reset to the dense state for every candidate."""
    w = _WORK
    model = w["model"]
    model.load_state_dict(w["dense"])
    applier = MaskApplier(w["graph"], masks)
    applier.apply()
    adaptive_bn(model, calib_inputs(w["train"], w["calib"], w["seed"]))
    applier.apply()
    return model


def score_masks(masks: ChannelMasks) -> tuple[float, dict[str, torch.Tensor]]:
    """The calibrated masked candidate's holdout score (top-1 %, or the context's ``score``, e.g.
    a detector's mAP) and its BatchNorm buffers."""
    model = calibrated_model(masks)
    reseed_dataset(_WORK["holdout"], _WORK["seed"])  # an augmenting holdout scores every candidate alike
    score = _WORK.get("score")
    value = score(model, _WORK["holdout"], _WORK["eval_batch"]) if score is not None else \
        evaluate(model, _WORK["holdout"], _WORK["eval_batch"])["top1"]
    return float(value), norm_buffers(model)


def _score_keep(keep: dict[str, torch.Tensor]) -> tuple[float, bytes]:
    top1, buffers = score_masks(ChannelMasks(keep))
    buf = io.BytesIO()
    torch.save(buffers, buf)  # bytes, not tensors, cross the process boundary (see init_worker)
    return top1, buf.getvalue()


def score_candidates(payload: dict, masks: list[ChannelMasks], workers: int, threads: int, start_method: str,
                     on_result: Callable[[], None] | None = None) -> tuple[list[float], dict[str, torch.Tensor]]:
    """Every candidate's holdout top-1, in order, and the BatchNorm buffers of the best (the first
    of equals), scored in ``workers`` processes that share ``threads``."""
    keeps = [dict(m.items()) for m in masks]
    scores: list[float] = []
    best: bytes = b""

    def take(result: tuple[float, bytes]) -> None:
        nonlocal best
        if not scores or result[0] > max(scores):
            best = result[1]
        scores.append(result[0])
        if on_result is not None:
            on_result()

    if workers <= 1:
        saved = torch.get_num_threads()
        init_worker(payload, threads)
        try:
            for k in keeps:
                take(_score_keep(k))
        finally:
            _WORK.clear()
            torch.set_num_threads(saved)
    else:
        buf = io.BytesIO()
        torch.save(payload, buf)
        ctx = mp.get_context(start_method)
        with ctx.Pool(workers, initializer=init_worker, initargs=(buf.getvalue(), max(1, threads // workers))) as pool:
            for result in pool.imap(_score_keep, keeps):
                take(result)
    return scores, torch.load(io.BytesIO(best), weights_only=True)
