"""Evaluation and batch access for code that looks at data outside a training loop.

Pruners that score candidates on data (EagleEye's adaptive BN and holdout accuracy) and the
experiment suite's trainer share these, so both read a dataset the same way: whole batches through
``__getitems__`` where the dataset has it, augmentation reseeded for reproducibility.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, default_collate

from .progress import progress_bar


@torch.no_grad()
def evaluate(model: nn.Module, dataset: Dataset, batch_size: int = 512, progress: bool = False) -> dict:
    """Top-1 / top-5 accuracy (%) and mean loss on ``dataset``."""
    model.eval()
    correct1 = correct5 = total = 0
    loss = 0.0
    for x, y in progress_bar(DataLoader(dataset, batch_size=batch_size), enabled=progress, desc="eval", leave=False):
        out = model(x)
        loss += float(F.cross_entropy(out, y, reduction="sum"))
        top = out.topk(min(5, out.shape[1]), dim=1).indices
        correct1 += int((top[:, 0] == y).sum())
        correct5 += int((top == y[:, None]).any(1).sum())
        total += len(y)
    return {"top1": 100.0 * correct1 / total, "top5": 100.0 * correct5 / total, "loss": loss / total}


def reseed_dataset(dataset: Dataset, seed: int) -> None:
    """Reseed the augmentation of ``dataset`` (or of the dataset a Subset wraps), if it has one."""
    while dataset is not None:
        if hasattr(dataset, "reseed"):
            dataset.reseed(seed)
            return
        dataset = getattr(dataset, "dataset", None)


def fetch_batch(dataset: Dataset, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    items = dataset.__getitems__(indices) if hasattr(dataset, "__getitems__") else [dataset[i] for i in indices]
    return default_collate(items)
