"""Image-classification data: Fashion-MNIST, CIFAR-10, ImageNet-style folders and synthetic images.

Every source yields ``torch.utils.data`` datasets and is deterministic given ``DataConfig.seed``:

* ``fashion_mnist``: the IDX files of Debian's ``dataset-fashion-mnist`` package, parsed here and
  held in memory as one uint8 tensor, normalised (and augmented) on the fly a whole batch at a time;
* ``cifar10``: the python-pickle release (``cifar-10-batches-py``), also held in memory;
* ``imagenet``: ``root/train/<class>/*`` and ``root/val/<class>/*`` read by ``ImageFolder``;
* ``synthetic``: random images whose label is a fixed function of the image, for smoke tests.

Nothing is ever downloaded: missing data raise ``FileNotFoundError`` saying where we looked.
"""
from __future__ import annotations

import copy
import gzip
import math
import os
import pickle
import struct
import zlib
from dataclasses import asdict, dataclass
from typing import ClassVar
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Subset, get_worker_info

from .batches import LoaderConfig

FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                       "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
FASHION_MNIST_MEAN, FASHION_MNIST_STD = (0.2860,), (0.3530,)
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass
class DataConfig:
    """What to load. ``root=None`` means the dataset's default location: Debian's folder for
    Fashion-MNIST, ``$HALP_CIFAR10`` / ``$HALP_IMAGENET`` (falling back to ``~/datasets/cifar10``
    / ``~/datasets/imagenet``) for the others. How batches are drawn is the trainer's business
    (``TrainConfig.batch_size``), so it is not configured here."""
    name: str = "fashion_mnist"      # fashion_mnist | cifar10 | imagenet | synthetic | voc (detection)
    root: str | None = None
    augment: bool = True
    image_size: int = 224            # imagenet and voc (the detector's input size)
    synthetic_samples: int = 512     # training samples; the synthetic val split has a quarter as many
    synthetic_shape: tuple[int, int, int] = (3, 32, 32)
    synthetic_classes: int = 10
    train_subset: int | None = None  # only the first N training samples after a seeded shuffle
    holdout: int = 0                 # N training samples held out as a separate (un-augmented) split
    seed: int = 0
    # voc (a VOCdevkit folder): '<year folder>/<set>' splits to train and test on; keep decoded images in memory
    voc_train: tuple[str, ...] = ("VOC2007/trainval", "VOC2012/trainval")
    voc_test: tuple[str, ...] = ("VOC2007/test",)
    cache_images: bool = False
    det_augment: str = "flip"        # voc training augmentation: flip | ssd (mmdet's SSD pipeline, see voc.py)
    # how batches are loaded, never which (results do not depend on these)
    workers: int = 0                 # loader worker processes (0: the training process loads)
    pin_memory: bool = True          # pinned host memory for batches bound for a GPU (ignored on the CPU)
    persistent_workers: bool = True  # keep evaluation workers alive between epochs
    prefetch_factor: int = 2         # batches each worker loads ahead

    LOADER_KEYS: ClassVar[tuple[str, ...]] = ("workers", "pin_memory", "persistent_workers", "prefetch_factor")
    VOC_KEYS: ClassVar[tuple[str, ...]] = ("voc_train", "voc_test", "cache_images", "det_augment")
    DET_AUGMENTS: ClassVar[tuple[str, ...]] = ("flip", "ssd")

    def __post_init__(self) -> None:
        if self.det_augment not in self.DET_AUGMENTS:
            raise ValueError(f"data.det_augment must be one of {', '.join(self.DET_AUGMENTS)}, got {self.det_augment!r}")

    def loader(self) -> LoaderConfig:
        """The loader knobs as the trainer takes them."""
        return LoaderConfig(self.workers, self.pin_memory, self.persistent_workers, self.prefetch_factor)

    def identity(self) -> dict:
        """The fields that decide what the data are (cache keys leave the loader knobs out, and the
        VOC fields for other sets, so that keys made before those fields existed stay valid)."""
        skip = self.LOADER_KEYS + (() if self.name == "voc" else self.VOC_KEYS)
        if self.det_augment == "flip":  # the default, older than the key: absent, as in keys made before it
            skip += ("det_augment",)
        return {k: v for k, v in asdict(self).items() if k not in skip}


@dataclass
class DataInfo:
    num_classes: int
    input_shape: tuple[int, int, int]
    train_size: int
    val_size: int
    holdout_size: int


class Splits(NamedTuple):
    """What a dataset builder returns, before subsetting and holdout."""
    train: Dataset        # training samples, augmented if the config asks for it
    train_plain: Dataset  # the same samples with evaluation transforms (the holdout is taken from it)
    val: Dataset          # the official test split
    num_classes: int
    input_shape: tuple[int, int, int]


class TensorImageDataset(Dataset):
    """uint8 images ``(N, C, H, W)`` and labels held in memory, normalised per channel on access.

    With ``pad > 0`` each access takes a random ``H x W`` crop of the zero-padded image and flips it
    horizontally with probability 1/2. The randomness comes from the dataset's own generator, seeded
    with ``seed`` (DataLoader workers reseed it from their worker seed, see :func:`build_loaders`),
    so epochs are reproducible without touching the global RNG. DataLoader fetches through
    ``__getitems__``, which treats the whole batch with a handful of tensor ops.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, mean: Sequence[float],
                 std: Sequence[float], pad: int = 0, seed: int = 0):
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"images must be a uint8 (N, C, H, W) tensor, got {images.dtype} {tuple(images.shape)}")
        if labels.shape != (len(images),):
            raise ValueError(f"{len(images)} images but labels of shape {tuple(labels.shape)}")
        if len(mean) != images.shape[1] or len(std) != images.shape[1]:
            raise ValueError(f"mean/std need one value per channel ({images.shape[1]})")
        self.images, self.labels = images, labels.long()
        self.mean, self.std, self.pad, self.seed = tuple(mean), tuple(std), int(pad), seed
        self._mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self._std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return len(self.labels)

    def with_pad(self, pad: int) -> TensorImageDataset:
        """A view of the same tensors with another augmentation setting (0: none)."""
        return TensorImageDataset(self.images, self.labels, self.mean, self.std, pad, self.seed)

    def reseed(self, seed: int) -> None:
        self.generator.manual_seed(seed)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: Sequence[int]) -> list[tuple[torch.Tensor, int]]:
        idx = torch.as_tensor(indices, dtype=torch.long)
        x = self.images[idx]
        if self.pad:
            x = self._crop_flip(x)
        x = (x.float().div_(255) - self._mean) / self._std
        return list(zip(x.unbind(0), self.labels[idx].tolist()))

    def _crop_flip(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        p, g = self.pad, self.generator
        x = F.pad(x, (p, p, p, p))
        dy = torch.randint(0, 2 * p + 1, (b,), generator=g)
        dx = torch.randint(0, 2 * p + 1, (b,), generator=g)
        flip = torch.rand(b, generator=g) < 0.5
        rows = dy[:, None] + torch.arange(h)                                  # (b, h)
        ar = torch.arange(w)
        cols = dx[:, None] + torch.where(flip[:, None], w - 1 - ar, ar)      # (b, w)
        return x[torch.arange(b)[:, None, None, None], torch.arange(c)[None, :, None, None],
                 rows[:, None, :, None], cols[:, None, None, :]]


class SyntheticImages(Dataset):
    """Random images with a learnable label, generated on access (so any size costs no memory).

    Sample ``i`` is a smooth random field (a bilinearly upsampled ``C x 4 x 4`` Gaussian) plus
    half-strength white noise, drawn from an RNG seeded with ``(seed, split, i)``. Its label is the
    argmax of a fixed (per ``seed``) random projection of the image's ``4 x 4`` average-pooled
    thumbnail: an exact function of the image that a small CNN can learn.
    """

    def __init__(self, n: int, shape: tuple[int, int, int], num_classes: int, seed: int, split: int):
        self.n, self.shape, self.num_classes, self.seed, self.split = n, tuple(shape), num_classes, seed, split
        c, h, w = self.shape
        self.pool = (min(4, h), min(4, w))
        proj = np.random.default_rng([seed, 0]).standard_normal((num_classes, c * self.pool[0] * self.pool[1]))
        self.projection = torch.from_numpy(proj / np.linalg.norm(proj, axis=1, keepdims=True)).float()

    def __len__(self) -> int:
        return self.n

    def labels_of(self, x: torch.Tensor) -> torch.Tensor:
        """Labels of a batch ``(B, C, H, W)`` of images."""
        return (F.adaptive_avg_pool2d(x, self.pool).flatten(1) @ self.projection.T).argmax(1)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        i = index + self.n if index < 0 else index
        if not 0 <= i < self.n:
            raise IndexError(f"index {index} out of range for {self.n} samples")
        rng = np.random.default_rng([self.seed, self.split, i])
        c, h, w = self.shape
        coarse = torch.from_numpy(rng.standard_normal((1, c, *self.pool), dtype=np.float32))
        noise = torch.from_numpy(rng.standard_normal((c, h, w), dtype=np.float32))
        x = F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)[0] + 0.5 * noise
        return x, int(self.labels_of(x[None])[0])


# ---------------------------------------------------------------------------------------------
# Fashion-MNIST (IDX files)

def read_idx(path: str | os.PathLike, ndim: int) -> np.ndarray:
    """Parse an IDX file of unsigned bytes with ``ndim`` dimensions (gzip-compressed if it ends in .gz)."""
    path = Path(path)
    raw = path.read_bytes()
    if path.suffix == ".gz":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise ValueError(f"{path}: corrupt or truncated gzip data ({e})") from e
    if len(raw) < 4 or raw[:3] != b"\x00\x00\x08" or raw[3] != ndim:
        raise ValueError(f"{path}: bad IDX magic number 0x{raw[:4].hex()} "
                         f"(expected 0x000008{ndim:02x}: unsigned bytes, {ndim} dimensions)")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    if len(raw) - header != math.prod(dims):
        raise ValueError(f"{path}: {len(raw) - header} data bytes where shape {dims} needs "
                         f"{math.prod(dims)} (truncated or corrupt file)")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims).copy()


def _fashion_paths(root: Path) -> dict[str, tuple[Path, Path]]:
    found, missing = {}, []
    for split, stems in FASHION_MNIST_FILES.items():
        paths = []
        for stem in stems:  # the .gz files as Debian ships them, or already unpacked ones
            hit = next((root / n for n in (stem + ".gz", stem) if (root / n).is_file()), None)
            paths.append(hit)
            if hit is None:
                missing.append(stem + ".gz")
        found[split] = tuple(paths)
    if missing:
        raise FileNotFoundError(
            f"Fashion-MNIST not found: {', '.join(missing)} missing in {root}. Install Debian's package "
            f"(`apt-get install dataset-fashion-mnist`, which puts the files in {FASHION_MNIST_ROOT}) "
            "or pass DataConfig(root=...) naming a folder with the four IDX files.")
    return found


def load_fashion_mnist(root: str | os.PathLike | None = None, train: bool = True
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw Fashion-MNIST: uint8 images ``(N, 1, H, W)`` and int64 labels."""
    images_path, labels_path = _fashion_paths(Path(root or FASHION_MNIST_ROOT).expanduser())[
        "train" if train else "test"]
    images, labels = read_idx(images_path, 3), read_idx(labels_path, 1)
    if len(images) != len(labels):
        raise ValueError(f"{labels_path}: {len(labels)} labels for the {len(images)} images of {images_path}")
    if labels.size and labels.max() > 9:
        raise ValueError(f"{labels_path}: label {labels.max()} outside 0..9")
    return torch.from_numpy(images).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))


def _in_memory(cfg: DataConfig, train: tuple, val: tuple, mean, std, pad: int, classes: int) -> Splits:
    plain = TensorImageDataset(*train, mean, std, 0, cfg.seed)
    return Splits(plain.with_pad(pad) if cfg.augment else plain, plain,
                  TensorImageDataset(*val, mean, std, 0, cfg.seed), classes, tuple(train[0].shape[1:]))


def _fashion_mnist(cfg: DataConfig) -> Splits:
    _fashion_paths(Path(cfg.root or FASHION_MNIST_ROOT).expanduser())  # report all missing files at once
    return _in_memory(cfg, load_fashion_mnist(cfg.root, True), load_fashion_mnist(cfg.root, False),
                      FASHION_MNIST_MEAN, FASHION_MNIST_STD, pad=2, classes=10)


# ---------------------------------------------------------------------------------------------
# CIFAR-10 (python pickles)

def _default_root(env: str, fallback: str) -> Path:
    return Path(os.environ.get(env) or fallback).expanduser()


def load_cifar10(root: str | os.PathLike | None = None, train: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw CIFAR-10: uint8 images ``(N, 3, 32, 32)`` and int64 labels. ``root`` may hold
    ``cifar-10-batches-py/`` or be that folder. The files are pickles: only load ones you trust."""
    root = Path(root).expanduser() if root else _default_root("HALP_CIFAR10", "~/datasets/cifar10")
    base = root / "cifar-10-batches-py" if (root / "cifar-10-batches-py").is_dir() else root
    names = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
    missing = [n for n in names if not (base / n).is_file()]
    if missing:
        raise FileNotFoundError(
            f"CIFAR-10 not found: {', '.join(missing)} missing in {base} (looked in {root}/cifar-10-batches-py "
            f"and {root}). Unpack the python version (cifar-10-python.tar.gz) there, or pass "
            "DataConfig(root=...) or set $HALP_CIFAR10. Nothing is downloaded automatically.")
    images, labels = [], []
    for name in names:
        path = base / name
        try:
            with open(path, "rb") as f:
                batch = pickle.load(f, encoding="bytes")
            data = np.asarray(batch[b"data"], dtype=np.uint8)
            lab = np.asarray(batch[b"labels"], dtype=np.int64)
        except (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
            raise ValueError(f"{path}: not a CIFAR-10 batch ({type(e).__name__}: {e})") from e
        if data.ndim != 2 or data.shape[1] != 3072 or lab.shape != (len(data),):
            raise ValueError(f"{path}: expected data (N, 3072) and N labels, got {data.shape} and {lab.shape}")
        if lab.size and (lab.min() < 0 or lab.max() > 9):
            raise ValueError(f"{path}: labels outside 0..9")
        images.append(data.reshape(-1, 3, 32, 32))
        labels.append(lab)
    return torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels))


def _cifar10(cfg: DataConfig) -> Splits:
    return _in_memory(cfg, load_cifar10(cfg.root, True), load_cifar10(cfg.root, False),
                      CIFAR10_MEAN, CIFAR10_STD, pad=4, classes=10)


# ---------------------------------------------------------------------------------------------
# ImageNet-style folders and synthetic data

def _imagenet(cfg: DataConfig) -> Splits:
    from torchvision import datasets, transforms as T

    root = Path(cfg.root).expanduser() if cfg.root else _default_root("HALP_IMAGENET", "~/datasets/imagenet")
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise FileNotFoundError(
                f"image folder {root / split} not found: expected {root}/train/<class>/*.JPEG and "
                f"{root}/val/<class>/* (validation images sorted into class folders). "
                "Pass DataConfig(root=...) or set $HALP_IMAGENET.")
    size = cfg.image_size
    norm = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    evaluate = T.Compose([T.Resize(round(size * 256 / 224)), T.CenterCrop(size), T.ToTensor(), norm])
    augment = T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), T.ToTensor(), norm])
    train = datasets.ImageFolder(str(root / "train"), transform=augment if cfg.augment else evaluate)
    val = datasets.ImageFolder(str(root / "val"), transform=evaluate)
    if val.classes != train.classes:
        extra = sorted(set(val.classes) ^ set(train.classes))[:5]
        raise ValueError(f"{root}: train and val have different class folders (e.g. {extra})")
    plain = copy.copy(train)  # shares the scanned file list
    plain.transform = evaluate
    return Splits(train, plain, val, len(train.classes), (3, size, size))


def _synthetic(cfg: DataConfig) -> Splits:
    shape, k, n = tuple(cfg.synthetic_shape), cfg.synthetic_classes, cfg.synthetic_samples
    train = SyntheticImages(n, shape, k, cfg.seed, split=1)
    return Splits(train, train, SyntheticImages(max(1, n // 4), shape, k, cfg.seed, split=2), k, shape)


def _voc(cfg: DataConfig) -> Splits:
    from .voc import voc_splits  # detection: needs nothing beyond torch, but is its own module

    return voc_splits(cfg)


Builder = Callable[[DataConfig], Splits]
DATASETS: dict[str, Builder] = {
    "fashion_mnist": _fashion_mnist,
    "cifar10": _cifar10,
    "imagenet": _imagenet,
    "synthetic": _synthetic,
    "voc": _voc,
}


def _check(cfg: DataConfig) -> Builder:
    name = str(cfg.name).lower().replace("-", "_")
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {cfg.name!r}; valid names: {', '.join(sorted(DATASETS))}")

    def integer(field: str, low: int) -> None:
        v = getattr(cfg, field)
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise ValueError(f"DataConfig.{field} must be an integer >= {low}, got {v!r}")

    for field in ("image_size", "synthetic_samples"):
        integer(field, 1)
    for field in ("holdout", "seed", "workers"):
        integer(field, 0)
    integer("synthetic_classes", 2)
    integer("prefetch_factor", 1)
    if cfg.train_subset is not None:
        integer("train_subset", 1)
    shape = tuple(cfg.synthetic_shape)
    if len(shape) != 3 or not all(isinstance(d, int) and d > 0 for d in shape):
        raise ValueError(f"DataConfig.synthetic_shape must be three positive integers (C, H, W), got {shape}")
    return DATASETS[name]


def build_datasets(cfg: DataConfig) -> tuple[Dataset, Dataset, Dataset | None, DataInfo]:
    """``(train, val, holdout, info)``; ``val`` is the official test split.

    The holdout (``cfg.holdout`` samples, evaluation transforms) and the ``train_subset`` are taken
    from one seeded permutation of the training set: the holdout is its first ``holdout`` entries
    (so it does not depend on ``train_subset``), the training set the next ``train_subset`` (all of
    the rest if None, or if fewer remain). Subsets keep the samples in their original order.
    """
    splits = _check(cfg)(cfg)
    n = len(splits.train)
    if cfg.holdout >= n:
        raise ValueError(f"DataConfig.holdout={cfg.holdout} leaves no training samples (train size {n})")
    train, holdout = splits.train, None
    if cfg.holdout or cfg.train_subset is not None:
        perm = np.random.default_rng([cfg.seed, 0x5E1EC7]).permutation(n)
        rest = perm[cfg.holdout:] if cfg.train_subset is None else perm[cfg.holdout:cfg.holdout + cfg.train_subset]
        train = Subset(splits.train, np.sort(rest).tolist())
        if cfg.holdout:
            holdout = Subset(splits.train_plain, np.sort(perm[:cfg.holdout]).tolist())
    info = DataInfo(splits.num_classes, tuple(splits.input_shape), len(train), len(splits.val),
                    len(holdout) if holdout is not None else 0)
    return train, splits.val, holdout, info


def _seed_worker(worker_id: int) -> None:
    """Reseed every ``reseed``-able dataset in the worker's (nested) dataset from its worker seed."""
    ds = get_worker_info().dataset
    while ds is not None:
        if callable(getattr(ds, "reseed", None)):
            ds.reseed(torch.initial_seed())
        ds = getattr(ds, "dataset", None)


def build_loaders(cfg: DataConfig, batch_size: int = 128, eval_batch_size: int = 256, workers: int = 0
                  ) -> tuple[DataLoader, DataLoader, DataLoader | None, DataInfo]:
    """DataLoaders for :func:`build_datasets`, for training loops of your own (the suite's trainer
    draws its batches itself). The training loader shuffles with a generator seeded from
    ``cfg.seed`` (same order and, for in-memory datasets, same augmentation on every run) and
    drops only a final batch of a single sample, which training-mode BatchNorm cannot handle."""
    for name, v, low in (("batch_size", batch_size, 1), ("eval_batch_size", eval_batch_size, 1), ("workers", workers, 0)):
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {v!r}")
    train, val, holdout, info = build_datasets(cfg)
    common = dict(num_workers=workers, persistent_workers=workers > 0,
                  pin_memory=torch.cuda.is_available(), worker_init_fn=_seed_worker if workers else None)
    drop_last = len(train) > batch_size and len(train) % batch_size == 1
    train_loader = DataLoader(train, batch_size=batch_size, shuffle=True, drop_last=drop_last,
                              generator=torch.Generator().manual_seed(cfg.seed), **common)
    val_loader = DataLoader(val, batch_size=eval_batch_size, shuffle=False, **common)
    holdout_loader = (DataLoader(holdout, batch_size=eval_batch_size, shuffle=False, **common)
                      if holdout is not None else None)
    return train_loader, val_loader, holdout_loader, info
