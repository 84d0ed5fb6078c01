"""PASCAL VOC detection data in the real layout, for SSD.

``root`` is a ``VOCdevkit`` folder: ``VOC2007/{Annotations,JPEGImages,ImageSets/Main}`` (and
``VOC2012/...``). The paper's split is the default: training on 07+12 ``trainval``, testing on 07
``test``. Difficult objects are kept and flagged (ignored by the loss and by the metric, as in
mmdet). Classes are VOC's 20, or the names in ``root/classes.txt`` (one per line) when that file
exists: ``halp data make-fashiondet`` writes one for its Fashion-MNIST classes.

Every annotation is parsed and every image's header checked when the dataset is built, so a broken
set fails before any work starts. Images are resized to ``size x size`` (SSD's input, aspect ratio
not kept) and normalised with the detector's mean/std. Training adds a horizontal flip
(``augment="flip"``) or mmdet's SSD pipeline (``augment="ssd"``: photometric distortion, expand
onto a mean-filled canvas up to 4x, a random crop with a minimum IoU to the boxes, flip, resize),
built from torchvision's box-aware transforms. It runs on the image already resized to
``size x size`` (mmdet resizes last, from the original), so a crop has fewer source pixels than
mmdet's: a small difference at VOC's ~500 px, none for 128 px Fashion-Det.
"""
from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

VOC_CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
               "tvmonitor")


@dataclass(frozen=True)
class Annotation:
    image: Path
    width: int
    height: int
    boxes: np.ndarray      # (n, 4) float32, x1 y1 x2 y2, 0-based pixels
    labels: np.ndarray     # (n,) int64
    difficult: np.ndarray  # (n,) bool


def read_classes(root: Path) -> tuple[str, ...]:
    """The class names of the set at ``root``: ``classes.txt`` if present, else VOC's."""
    path = root / "classes.txt"
    if not path.exists():
        return VOC_CLASSES
    names = tuple(line.strip() for line in path.read_text().splitlines() if line.strip())
    if not names or len(set(names)) != len(names):
        raise ValueError(f"{path}: needs one distinct class name per line")
    return names


def _split_file(root: Path, split: str) -> tuple[Path, Path]:
    """``"VOC2007/trainval"`` -> (year folder, ImageSets/Main/trainval.txt)."""
    year, _, name = split.partition("/")
    if not name:
        raise ValueError(f"a VOC split is '<year folder>/<set>', e.g. 'VOC2007/trainval'; got {split!r}")
    base = root / year
    if not base.is_dir():
        raise FileNotFoundError(f"VOC folder {base} not found (expected VOCdevkit/{year}/Annotations, "
                                f"JPEGImages, ImageSets/Main); set data.root to your VOCdevkit")
    sets = base / "ImageSets" / "Main"
    if not sets.is_dir():
        raise FileNotFoundError(f"{base} has no ImageSets/Main: not a VOC layout (expected "
                                f"{sets}/{name}.txt listing the image ids)")
    path = sets / f"{name}.txt"
    if not path.exists():
        raise FileNotFoundError(f"split file {path} not found")
    return base, path


def _parse(xml_path: Path, base: Path, classes: dict[str, int]) -> Annotation:
    try:
        root = ET.parse(xml_path).getroot()
    except (OSError, ET.ParseError) as e:
        raise ValueError(f"annotation {xml_path} cannot be read: {e}") from e
    size = root.find("size")
    w = int(size.findtext("width", "0")) if size is not None else 0
    h = int(size.findtext("height", "0")) if size is not None else 0
    boxes, labels, difficult = [], [], []
    for obj in root.iter("object"):
        name = (obj.findtext("name") or "").strip()
        if name not in classes:
            raise ValueError(f"annotation {xml_path} names the class {name!r}, which is not one of the "
                             f"{len(classes)} classes ({', '.join(list(classes)[:6])}, ...)")
        bb = obj.find("bndbox")
        if bb is None:
            raise ValueError(f"annotation {xml_path}: object {name!r} has no bndbox")
        # VOC boxes are 1-based inclusive pixel indices; mmdet subtracts 1 from the corner
        x1, y1, x2, y2 = (float(bb.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax"))
        boxes.append([x1 - 1, y1 - 1, x2, y2])
        labels.append(classes[name])
        difficult.append(bool(int(obj.findtext("difficult", "0") or 0)))
    filename = root.findtext("filename") or f"{xml_path.stem}.jpg"
    return Annotation(base / "JPEGImages" / filename, w, h, np.asarray(boxes, np.float32).reshape(-1, 4),
                      np.asarray(labels, np.int64), np.asarray(difficult, bool))


def _check_image(path: Path) -> tuple[int, int]:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            size = im.size
            im.verify()
        return size
    except FileNotFoundError:
        raise FileNotFoundError(f"image {path} is missing") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ValueError(f"image {path} cannot be decoded: {e}") from e


def load_annotations(root: Path, splits: Sequence[str], classes: Sequence[str]) -> list[Annotation]:
    """Every image of ``splits`` (e.g. ``["VOC2007/trainval", "VOC2012/trainval"]``), checked."""
    index = {c: i for i, c in enumerate(classes)}
    out: list[Annotation] = []
    for split in splits:
        base, path = _split_file(root, split)
        for line in path.read_text().splitlines():
            stem = line.strip().split(" ")[0]
            if not stem:
                continue
            ann = _parse(base / "Annotations" / f"{stem}.xml", base, index)
            w, h = _check_image(ann.image)
            if (ann.width, ann.height) != (w, h):  # trust the pixels, not the XML
                ann = Annotation(ann.image, w, h, ann.boxes, ann.labels, ann.difficult)
            out.append(ann)
    if not out:
        raise ValueError(f"{root}: the splits {list(splits)} list no images")
    return out


class VOCDetection(Dataset):
    """Items ``(image (3, size, size) normalised, target dict)``; ``target`` holds ``boxes`` (n, 4)
    in input pixels, ``labels`` and ``difficult``. ``collate`` batches them (images stacked,
    targets listed). ``cache=True`` keeps the resized images in memory (small sets)."""

    def __init__(self, annotations: list[Annotation], classes: Sequence[str], size: int,
                 mean: Sequence[float], std: Sequence[float], augment: bool = False, cache: bool = False) -> None:
        self.annotations, self.classes, self.size = annotations, tuple(classes), int(size)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
        if augment not in (False, True, "flip", "ssd"):
            raise ValueError(f"augment must be False, 'flip' or 'ssd', got {augment!r}")
        self.augment = "flip" if augment is True else augment
        self._ssd = ssd_pipeline(mean, size) if self.augment == "ssd" else None
        self._cache: dict[int, torch.Tensor] | None = {} if cache else None
        self.split = ""  # the split it was read from (e.g. "VOC2007/test": its mAP is 11-point)

    def __len__(self) -> int:
        return len(self.annotations)

    def _pixels(self, index: int) -> torch.Tensor:
        """uint8 (3, size, size)."""
        if self._cache is not None and index in self._cache:
            return self._cache[index]
        from PIL import Image

        path = self.annotations[index].image
        try:
            with Image.open(path) as im:
                img = torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1)
        except OSError as e:
            raise ValueError(f"image {path} cannot be decoded: {e}") from e
        img = F.interpolate(img[None].float(), size=(self.size, self.size), mode="bilinear", align_corners=False,
                            antialias=True)[0].round().clamp(0, 255).to(torch.uint8)
        if self._cache is not None:
            self._cache[index] = img
        return img

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        ann = self.annotations[index]
        img = self._pixels(index).float()
        sx, sy = self.size / ann.width, self.size / ann.height
        boxes = torch.from_numpy(ann.boxes).clone() * torch.tensor([sx, sy, sx, sy])
        labels, difficult = torch.from_numpy(ann.labels).clone(), torch.from_numpy(ann.difficult).clone()
        if self._ssd is not None:  # torch's RNG throughout: reseeded per batch by the trainer
            img, boxes, labels, difficult = self._ssd(img, boxes, labels, difficult)
        elif self.augment and bool(torch.rand(()) < 0.5):
            img = img.flip(-1)
            boxes = torch.stack([self.size - boxes[:, 2], boxes[:, 1], self.size - boxes[:, 0], boxes[:, 3]], 1)
        x = (img - self.mean) / self.std
        return x, {"boxes": boxes, "labels": labels, "difficult": difficult}

    @staticmethod
    def collate(items: list) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
        return torch.stack([x for x, _ in items]), [t for _, t in items]


def ssd_pipeline(mean: Sequence[float], size: int):
    """mmdet's SSD training augmentation as a function ``(image float (3,H,W) in 0-255, boxes xyxy,
    labels, difficult) -> the same, augmented, at size x size``. Boxes the crop leaves (almost)
    empty are dropped with their labels and difficult flags."""
    from torchvision import tv_tensors
    from torchvision.transforms import v2

    steps = v2.Compose([
        # mmdet: brightness +-32, contrast and saturation 0.5-1.5, hue +-18 degrees
        v2.RandomPhotometricDistort(brightness=(1 - 32 / 255 * 2, 1 + 32 / 255 * 2), contrast=(0.5, 1.5),
                                    saturation=(0.5, 1.5), hue=(-18 / 360, 18 / 360), p=0.5),
        v2.RandomZoomOut(fill={tv_tensors.Image: [round(m) for m in mean], "others": 0}, side_range=(1.0, 4.0), p=0.5),
        v2.RandomIoUCrop(min_scale=0.3, max_scale=1.0, min_aspect_ratio=0.5, max_aspect_ratio=2.0,
                         sampler_options=[0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0], trials=50),
        v2.SanitizeBoundingBoxes(min_size=1.0, labels_getter=lambda inputs: (inputs[1]["labels"], inputs[1]["difficult"])),
        v2.RandomHorizontalFlip(p=0.5),
        v2.Resize((size, size), antialias=True),
    ])

    def apply(img: torch.Tensor, boxes: torch.Tensor, labels: torch.Tensor, difficult: torch.Tensor):
        image = tv_tensors.Image(img.round().clamp(0, 255).to(torch.uint8))
        box = tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=tuple(img.shape[-2:]))
        out_img, target = steps(image, {"boxes": box, "labels": labels, "difficult": difficult})
        boxes = target["boxes"].as_subclass(torch.Tensor).float().clamp(0, size)  # resize rounding: 96.00001
        return out_img.as_subclass(torch.Tensor).float(), boxes, target["labels"], target["difficult"]

    return apply


def detection_splits(root: Path, train: Sequence[str], test: Sequence[str], size: int, mean, std,
                     augment: bool | str, cache: bool) -> tuple[VOCDetection, VOCDetection, VOCDetection, tuple[str, ...]]:
    """(train augmented, train plain, test, classes) of the VOC-layout set at ``root``."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"VOC root {root} not found: set data.root to a VOCdevkit folder "
                                "(or make one offline: halp data make-fashiondet OUT)")
    classes = read_classes(root)
    tr = load_annotations(root, train, classes)
    te = load_annotations(root, test, classes)
    train_set = VOCDetection(tr, classes, size, mean, std, augment, cache)
    plain = VOCDetection(tr, classes, size, mean, std, False, cache)
    plain._cache = train_set._cache  # the same images: decode (and keep) them once
    test_set = VOCDetection(te, classes, size, mean, std, False, cache)
    train_set.split = plain.split = "+".join(train)
    test_set.split = "+".join(test)
    return train_set, plain, test_set, classes


def voc_root(cfg) -> Path:
    from .data import _default_root

    return Path(cfg.root).expanduser() if cfg.root else _default_root("HALP_VOC", "~/datasets/VOCdevkit")


def dataset_label(cfg) -> str:
    """The name records and reports give a VOC-layout set: ``voc`` for PASCAL VOC, the folder's
    name for a set with its own classes (``classes.txt``, e.g. ``fashiondet``)."""
    root = voc_root(cfg)
    return root.name if (root / "classes.txt").exists() else "voc"


def voc_splits(cfg):
    """The suite's data builder for ``data.name=voc`` (see :class:`experiments.data.DataConfig`)."""
    from .data import IMAGENET_MEAN, IMAGENET_STD, Splits

    if not cfg.voc_train or not cfg.voc_test:
        raise ValueError("data.voc_train and data.voc_test must each name at least one split")
    root = voc_root(cfg)
    mean = tuple(255.0 * m for m in IMAGENET_MEAN)
    std = tuple(255.0 * s for s in IMAGENET_STD)
    train, plain, test, classes = detection_splits(root, list(cfg.voc_train), list(cfg.voc_test), cfg.image_size,
                                                   mean, std, cfg.det_augment if cfg.augment else False,
                                                   cfg.cache_images)
    return Splits(train, plain, test, len(classes), (3, cfg.image_size, cfg.image_size))
