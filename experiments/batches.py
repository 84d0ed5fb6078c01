"""The trainer's batches: the same images and augmentation whichever process loads them.

Batch ``b`` of epoch ``e`` is fixed by the seed (a permutation per epoch), and its augmentation is
reseeded from ``(seed, e, b)`` when it is fetched, so a resumed run, a run with loader workers and a
run without them see identical batches. Under DDP each rank loads only its own shards of the global
batch (loading all of it would decode ``world`` times the images), and each shard is reseeded on its
own: a job of N ranks therefore sees exactly the batches of one process with N micro-batches, and
so takes the same pruning decisions.
"""
from __future__ import annotations

import multiprocessing
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from halp.evaluation import collate_of, fetch_batch, reseed_dataset


@dataclass(frozen=True)
class LoaderConfig:
    """How batches are loaded (never which ones): the data config's loader knobs."""

    workers: int = 0
    pin_memory: bool = True       # only where it helps: batches bound for a CUDA device
    persistent_workers: bool = True
    prefetch_factor: int = 2

    def kwargs(self, pin: bool) -> dict:
        if self.workers == 0:
            return {"num_workers": 0, "pin_memory": pin and self.pin_memory}
        # fork where it exists: a process started by ``spawn`` (torch.multiprocessing.spawn) would
        # otherwise spawn its workers too, re-importing its main module and pickling the dataset
        # (workers never touch CUDA, so forking a GPU process is safe for them)
        context = multiprocessing.get_context("fork") if "fork" in multiprocessing.get_all_start_methods() else None
        return {"num_workers": self.workers, "pin_memory": pin and self.pin_memory,
                "persistent_workers": self.persistent_workers, "prefetch_factor": self.prefetch_factor,
                "multiprocessing_context": context}


def batch_seed(seed: int, epoch: int, batch: int, shard: int = 0, shards: int = 1) -> int:
    """Augmentation seed of one shard of a global batch (a whole batch keeps its historic seed)."""
    base = (seed * 1_000_003 + epoch) * 100_003 + batch
    return base if shards == 1 else base * 1_009 + shard + 1


class EpochBatches(Dataset):
    """Item ``(epoch, b)``: this rank's part of global batch ``b`` of ``epoch``, as one
    ``(images, labels)`` pair (its shards concatenated, in shard order).

    ``shards`` splits each global batch (``world x micro_batches``); ``mine`` are this rank's
    shard indices."""

    def __init__(self, dataset: Dataset, batch_size: int, seed: int, shards: int = 1,
                 mine: Sequence[int] = (0,)) -> None:
        if batch_size % shards:
            raise ValueError(f"batch_size={batch_size} does not split into {shards} equal shards")
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.shards, self.mine = shards, list(mine)
        self._epoch, self._perm = -1, None

    def order(self, epoch: int) -> list[int]:
        """The sample order of ``epoch`` (a seeded permutation, cached for the current epoch)."""
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._perm, self._epoch = torch.randperm(len(self.dataset), generator=g).tolist(), epoch
        return self._perm

    def indices(self, epoch: int, batch: int) -> list[int]:
        bs = self.batch_size
        return self.order(epoch)[batch * bs:(batch + 1) * bs]

    def __len__(self) -> int:
        return len(self.dataset) // self.batch_size

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        epoch, batch = key
        idx = self.indices(epoch, batch)
        m = len(idx) // self.shards
        xs, ys = [], []
        for j in self.mine:
            seed = batch_seed(self.seed, epoch, batch, j, self.shards)
            reseed_dataset(self.dataset, seed)  # in-memory datasets augment from their own generator
            with torch.random.fork_rng(devices=[]):  # file datasets' transforms draw from torch's
                torch.manual_seed(seed)
                x, y = fetch_batch(self.dataset, idx[j * m:(j + 1) * m])
            xs.append(x)
            ys.append(y)
        if len(xs) == 1:
            return xs[0], ys[0]
        return torch.cat(xs), (torch.cat(ys) if isinstance(ys[0], torch.Tensor) else [t for y in ys for t in y])


def batch_iterator(source: EpochBatches, keys: Sequence[tuple[int, int]], loader: LoaderConfig,
                   pin: bool) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``source[k]`` for every key in order: in this process (``workers=0``) or prefetched by
    ``loader.workers`` worker processes (each batch is still reseeded from its key)."""
    if loader.workers == 0 or not keys:
        return (source[k] for k in keys)
    kw = loader.kwargs(pin)
    kw["persistent_workers"] = False  # one iterator spans the whole fit; nothing to keep alive after it
    return iter(DataLoader(source, batch_size=None, sampler=list(keys), **kw))


def eval_loader(dataset: Dataset, batch_size: int, loader: LoaderConfig, pin: bool) -> Iterable:
    """Evaluation batches of ``dataset``; with workers, one loader whose workers live across epochs."""
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_of(dataset),
                      **loader.kwargs(pin))
