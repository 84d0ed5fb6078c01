"""Make mmdet importable without compiled mmcv ops.

mmdet 3.x imports ``mmcv.ops`` (NMS, RoI ops, deformable convs...) whenever it builds a model, and
``mmcv.ops`` needs the compiled extension ``mmcv._ext``. ``mmcv-lite`` (the only pure wheel) has no
extension, and compiling full mmcv takes ~10-75 min here. SSD needs only NMS at inference, so when
the extension is missing we register a small stand-in as ``mmcv.ops``: NMS and RoI align/pool map
to ``torchvision.ops``; every other op is a placeholder that says, when used, that it needs compiled
mmcv. With a real mmcv (GPU clusters install OpenMMLab's wheels) nothing is replaced.
"""
from __future__ import annotations

import importlib
import sys
import types
from typing import Any

import torch
import torchvision.ops as tvo
from torch import Tensor, nn

__all__ = ["ensure_mmcv_ops", "has_compiled_mmcv", "nms", "batched_nms", "STANDIN_NAME"]

STANDIN_NAME = "halp-torchvision-standin"
# submodules mmdet imports from directly (``from mmcv.ops.nms import batched_nms``)
_SUBMODULES = ("nms", "roi_align", "roi_pool", "carafe", "merge_cells", "modulated_deform_conv",
               "deform_conv", "point_sample", "focal_loss", "multi_scale_deform_attn", "masked_conv")


def has_compiled_mmcv() -> bool:
    """Whether mmcv's compiled ops (``mmcv._ext``) can be loaded."""
    try:
        importlib.import_module("mmcv._ext")
        return True
    except Exception:  # ImportError, or an OSError from a wheel built for another torch
        return False


def nms(boxes: Tensor, scores: Tensor, iou_threshold: float, offset: int = 0, score_threshold: float = 0.0,
        max_num: int = -1) -> tuple[Tensor, Tensor]:
    """mmcv's ``nms`` contract: ``(dets (n, 5) = boxes + score, kept indices)``, by score descending."""
    if offset not in (0,):
        raise NotImplementedError("the torchvision stand-in for mmcv.ops.nms supports offset=0 only")
    idx = torch.arange(len(scores), device=scores.device)
    if score_threshold > 0:
        valid = scores > score_threshold
        boxes, scores, idx = boxes[valid], scores[valid], idx[valid]
    keep = tvo.nms(boxes.float(), scores.float(), float(iou_threshold))  # sorted by score, descending
    if max_num > 0:
        keep = keep[:max_num]
    return torch.cat([boxes[keep], scores[keep, None]], dim=1), idx[keep]


def batched_nms(boxes: Tensor, scores: Tensor, idxs: Tensor, nms_cfg: dict | None,
                class_agnostic: bool = False) -> tuple[Tensor, Tensor]:
    """mmcv's ``batched_nms`` contract (NMS within each ``idxs`` class) on torchvision's NMS.

    Returns ``(dets, keep)``: ``dets`` is ``(n, 5)`` (box, score) by score descending; ``max_num``
    in ``nms_cfg`` truncates. ``nms_cfg=None`` only sorts."""
    if nms_cfg is None:
        scores, order = scores.sort(descending=True)
        return torch.cat([boxes[order], scores[:, None]], -1), order
    cfg = dict(nms_cfg)
    class_agnostic = cfg.pop("class_agnostic", class_agnostic)
    kind = cfg.pop("type", "nms")
    if kind != "nms":
        raise NotImplementedError(f"nms type {kind!r} needs compiled mmcv; the stand-in has plain 'nms'")
    iou = float(cfg.pop("iou_threshold", cfg.pop("iou_thr", 0.5)))
    max_num = int(cfg.pop("max_num", -1))
    cfg.pop("split_thr", None)  # torchvision's batched NMS needs no splitting to save memory
    if boxes.size(-1) != 4:
        raise NotImplementedError("the torchvision stand-in handles axis-aligned boxes (n, 4) only")
    if len(boxes) == 0:
        return boxes.new_zeros((0, 5)), idxs.new_zeros((0,), dtype=torch.long)
    if class_agnostic:
        keep = tvo.nms(boxes.float(), scores.float(), iou)
    else:
        keep = tvo.batched_nms(boxes.float(), scores.float(), idxs, iou)
    if max_num > 0:
        keep = keep[:max_num]
    return torch.cat([boxes[keep], scores[keep, None]], -1), keep


def roi_align(inp: Tensor, rois: Tensor, output_size: Any, spatial_scale: float = 1.0, sampling_ratio: int = 0,
              pool_mode: str = "avg", aligned: bool = True) -> Tensor:
    if pool_mode != "avg":
        raise NotImplementedError("roi_align pool_mode='max' needs compiled mmcv")
    return tvo.roi_align(inp, rois, output_size, spatial_scale, sampling_ratio, aligned)


class RoIAlign(nn.Module):
    def __init__(self, output_size: Any, spatial_scale: float = 1.0, sampling_ratio: int = 0,
                 pool_mode: str = "avg", aligned: bool = True, use_torchvision: bool = False) -> None:
        super().__init__()
        self.output_size, self.spatial_scale = output_size, float(spatial_scale)
        self.sampling_ratio, self.pool_mode, self.aligned = int(sampling_ratio), pool_mode, aligned

    def forward(self, inp: Tensor, rois: Tensor) -> Tensor:
        return roi_align(inp, rois, self.output_size, self.spatial_scale, self.sampling_ratio, self.pool_mode,
                         self.aligned)


class RoIPool(nn.Module):
    def __init__(self, output_size: Any, spatial_scale: float = 1.0) -> None:
        super().__init__()
        self.output_size, self.spatial_scale = output_size, float(spatial_scale)

    def forward(self, inp: Tensor, rois: Tensor) -> Tensor:
        return tvo.roi_pool(inp, rois, self.output_size, self.spatial_scale)


def _missing(name: str) -> type:
    """A placeholder for an op the stand-in lacks: importable (and subclassable), fails when used."""

    def fail(*_: Any, **__: Any) -> None:
        raise NotImplementedError(f"mmcv.ops.{name} needs mmcv's compiled ops (mmcv._ext), which this "
                                  "environment lacks; install full mmcv (see README, detection) to use it")

    return type(name, (nn.Module,), {"__init__": fail, "__module__": "mmcv.ops", "_halp_missing": True})


_MISSING: dict[str, type] = {}


def _placeholder(attr: str) -> type:
    if attr.startswith("__"):  # dunder lookups (copy, pickle, inspect) must fail normally
        raise AttributeError(attr)
    return _MISSING.setdefault(attr, _missing(attr))


_PROVIDED = {"nms": nms, "batched_nms": batched_nms, "roi_align": roi_align, "RoIAlign": RoIAlign,
             "RoIPool": RoIPool}


def _module(name: str) -> types.ModuleType:
    mod = types.ModuleType(name, "halp's torchvision-backed stand-in for mmcv.ops (no compiled mmcv here)")
    mod.__dict__.update(_PROVIDED)
    mod.__getattr__ = _placeholder
    mod.__halp_standin__ = STANDIN_NAME
    return mod


def ensure_mmcv_ops() -> str:
    """Make ``import mmcv.ops`` work: the real ops when compiled mmcv is present, else the stand-in.

    Returns ``"mmcv"`` or :data:`STANDIN_NAME`. Call it before importing mmdet models."""
    if has_compiled_mmcv():
        return "mmcv"
    current = sys.modules.get("mmcv.ops")
    if current is not None and getattr(current, "__halp_standin__", None) == STANDIN_NAME:
        return STANDIN_NAME
    try:
        import mmcv
    except ImportError as e:
        raise ImportError("detection needs mmdet, mmengine and mmcv (or mmcv-lite): "
                          "pip install 'halp[det]'") from e
    root = _module("mmcv.ops")
    sys.modules["mmcv.ops"] = root
    mmcv.ops = root
    for sub in _SUBMODULES:
        mod = _module(f"mmcv.ops.{sub}")
        sys.modules[mod.__name__] = mod
        setattr(root, sub, mod)
    return STANDIN_NAME
