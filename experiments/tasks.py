"""What the suite trains and how it scores it: image classification or object detection.

A :class:`Task` is the small part of a job that depends on the kind of model: its loss on a batch,
how a model is scored on the validation set (and by pruners that score candidates), and which
number is the job's headline metric. Everything else (data order, schedule, pruning hooks,
checkpoints, latency, slimming) is shared; labels reach the device through
:meth:`experiments.runtime.Runtime.labels` (tensors, or detection targets). The task follows from the model: ``mmdet:<name>`` is
detection, every other model classification.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from halp.evaluation import collate_of, evaluate


@dataclass(frozen=True)
class Task:
    """``loss(net, images, labels, label_smoothing)``; ``evaluate(model, data, batch_size,
    device=, autocast=, memory_format=)`` -> metrics including ``metric``, the headline metric's
    key (higher is better), shown as ``label``."""

    name: str
    metric: str
    label: str
    loss: Callable[..., Tensor]
    evaluate: Callable[..., dict]
    score: Callable[[nn.Module, Dataset, int], float] | None = None  # for pruners that score models (None: top-1)

    def describe(self, metrics: dict) -> str:
        extra = f"  loss {metrics['loss']:.4f}" if "loss" in metrics else ""
        return f"{self.label} {metrics[self.metric]:.2f}{extra}"


def _cls_loss(net: nn.Module, x: Tensor, y: Tensor, label_smoothing: float = 0.0) -> Tensor:
    return F.cross_entropy(net(x).float(), y, label_smoothing=label_smoothing)


CLASSIFICATION = Task("classification", "top1", "top-1 (%)", _cls_loss, evaluate)


def _det_loss(net: nn.Module, x: Tensor, targets: list, label_smoothing: float = 0.0) -> Tensor:
    return net(x, targets).float()  # through forward, so that DDP sees it


def _det_evaluate(model: nn.Module, data: Dataset | Sequence, batch_size: int = 64, progress: bool = False,
                  device: torch.device | str | None = None, autocast: torch.dtype | None = None,
                  memory_format: torch.memory_format = torch.contiguous_format) -> dict:
    from halp.detection.evaluation import eval_mode_for, voc_map

    base = data
    while not hasattr(base, "classes") and hasattr(base, "dataset"):
        base = base.dataset
    if isinstance(data, Dataset):
        from torch.utils.data import DataLoader

        data = DataLoader(data, batch_size=batch_size, collate_fn=collate_of(data))
    return voc_map(model, data, base.classes, eval_mode_for(getattr(base, "split", "VOC2007/test")),
                   device=device, autocast=autocast, memory_format=memory_format, progress=progress)


def map50(model: nn.Module, data: Dataset, batch_size: int) -> float:
    """mAP@0.5 (%) of a detector on ``data``: the quality EagleEye maximises for detection jobs
    (module level: scoring processes receive it pickled by name)."""
    return _det_evaluate(model, data, min(batch_size, 64))["map50"]


DETECTION = Task("detection", "map50", "mAP@0.5 (%)", _det_loss, _det_evaluate, score=map50)

TASKS = {t.name: t for t in (CLASSIFICATION, DETECTION)}


def task_for(model_name: str) -> Task:
    """The task of the model ``model_name`` names."""
    return DETECTION if model_name.startswith("mmdet:") else CLASSIFICATION


def split_labels(y: Any, k: int) -> list:
    """``y`` (a label tensor or a list of per-image targets) in ``k`` consecutive chunks."""
    if isinstance(y, Tensor):
        return list(y.chunk(k))
    n = len(y) // k
    return [y[i * n:(i + 1) * n] for i in range(k)]
