"""VOC mAP@0.5 of a :class:`~halp.detection.ssd.RawSSD`, computed by mmdet's ``VOCMetric``.

VOC2007's test set is scored with the 11-point interpolated AP (as the paper and mmdet do); any
other set with the area under the precision-recall curve. Difficult objects are ignored: a
detection matching one neither counts as a hit nor as a false positive.
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Iterable, Sequence

import torch
from torch import Tensor

from ..progress import progress_bar
from .ssd import quiet_mmengine

__all__ = ["voc_map", "eval_mode_for"]


def eval_mode_for(test_split: str) -> str:
    """``'11points'`` for VOC2007's test split, ``'area'`` for any other."""
    return "11points" if test_split.split("/")[0] == "VOC2007" else "area"


def _instances(boxes: Tensor, labels: Tensor):
    from mmengine.structures import InstanceData

    inst = InstanceData()
    inst.bboxes, inst.labels = boxes.detach().cpu().float().reshape(-1, 4), labels.detach().cpu().long()
    return inst


@torch.no_grad()
def voc_map(model, batches: Iterable, classes: Sequence[str], eval_mode: str = "11points",
            device: torch.device | str | None = None, autocast: torch.dtype | None = None,
            memory_format: torch.memory_format = torch.contiguous_format, progress: bool = False,
            score_thr: float | None = None) -> dict:
    """mAP@0.5 (in %) of ``model`` over ``batches`` of ``(images, targets)``, and the per-class AP.

    ``model`` is a RawSSD (or anything with its ``predict``); ``targets`` hold ``boxes``,
    ``labels`` and ``difficult`` per image."""
    from mmdet.evaluation import VOCMetric

    model.eval()
    if device is None:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
    device = torch.device(device)
    cast = torch.autocast(device.type, dtype=autocast) if autocast is not None else nullcontext()
    metric = VOCMetric(iou_thrs=0.5, eval_mode=eval_mode)
    metric.dataset_meta = {"classes": tuple(classes)}
    images = 0
    for x, targets in progress_bar(batches, enabled=progress, desc="mAP", leave=False):
        x = x.to(device, non_blocking=True).contiguous(memory_format=memory_format)
        with cast:
            found = model.predict(x, score_thr=score_thr)
        samples = []
        for det, t in zip(found, targets):
            hard = t.get("difficult", torch.zeros(len(t["labels"]), dtype=torch.bool)).bool()
            samples.append({"gt_instances": _instances(t["boxes"][~hard], t["labels"][~hard]),
                            "ignored_instances": _instances(t["boxes"][hard], t["labels"][hard]),
                            "pred_instances": _instances(det["boxes"], det["labels"])})
            samples[-1]["pred_instances"].scores = det["scores"].detach().cpu().float()
        metric.process({}, samples)
        images += len(x)
    if not images:
        raise ValueError("no images to evaluate")
    with quiet_mmengine():  # eval_map prints a per-class table
        from mmdet.evaluation.functional import eval_map

        mean_ap = metric.compute_metrics(metric.results)["mAP"]
        gts, preds = zip(*metric.results)  # the per-class APs behind it, from the same function
        _, per_class = eval_map(list(preds), list(gts), iou_thr=0.5, dataset=list(classes), logger="silent",
                                eval_mode=eval_mode, use_legacy_coordinate=True)
    return {"map50": 100.0 * float(mean_ap), "images": images,
            "ap50_per_class": {c: 100.0 * float(r["ap"]) for c, r in zip(classes, per_class)}}
