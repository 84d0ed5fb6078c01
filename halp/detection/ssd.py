"""mmdet SSD detectors as CNNs halp can prune.

:class:`RawSSD` wraps an mmdet single-stage detector so that ``forward(images)`` returns the raw
head outputs (class scores and box deltas of every level, as one flat tuple). That is the network
HALP prices and prunes: the channel graph is traced on it (tracing the whole detector with its
data samples and post-processing is slow and brittle), latency tables and anchors time it, and the
slim detector's raw outputs equal the masked one's. The same module also trains (``forward(images,
targets)`` returns mmdet's loss, so DDP sees one forward) and detects (:meth:`RawSSD.predict`,
mmdet's post-processing and NMS).

Presets (``mmdet:<name>`` in :func:`halp.models.create_model`):

* ``ssd512_r50`` - the paper's detector: SSD512 on torchvision-style ResNet-50 stages (conv1-layer3,
  layer3 at stride 8 as in NVIDIA's SSD-ResNet50), mmdet's SSD neck (extra levels with BN) and head.
* ``ssd300`` - mmdet's stock SSD300 with its VGG16 backbone, VOC anchors (``ssd300_voc0712``).
* ``ssd_tiny`` - a CPU-scale SSD at 128 x 128: ResNet-18 stages at a quarter of the width.

Any mmdet config file with an SSD head also works: ``mmdet:/path/to/config.py``.
"""
from __future__ import annotations

import copy
import logging
import os
from pathlib import Path
from contextlib import contextmanager
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor, nn

from .mmcv_compat import ensure_mmcv_ops

# before anything imports mmdet's models: they import mmcv.ops (also when a saved slim detector is
# unpickled, which imports this module first)
ensure_mmcv_ops()

__all__ = ["RawSSD", "EndToEnd", "PRESETS", "build_ssd", "detector_config", "Targets"]

# A batch's ground truth, one dict per image: "boxes" (n, 4) x1y1x2y2 in input pixels, "labels" (n,)
# class indices, and optionally "difficult" (n,) bools (ignored when training, as in mmdet's VOC).
Targets = list[dict[str, Tensor]]

_VOC_TRAIN = dict(
    assigner=dict(type="MaxIoUAssigner", pos_iou_thr=0.5, neg_iou_thr=0.5, min_pos_iou=0.0, ignore_iof_thr=-1,
                  gt_max_assign_all=False),
    sampler=dict(type="PseudoSampler"), smoothl1_beta=1.0, allowed_border=-1, pos_weight=-1, neg_pos_ratio=3,
    debug=False)
_TEST = dict(nms_pre=1000, nms=dict(type="nms", iou_threshold=0.45), min_bbox_size=0, score_thr=0.02,
             max_per_img=200)
_CODER = dict(type="DeltaXYWHBBoxCoder", target_means=[0.0, 0.0, 0.0, 0.0], target_stds=[0.1, 0.1, 0.2, 0.2])
_BN = dict(type="BN", requires_grad=True)


def _resnet_ssd(depth: int, base: int, strides: Sequence[int], neck_out: Sequence[int], level_strides, paddings,
                last_kernel: int, anchors: dict) -> dict:
    c4 = base * 4 * (4 if depth >= 50 else 1)  # layer3's output channels
    return dict(
        type="SingleStageDetector",
        backbone=dict(type="ResNet", depth=depth, base_channels=base, num_stages=3, strides=(1, 2, 1),
                      dilations=(1, 1, 1), out_indices=(2,), frozen_stages=-1, norm_cfg=_BN, norm_eval=False,
                      style="pytorch", init_cfg=None),
        neck=dict(type="SSDNeck", in_channels=(c4,), out_channels=(c4, *neck_out), level_strides=level_strides,
                  level_paddings=paddings, l2_norm_scale=None, last_kernel_size=last_kernel, norm_cfg=_BN),
        bbox_head=dict(type="SSDHead", in_channels=(c4, *neck_out), num_classes=20, anchor_generator=anchors,
                       bbox_coder=_CODER),
        train_cfg=_VOC_TRAIN, test_cfg=_TEST)


def _ssd512_r50() -> dict:
    # levels 64, 32, 16, 8, 4, 2, 1 at 512 px: the strides and anchor ratios of mmdet's ssd512_voc0712
    anchors = dict(type="SSDAnchorGenerator", scale_major=False, input_size=512, basesize_ratio_range=(0.15, 0.9),
                   strides=[8, 16, 32, 64, 128, 256, 512], ratios=[[2], [2, 3], [2, 3], [2, 3], [2, 3], [2], [2]])
    return _resnet_ssd(50, 64, (1, 2, 1), (512, 512, 256, 256, 256, 256), (2, 2, 2, 2, 2, 1), (1, 1, 1, 1, 1, 1),
                       4, anchors)


def _ssd_tiny() -> dict:
    # 128 px: levels 16, 8, 4, 2, 1; anchor sizes (px) cover 10-120 px objects
    anchors = dict(type="SSDAnchorGenerator", scale_major=False, strides=[8, 16, 32, 64, 128],
                   min_sizes=[12, 26, 48, 74, 100], max_sizes=[26, 48, 74, 100, 128],
                   ratios=[[2], [2, 3], [2, 3], [2], [2]])
    return _resnet_ssd(18, 16, (1, 2, 1), (128, 128, 64, 64), (2, 2, 2, 1), (1, 1, 1, 0), 2, anchors)


def _ssd300() -> dict:
    import mmdet
    from mmengine.config import Config

    path = Path(mmdet.__file__).parent / ".mim" / "configs" / "pascal_voc" / "ssd300_voc0712.py"
    model = Config.fromfile(str(path)).model.to_dict()
    model.pop("data_preprocessor", None)  # our datasets normalise; the wrapper feeds the backbone directly
    model["backbone"]["init_cfg"] = None  # the stock config downloads VGG weights
    return model


# name -> (model config factory, input size)
PRESETS: dict[str, tuple[Any, int]] = {"ssd512_r50": (_ssd512_r50, 512), "ssd300": (_ssd300, 300),
                                       "ssd_tiny": (_ssd_tiny, 128)}


def detector_config(name: str, num_classes: int) -> tuple[dict, int]:
    """The mmdet model config of preset ``name`` (or of the config file ``name``) for
    ``num_classes`` classes, and its input size. Raises ``ValueError`` when the config has no SSD head."""
    if name in PRESETS:
        factory, size = PRESETS[name]
        model = factory()
    else:
        path = Path(os.path.expanduser(name))
        if path.suffix != ".py" or not path.is_file():
            raise ValueError(f"unknown detector {name!r}: use one of {', '.join('mmdet:' + p for p in PRESETS)} "
                             "or mmdet:<path to an mmdet config .py>")
        from mmengine.config import Config

        try:
            cfg = Config.fromfile(str(path))
        except Exception as e:
            raise ValueError(f"{path}: not a readable mmdet config ({type(e).__name__}: {e})") from e
        if "model" not in cfg:
            raise ValueError(f"{path}: the config defines no `model`")
        model = cfg.model.to_dict()
        model.pop("data_preprocessor", None)
        size = None
    head = model.get("bbox_head") or {}
    if head.get("type") != "SSDHead":
        raise ValueError(f"{name}: halp prunes SSD detectors, but this config's bbox_head is "
                         f"{head.get('type', 'missing')!r}, not 'SSDHead'")
    if size is None:
        size = _input_size(model, Path(name))
    model = copy.deepcopy(model)
    model["bbox_head"]["num_classes"] = int(num_classes)
    return model, size


def _input_size(model: dict, path: Path) -> int:
    gen = (model.get("bbox_head") or {}).get("anchor_generator") or {}
    if "input_size" in gen:
        return int(gen["input_size"])
    if gen.get("max_sizes"):
        return int(max(gen["max_sizes"]))
    raise ValueError(f"{path}: cannot tell the input size (set bbox_head.anchor_generator.input_size)")


def _register_blocks() -> None:
    """Teach slimming mmdet's ResNet blocks (branch end, shortcut, activation after the sum), so
    that HALP may empty a branch of an SSD's ResNet backbone as it does in torchvision's."""
    from mmdet.models.backbones.resnet import BasicBlock, Bottleneck

    from ..residual import ResidualSpec, register_residual_block

    def adapter(end: str):
        def spec(block: nn.Module) -> ResidualSpec | None:
            if getattr(block, "with_plugins", False) or getattr(block, "with_dcn", False):
                return None  # plugins/deformable convs: not a plain conv-BN branch
            return ResidualSpec(getattr(block, end), "downsample" if block.downsample is not None else None, "relu")
        return spec

    register_residual_block(BasicBlock, adapter("norm2_name"))
    register_residual_block(Bottleneck, adapter("norm3_name"))


def build_ssd(name: str, num_classes: int = 20, in_chans: int = 3) -> "RawSSD":
    """The detector ``name`` (a preset or an mmdet config file) with random weights, wrapped."""
    if in_chans != 3:
        raise ValueError(f"SSD detectors read RGB images (in_chans=3), got in_chans={in_chans}")
    ensure_mmcv_ops()
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules

    register_all_modules(init_default_scope=False)
    _register_blocks()
    cfg, size = detector_config(name, num_classes)
    from mmengine.config import ConfigDict

    detector = MODELS.build(ConfigDict(cfg))  # heads read their train/test settings as attributes
    with quiet_mmengine():  # init_weights logs every tensor it initialises
        detector.init_weights()  # init_detector does not, and SSDNeck's L2Norm would stay uninitialised
    head = detector.bbox_head
    if not hasattr(head, "loss_cls"):  # mmdet 3.3 SSDHead never sets it; predict reads it
        head.loss_cls = nn.CrossEntropyLoss()
        head.loss_cls.use_sigmoid = False
    return RawSSD(detector, size, num_classes)


@contextmanager
def quiet_mmengine() -> Iterator[None]:
    """mmengine's current logger at WARNING for the block (its INFO lines flood a job's log)."""
    from mmengine.logging import MMLogger

    logger = MMLogger.get_current_instance()
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


class RawSSD(nn.Module):
    """An mmdet SSD as a CNN: ``forward(images)`` -> raw head outputs.

    ``images`` are ``(n, 3, size, size)``, already normalised (mmdet's data preprocessor is not
    used: the data pipeline normalises). Outputs: the class scores of every level, then the box deltas of
    every level. ``forward(images, targets)`` returns the detection loss (a scalar) instead."""

    def __init__(self, detector: nn.Module, input_size: int, num_classes: int) -> None:
        super().__init__()
        self.detector = detector
        self.input_size, self.num_classes = int(input_size), int(num_classes)

    def raw(self, images: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        feats = self.detector.extract_feat(images)
        return self.detector.bbox_head(feats)

    def forward(self, images: Tensor, targets: Targets | None = None) -> Tensor | tuple[Tensor, ...]:
        if targets is not None:
            return self.loss(images, targets)
        cls, reg = self.raw(images)
        return (*cls, *reg)

    def _samples(self, images: Tensor, targets: Targets | None) -> list:
        from mmdet.structures import DetDataSample
        from mmengine.structures import InstanceData

        h, w = images.shape[-2:]
        samples = []
        for i in range(len(images)):
            s = DetDataSample(metainfo={"img_shape": (h, w), "pad_shape": (h, w), "ori_shape": (h, w),
                                        "scale_factor": (1.0, 1.0), "batch_input_shape": (h, w)})
            if targets is not None:
                t = targets[i]
                keep = ~t["difficult"].bool() if "difficult" in t else torch.ones(len(t["labels"]), dtype=torch.bool)
                gt = InstanceData()
                gt.bboxes = t["boxes"][keep].to(images.device, torch.float32)
                gt.labels = t["labels"][keep].to(images.device, torch.long)
                s.gt_instances = gt
            samples.append(s)
        return samples

    def loss(self, images: Tensor, targets: Targets) -> Tensor:
        """mmdet's SSD loss (classification with hard negative mining + smooth L1), summed."""
        feats = self.detector.extract_feat(images)
        losses = self.detector.bbox_head.loss(feats, self._samples(images, targets))
        # as mmdet's parse_losses: a loss given per image (a list) is the sum of their means
        return sum(v.mean() if isinstance(v, Tensor) else sum(x.mean() for x in v)
                   for k, v in losses.items() if "loss" in k)

    @torch.no_grad()
    def predict(self, images: Tensor, score_thr: float | None = None) -> list[dict[str, Tensor]]:
        """Detections per image after mmdet's post-processing and NMS: ``boxes`` (x1y1x2y2, input
        pixels), ``scores``, ``labels``. ``score_thr`` overrides the config's."""
        head = self.detector.bbox_head
        test_cfg = head.test_cfg
        if score_thr is not None:
            from mmengine.config import ConfigDict

            test_cfg = ConfigDict(copy.deepcopy(dict(test_cfg)))
            test_cfg.score_thr = score_thr
        cls, reg = self.raw(images)
        metas = [s.metainfo for s in self._samples(images, None)]
        found = head.predict_by_feat(cls, reg, batch_img_metas=metas, cfg=test_cfg, rescale=False)
        return [{"boxes": r.bboxes, "scores": r.scores, "labels": r.labels} for r in found]


class EndToEnd(nn.Module):
    """``forward(images)`` = ``ssd.predict(images)``: the detector with post-processing and NMS,
    for timing end to end."""

    def __init__(self, ssd: RawSSD) -> None:
        super().__init__()
        self.ssd = ssd

    def forward(self, images: Tensor) -> list[dict[str, Tensor]]:
        return self.ssd.predict(images)
