"""A plain classification training loop with HALP's hooks, checkpoints and exact resume.

SGD with momentum, cosine learning rate per iteration after a linear warm-up, label smoothing,
weight decay only on conv/linear weights (BatchNorm parameters and biases are found by module
type, not by name), optional bfloat16 autocast on the CPU. The data order of epoch e is a
permutation drawn from ``seed`` and ``e``, and a dataset with a ``reseed(int)`` method (our
augmenting in-memory datasets) is reseeded from (seed, epoch, batch) before every batch; a
checkpoint stores the position and the global RNG state, so a resumed run continues with exactly
the batches and random numbers it would have had.
"""
from __future__ import annotations

import logging
import math
import os
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from halp.evaluation import evaluate, fetch_batch, reseed_dataset
from halp.fileio import atomic_write
from halp.progress import progress_bar

from .distributed import SINGLE, DistEnv, barrier, broadcast

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    epochs: float = 1.0
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    warmup_epochs: float = 0.0
    label_smoothing: float = 0.0
    amp: bool = False
    threads: int = 2
    seed: int = 0
    batch_size: int = 128
    eval_batch_size: int = 512
    max_iters_per_epoch: int | None = None
    checkpoint_every: int = 0  # iterations; 0 = only at epoch ends and pruning steps
    micro_batches: int = 1  # split each (per-process) batch and accumulate gradients
    schedule: str = "cosine"  # cosine | step (lr x gamma every step_epochs; Taylor's reference schedule)
    step_epochs: float = 10.0
    gamma: float = 0.1

    def __post_init__(self) -> None:
        if self.epochs <= 0 or self.lr <= 0 or self.batch_size < 1 or self.threads < 1:
            raise ValueError("epochs, lr, batch_size and threads must be positive")
        if self.schedule not in ("cosine", "step"):
            raise ValueError(f"schedule must be 'cosine' or 'step', got {self.schedule!r}")
        if self.micro_batches < 1 or self.batch_size % self.micro_batches:
            raise ValueError(f"micro_batches={self.micro_batches} must divide batch_size={self.batch_size}")
        if self.step_epochs <= 0:
            raise ValueError(f"step_epochs must be positive, got {self.step_epochs}")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay conv/linear weights only; BN parameters and every bias get no weight decay."""
    decay, no_decay, seen = [], [], set()
    for mod in model.modules():
        for name, p in mod.named_parameters(recurse=False):
            if id(p) in seen or not p.requires_grad:
                continue
            seen.add(id(p))
            is_norm = isinstance(mod, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm))
            (no_decay if is_norm or name == "bias" else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_at(cfg: TrainConfig, iteration: int, total: int, per_epoch: int) -> float:
    warm = int(cfg.warmup_epochs * per_epoch)
    if iteration < warm:
        return cfg.lr * (iteration + 1) / warm
    if cfg.schedule == "step":
        return cfg.lr * cfg.gamma ** int(iteration / (cfg.step_epochs * per_epoch))
    progress = (iteration - warm) / max(1, total - warm)
    return 0.5 * cfg.lr * (1 + math.cos(math.pi * min(1.0, progress)))


@dataclass
class TrainState:
    epoch: int = 0
    batch: int = 0  # batches done in the current epoch
    iteration: int = 0
    history: list[dict] = field(default_factory=list)
    train_seconds: float = 0.0
    prune_seconds: float = 0.0


class Preempted(Exception):
    """Training stopped at an iteration boundary because ``should_stop`` said so; the checkpoint
    holds the state at that iteration."""


class Trainer:
    """Trains ``model`` on ``train_set``; ``pruner`` (optional) gets the pruner hooks.

    With ``dist`` (several processes, see ``experiments.distributed``) every rank draws the same global
    batch and trains on its contiguous shard under DDP; that equals one process with
    ``micro_batches = world`` (same gradients, up to summation order). Rank 0 alone evaluates and
    writes checkpoints; pruning masks are taken from rank 0. ``should_stop`` is polled after every
    iteration (a preemption signal): the trainer then checkpoints and raises :class:`Preempted`.
    """

    def __init__(self, model: nn.Module, train_set: Dataset, val_set: Dataset, cfg: TrainConfig,
                 pruner=None, checkpoint: str | os.PathLike | None = None, progress: bool = True,
                 on_prune: Callable | None = None, dist: DistEnv = SINGLE,
                 should_stop: Callable[[], bool] | None = None,
                 on_epoch: Callable[[dict], None] | None = None) -> None:
        self.model, self.train_set, self.val_set, self.cfg = model, train_set, val_set, cfg
        self.pruner = pruner
        self.checkpoint = Path(checkpoint) if checkpoint else None
        self.progress = progress and dist.is_main
        self.on_prune = on_prune
        self.dist = dist
        self.should_stop = should_stop
        self.on_epoch = on_epoch
        if cfg.batch_size % (dist.world * cfg.micro_batches):
            raise ValueError(f"batch_size={cfg.batch_size} must split evenly over {dist.world} process(es) "
                             f"x {cfg.micro_batches} micro-batch(es)")
        self.net = model
        if dist.enabled:
            from torch.nn.parallel import DistributedDataParallel
            self.net = DistributedDataParallel(model)
        self.optimizer = torch.optim.SGD(param_groups(model, cfg.weight_decay), lr=cfg.lr,
                                         momentum=cfg.momentum, nesterov=cfg.nesterov)
        self.per_epoch = len(train_set) // cfg.batch_size
        if cfg.max_iters_per_epoch:
            self.per_epoch = min(self.per_epoch, cfg.max_iters_per_epoch)
        if self.per_epoch < 1:
            raise ValueError(f"training set of {len(train_set)} samples gives no batch of {cfg.batch_size}")
        self.total = int(round(cfg.epochs * self.per_epoch))
        self.state = TrainState()

    # ------------------------------------------------------------------ checkpoints
    def save(self) -> None:
        if self.checkpoint is None or not self.dist.is_main:
            return
        blob = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "state": asdict(self.state), "rng": torch.get_rng_state(), "config": asdict(self.cfg),
                "pruner": self.pruner.state_dict() if self.pruner is not None else None}
        atomic_write(self.checkpoint, lambda tmp: torch.save(blob, tmp))

    def try_resume(self) -> bool:
        """Continue from ``checkpoint`` if it exists. Returns whether it did."""
        if self.checkpoint is None or not self.checkpoint.exists():
            return False
        blob = torch.load(self.checkpoint, map_location="cpu", weights_only=False)
        if blob["config"] != asdict(self.cfg):
            raise ValueError(f"checkpoint {self.checkpoint} was made with other training settings; "
                             "delete it or rerun with the same config")
        self.model.load_state_dict(blob["model"])
        self.optimizer.load_state_dict(blob["optimizer"])
        self.state = TrainState(**blob["state"])
        torch.set_rng_state(blob["rng"])
        if self.pruner is not None and blob["pruner"] is not None:
            self.pruner.load_state_dict(blob["pruner"])
            self.pruner.applier.apply()
        return True

    # ------------------------------------------------------------------ training
    def _order(self, epoch: int) -> list[list[int]]:
        g = torch.Generator().manual_seed(self.cfg.seed * 100_003 + epoch)
        perm = torch.randperm(len(self.train_set), generator=g).tolist()
        bs = self.cfg.batch_size
        return [perm[i * bs:(i + 1) * bs] for i in range(self.per_epoch)]

    def fit(self) -> TrainState:
        torch.set_num_threads(self.cfg.threads)
        st = self.state
        epochs = math.ceil(self.total / self.per_epoch)
        while st.iteration < self.total:
            order = self._order(st.epoch)
            todo = range(st.batch, min(len(order), st.batch + self.total - st.iteration))
            bar = progress_bar(todo, enabled=self.progress, desc=f"epoch {st.epoch + 1}/{epochs}", leave=False)
            self.model.train()
            t0 = time.perf_counter()
            for b in bar:
                reseed_dataset(self.train_set, (self.cfg.seed * 1_000_003 + st.epoch) * 100_003 + b)
                x, y = fetch_batch(self.train_set, order[b])
                if self.dist.enabled:  # this rank's contiguous shard of the global batch
                    n = len(y) // self.dist.world
                    x, y = x[self.dist.rank * n:(self.dist.rank + 1) * n], y[self.dist.rank * n:(self.dist.rank + 1) * n]
                self._train_step(x, y, bar)
                if self.cfg.checkpoint_every and st.iteration % self.cfg.checkpoint_every == 0:
                    self.save()
                if self.should_stop is not None and broadcast(self.dist, bool(self.should_stop())):
                    st.train_seconds += time.perf_counter() - t0
                    self.save()
                    raise Preempted(f"stopped at iteration {st.iteration}; checkpoint {self.checkpoint}")
            st.train_seconds += time.perf_counter() - t0
            st.epoch += 1
            st.batch = 0
            if self.dist.is_main:
                metrics = evaluate(self.model, self.val_set, self.cfg.eval_batch_size)
                st.history.append({"epoch": st.epoch, "iteration": st.iteration, **metrics})
                if self.on_epoch:
                    self.on_epoch(st.history[-1])
                log.info(f"epoch {st.epoch}: top-1 {metrics['top1']:.2f}%  loss {metrics['loss']:.4f}")
                self.save()
            barrier(self.dist)
        return st

    def _train_step(self, x: torch.Tensor, y: torch.Tensor, bar) -> None:
        st = self.state
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(self.cfg, st.iteration, self.total, self.per_epoch)
        self.optimizer.zero_grad(set_to_none=True)
        k = self.cfg.micro_batches
        total = 0.0
        for i, (xm, ym) in enumerate(zip(x.chunk(k), y.chunk(k))):
            # DDP averages gradients only on the last micro-batch's backward
            sync = nullcontext() if i == k - 1 or not self.dist.enabled else self.net.no_sync()
            with sync:
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.cfg.amp):
                    out = self.net(xm)
                loss = F.cross_entropy(out.float(), ym, label_smoothing=self.cfg.label_smoothing) / k
                if not torch.isfinite(loss):
                    raise FloatingPointError(
                        f"the loss became {loss.item()} at epoch {st.epoch + 1}, iteration {st.iteration} "
                        f"(learning rate {self.optimizer.param_groups[0]['lr']:.3g} too high?); nothing was "
                        "written for this run")
                loss.backward()
            total += float(loss.detach())
        t0 = time.perf_counter()
        if self.pruner is not None:
            self.pruner.after_backward()
        st.prune_seconds += time.perf_counter() - t0
        self.optimizer.step()
        t0 = time.perf_counter()
        entry = self.pruner.after_step(self.optimizer) if self.pruner is not None else None
        if entry is not None and self.dist.enabled:  # one decision for all ranks: rank 0's
            self.pruner.set_masks(broadcast(self.dist, dict(self.pruner.masks.items())))
            self.pruner.applier.clear_optimizer_state(self.optimizer)
        st.prune_seconds += time.perf_counter() - t0
        st.iteration += 1
        st.batch += 1
        if entry is not None:
            if self.on_prune:
                self.on_prune(entry)
            self.save()
        bar.set_postfix(loss=f"{total:.3f}", refresh=False)
