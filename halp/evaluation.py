"""Evaluation and batch access for code that looks at data outside a training loop.

Pruners that score candidates on data (EagleEye's adaptive BN and holdout accuracy) and the
experiment suite's trainer share these, so both read a dataset the same way: whole batches through
``__getitems__`` where the dataset has it, augmentation reseeded for reproducibility.
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, default_collate

from .progress import progress_bar


@torch.no_grad()
def evaluate(model: nn.Module, data: Dataset | Iterable, batch_size: int = 512, progress: bool = False,
             device: torch.device | str | None = None, autocast: torch.dtype | None = None,
             memory_format: torch.memory_format = torch.contiguous_format) -> dict:
    """Top-1 / top-5 accuracy (%) and mean loss on ``data``: a dataset (read in batches of
    ``batch_size``) or an iterable of ``(images, labels)`` batches, e.g. a DataLoader with workers.

    Batches go to ``device`` (default: where the model's parameters are); ``autocast`` runs the
    forward passes in that reduced precision. Counts are summed on the device and read once, so a
    GPU is not synchronised after every batch."""
    model.eval()
    if device is None:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
    device = torch.device(device)
    batches = DataLoader(data, batch_size=batch_size) if isinstance(data, Dataset) else data
    cast = torch.autocast(device.type, dtype=autocast) if autocast is not None else nullcontext()
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss, top-1, top-5
    total = 0
    for x, y in progress_bar(batches, enabled=progress, desc="eval", leave=False):
        x = x.to(device, non_blocking=True).contiguous(memory_format=memory_format) if x.dim() == 4 else x.to(device)
        y = y.to(device, non_blocking=True)
        with cast:
            out = model(x)
        out = out.float()
        top = out.topk(min(5, out.shape[1]), dim=1).indices
        sums += torch.stack([F.cross_entropy(out, y, reduction="sum").double(),
                             (top[:, 0] == y).sum().double(), (top == y[:, None]).any(1).sum().double()])
        total += len(y)
    loss, correct1, correct5 = sums.tolist()
    return {"top1": 100.0 * correct1 / total, "top5": 100.0 * correct5 / total, "loss": loss / total}


def reseed_dataset(dataset: Dataset, seed: int) -> None:
    """Reseed the augmentation of ``dataset`` (or of the dataset a Subset wraps), if it has one."""
    while dataset is not None:
        if hasattr(dataset, "reseed"):
            dataset.reseed(seed)
            return
        dataset = getattr(dataset, "dataset", None)


def collate_of(dataset: Dataset) -> Callable[[list], Any]:
    """How ``dataset`` (or the dataset a Subset wraps) batches its items: its own ``collate``
    (detection sets: images stacked, targets listed) or torch's default."""
    while dataset is not None:
        if callable(getattr(dataset, "collate", None)):
            return dataset.collate
        dataset = getattr(dataset, "dataset", None)
    return default_collate


def fetch_batch(dataset: Dataset, indices: list[int]) -> tuple[torch.Tensor, Any]:
    items = dataset.__getitems__(indices) if hasattr(dataset, "__getitems__") else [dataset[i] for i in indices]
    return collate_of(dataset)(items)
