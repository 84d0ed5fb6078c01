"""A plain classification training loop with HALP's hooks, checkpoints and exact resume.

SGD with momentum, cosine learning rate per iteration after a linear warm-up, label smoothing,
weight decay only on conv/linear weights (BatchNorm parameters and biases are found by module
type, not by name). Device, mixed precision and memory format come from one
:class:`~experiments.runtime.Runtime`; batches come from :mod:`experiments.batches` (fixed by the
seed, optionally prefetched by loader workers). A checkpoint stores the position and the RNG
states, so a resumed run continues with exactly the batches and random numbers it would have had.
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
from torch import nn
from torch.utils.data import Dataset

from halp.fileio import atomic_write
from halp.progress import progress_bar

from .batches import EpochBatches, LoaderConfig, batch_iterator, eval_loader
from .distributed import SINGLE, DistEnv, barrier, broadcast
from .runtime import CPU, Runtime
from .tasks import CLASSIFICATION, Task, split_labels

log = logging.getLogger(__name__)


SCHEDULES = ("cosine", "cosine_epoch", "step")


@dataclass
class TrainConfig:
    epochs: float = 1.0
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    warmup_epochs: float = 0.0
    label_smoothing: float = 0.0
    threads: int = 2
    seed: int = 0
    batch_size: int = 128
    eval_batch_size: int = 512
    max_iters_per_epoch: int | None = None
    checkpoint_every: int = 0  # iterations; 0 = only at epoch ends and pruning steps
    micro_batches: int = 1  # split each (per-process) batch and accumulate gradients
    schedule: str = "cosine"  # cosine (per iteration) | cosine_epoch (per epoch, the paper's) | step (Taylor's)
    lr_batch: int | None = None  # lr is per this many images: scaled by batch_size / lr_batch (the paper: 1024)
    step_epochs: float = 10.0
    gamma: float = 0.1

    def __post_init__(self) -> None:
        if self.epochs <= 0 or self.lr <= 0 or self.batch_size < 1 or self.threads < 1:
            raise ValueError("epochs, lr, batch_size and threads must be positive")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if self.lr_batch is not None and self.lr_batch < 1:
            raise ValueError(f"lr_batch must be a positive number of images, got {self.lr_batch}")
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


def base_lr(cfg: TrainConfig) -> float:
    """The peak learning rate: ``lr``, scaled linearly by the batch when ``lr_batch`` is set."""
    return cfg.lr * cfg.batch_size / cfg.lr_batch if cfg.lr_batch else cfg.lr


def lr_at(cfg: TrainConfig, iteration: int, total: int, per_epoch: int) -> float:
    lr = base_lr(cfg)
    if cfg.schedule == "cosine_epoch":  # constant within an epoch; linear warm-up over whole epochs
        epoch, epochs, warm = iteration // per_epoch, math.ceil(total / per_epoch), int(cfg.warmup_epochs)
        if epoch < warm:
            return lr * (epoch + 1) / warm
        return 0.5 * lr * (1 + math.cos(math.pi * min(1.0, (epoch - warm) / max(1, epochs - warm))))
    warm = int(cfg.warmup_epochs * per_epoch)
    if iteration < warm:
        return lr * (iteration + 1) / warm
    if cfg.schedule == "step":
        return lr * cfg.gamma ** int(iteration / (cfg.step_epochs * per_epoch))
    progress = (iteration - warm) / max(1, total - warm)
    return 0.5 * lr * (1 + math.cos(math.pi * min(1.0, progress)))


@dataclass
class TrainState:
    epoch: int = 0
    batch: int = 0  # batches done in the current epoch
    iteration: int = 0
    history: list[dict] = field(default_factory=list)
    train_seconds: float = 0.0
    prune_seconds: float = 0.0
    images: int = 0                  # training images this rank computed on
    data_wait_seconds: float = 0.0   # of train_seconds, waiting for the next batch
    eval_images: int = 0
    eval_seconds: float = 0.0
    skipped_steps: int = 0           # fp16 steps the loss scaler skipped (inf/NaN gradients)
    peak_memory_mb: float = 0.0

    def throughput(self) -> dict:
        """Images/s per rank (training, evaluation), the fraction of training time spent waiting
        for data, and peak memory. Training time leaves out the pruning steps (``prune_seconds``):
        on a GPU an exact knapsack step can outlast many iterations and would hide the loader's rate."""
        busy = self.train_seconds - self.prune_seconds
        return {"train_images_per_s": self.images / busy if busy > 0 else None,
                "eval_images_per_s": self.eval_images / self.eval_seconds if self.eval_seconds else None,
                "data_wait_fraction": self.data_wait_seconds / busy if busy > 0 else None,
                "peak_memory_mb": self.peak_memory_mb, "skipped_steps": self.skipped_steps}


class Preempted(Exception):
    """Training stopped at an iteration boundary because ``should_stop`` said so; the checkpoint
    holds the state at that iteration."""


class Trainer:
    """Trains ``model`` on ``train_set``; ``pruner`` (optional) gets the pruner hooks.

    ``runtime`` places the model, batches, loss and evaluation on one device in one precision;
    ``loader`` sets how batches are loaded (workers, pinned memory), never which. With ``dist``
    (several processes, see ``experiments.distributed``) each rank loads and trains on its own
    shards of the same global batch under DDP; that equals one process with ``micro_batches =
    world`` (same batches, same gradients up to summation order). Rank 0 alone evaluates and writes
    checkpoints; pruning masks are taken from rank 0. ``should_stop`` is polled after every
    iteration (a preemption signal): the trainer then checkpoints and raises :class:`Preempted`.
    """

    def __init__(self, model: nn.Module, train_set: Dataset, val_set: Dataset, cfg: TrainConfig,
                 pruner=None, checkpoint: str | os.PathLike | None = None, progress: bool = True,
                 on_prune: Callable | None = None, dist: DistEnv = SINGLE,
                 should_stop: Callable[[], bool] | None = None,
                 on_epoch: Callable[[dict], None] | None = None, runtime: Runtime = CPU,
                 loader: LoaderConfig = LoaderConfig(), task: Task = CLASSIFICATION) -> None:
        self.model, self.train_set, self.val_set, self.cfg = model, train_set, val_set, cfg
        self.pruner = pruner
        self.checkpoint = Path(checkpoint) if checkpoint else None
        self.progress = progress and dist.is_main
        self.on_prune = on_prune
        self.dist = dist
        self.should_stop = should_stop
        self.on_epoch = on_epoch
        self.runtime, self.loader, self.task = runtime, loader, task
        shards = dist.world * cfg.micro_batches
        if cfg.batch_size % shards:
            raise ValueError(f"batch_size={cfg.batch_size} must split evenly over {dist.world} process(es) "
                             f"x {cfg.micro_batches} micro-batch(es)")
        runtime.model(model)  # in place: the graph and the pruner keep their module references
        self.net = model
        if dist.enabled:
            from torch.nn.parallel import DistributedDataParallel
            ids = [runtime.device.index] if runtime.is_cuda else None  # CUDA only: one GPU per rank
            self.net = DistributedDataParallel(model, device_ids=ids)
        self.optimizer = torch.optim.SGD(param_groups(model, cfg.weight_decay), lr=base_lr(cfg),
                                         momentum=cfg.momentum, nesterov=cfg.nesterov)
        self.scaler = runtime.grad_scaler()
        self.per_epoch = len(train_set) // cfg.batch_size
        if cfg.max_iters_per_epoch:
            self.per_epoch = min(self.per_epoch, cfg.max_iters_per_epoch)
        if self.per_epoch < 1:
            raise ValueError(f"training set of {len(train_set)} samples gives no batch of {cfg.batch_size}")
        self.total = int(round(cfg.epochs * self.per_epoch))
        k = cfg.micro_batches
        self.batches = EpochBatches(train_set, cfg.batch_size, cfg.seed, shards,
                                    range(dist.rank * k, (dist.rank + 1) * k))
        self._val = None
        self.state = TrainState()

    # ------------------------------------------------------------------ checkpoints
    def save(self) -> None:
        if self.checkpoint is None or not self.dist.is_main:
            return
        blob = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "state": asdict(self.state), "rng": torch.get_rng_state(), "config": asdict(self.cfg),
                "pruner": self.pruner.state_dict() if self.pruner is not None else None,
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "cuda_rng": torch.cuda.get_rng_state_all() if self.runtime.is_cuda else None}
        atomic_write(self.checkpoint, lambda tmp: torch.save(blob, tmp))

    def try_resume(self) -> bool:
        """Continue from ``checkpoint`` if it exists. Returns whether it did."""
        if self.checkpoint is None or not self.checkpoint.exists():
            return False
        # read onto the CPU: RNG states must stay CPU tensors, and load_state_dict copies the
        # weights and the optimizer state to wherever the model now lives
        blob = torch.load(self.checkpoint, map_location="cpu", weights_only=False)
        if blob["config"] != asdict(self.cfg):
            raise ValueError(f"checkpoint {self.checkpoint} was made with other training settings; "
                             "delete it or rerun with the same config")
        self.model.load_state_dict(blob["model"])
        self.optimizer.load_state_dict(blob["optimizer"])
        self.state = TrainState(**blob["state"])
        torch.set_rng_state(blob["rng"])
        if self.scaler is not None and blob.get("scaler"):
            self.scaler.load_state_dict(blob["scaler"])
        if self.runtime.is_cuda and blob.get("cuda_rng"):  # CUDA only
            torch.cuda.set_rng_state_all(blob["cuda_rng"])
        if self.pruner is not None and blob["pruner"] is not None:
            self.pruner.load_state_dict(blob["pruner"])
            self.pruner.applier.apply()
        return True

    # ------------------------------------------------------------------ training
    def evaluate(self) -> dict:
        """Validation metrics of the model as it is now, on the trainer's device and precision."""
        if self._val is None:  # with workers: one loader, its workers kept across epochs
            self._val = (eval_loader(self.val_set, self.cfg.eval_batch_size, self.loader, self.runtime.is_cuda)
                         if self.loader.workers else self.val_set)
        t0 = time.perf_counter()
        rt = self.runtime
        metrics = self.task.evaluate(self.model, self._val, self.cfg.eval_batch_size, device=rt.device,
                                     autocast=rt.amp_dtype, memory_format=rt.memory_format)
        self.state.eval_seconds += time.perf_counter() - t0
        self.state.eval_images += len(self.val_set)
        return metrics

    def fit(self) -> TrainState:
        torch.set_num_threads(self.cfg.threads)
        st = self.state
        epochs = math.ceil(self.total / self.per_epoch)
        keys, e, b = [], st.epoch, st.batch  # every remaining (epoch, batch), in order
        while st.iteration + len(keys) < self.total:
            keys.append((e, b))
            e, b = (e + 1, 0) if b + 1 == self.per_epoch else (e, b + 1)
        batches = batch_iterator(self.batches, keys, self.loader, self.runtime.is_cuda)
        while st.iteration < self.total:
            todo = range(st.batch, min(self.per_epoch, st.batch + self.total - st.iteration))
            bar = progress_bar(todo, enabled=self.progress, desc=f"epoch {st.epoch + 1}/{epochs}", leave=False)
            self.model.train()
            t0 = time.perf_counter()
            for _ in bar:
                w0 = time.perf_counter()
                x, y = next(batches)
                st.data_wait_seconds += time.perf_counter() - w0
                self._train_step(self.runtime.batch(x), self.runtime.labels(y), bar)
                st.images += len(y)
                if self.cfg.checkpoint_every and st.iteration % self.cfg.checkpoint_every == 0:
                    self.save()
                if self.should_stop is not None and broadcast(self.dist, bool(self.should_stop())):
                    st.train_seconds += time.perf_counter() - t0
                    self.save()
                    raise Preempted(f"stopped at iteration {st.iteration}; checkpoint {self.checkpoint}")
            st.train_seconds += time.perf_counter() - t0
            st.peak_memory_mb = max(st.peak_memory_mb, self.runtime.peak_memory_mb())
            st.epoch += 1
            st.batch = 0
            if self.dist.is_main:
                metrics = self.evaluate()
                st.history.append({"epoch": st.epoch, "iteration": st.iteration, **metrics})
                if self.on_epoch:
                    self.on_epoch(st.history[-1])
                log.info(f"epoch {st.epoch}: {self.task.describe(metrics)}")
                self.save()
            barrier(self.dist)
        return st

    def _train_step(self, x: torch.Tensor, y: torch.Tensor | list, bar) -> None:
        st = self.state
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(self.cfg, st.iteration, self.total, self.per_epoch)
        self.optimizer.zero_grad(set_to_none=True)
        k = self.cfg.micro_batches
        losses = []
        for i, (xm, ym) in enumerate(zip(x.chunk(k), split_labels(y, k))):
            # DDP averages gradients only on the last micro-batch's backward
            sync = nullcontext() if i == k - 1 or not self.dist.enabled else self.net.no_sync()
            with sync:
                with self.runtime.autocast():
                    loss = self.task.loss(self.net, xm, ym, self.cfg.label_smoothing) / k
                (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
            losses.append(loss.detach())
        total = float(torch.stack(losses).sum())  # one synchronisation per iteration
        if not math.isfinite(total) and self.scaler is None:
            raise FloatingPointError(
                f"the loss became {total} at epoch {st.epoch + 1}, iteration {st.iteration} "
                f"(learning rate {self.optimizer.param_groups[0]['lr']:.3g} too high?); nothing was "
                "written for this run")
        t0 = time.perf_counter()
        finite = True
        if self.scaler is not None:  # CUDA only: saliency must see the true, unscaled gradients
            self.scaler.unscale_(self.optimizer)
            grads = [p.grad for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
            finite = bool(torch.stack([torch.isfinite(g).all() for g in grads]).all()) if grads else True
            st.skipped_steps += not finite
        if self.pruner is not None and finite:
            self.pruner.after_backward()
        st.prune_seconds += time.perf_counter() - t0
        if self.scaler is not None:
            self.scaler.step(self.optimizer)  # skips the step itself when gradients overflowed
            self.scaler.update()
        else:
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
