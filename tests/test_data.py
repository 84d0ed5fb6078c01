"""Dataset loaders (experiments.data): parsing, splits, determinism, error messages."""
from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import Subset

from experiments.data import (DATASETS, FASHION_MNIST_FILES, FASHION_MNIST_ROOT, DataConfig, TensorImageDataset,
                       build_datasets, build_loaders, read_idx)

MEAN, STD = 0.2860, 0.3530


def write_idx(path: Path, arr: np.ndarray, compress: bool = True) -> Path:
    raw = bytes([0, 0, 8, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if compress else raw)
    return path


@pytest.fixture
def fashion(tmp_path):
    """A tiny Fashion-MNIST folder: 10 training and 4 test images with known pixels."""
    rng = np.random.default_rng(0)
    data = {"train": (rng.integers(0, 256, (10, 28, 28)), np.arange(10) % 10),
            "test": (rng.integers(0, 256, (4, 28, 28)), np.array([9, 0, 3, 3]))}
    for split, (images, labels) in data.items():
        img_name, lab_name = FASHION_MNIST_FILES[split]
        write_idx(tmp_path / f"{img_name}.gz", images)
        write_idx(tmp_path / f"{lab_name}.gz", labels)
    return tmp_path, data


def test_fashion_reads_pixels_and_labels_exactly(fashion):
    root, data = fashion
    train, val, holdout, info = build_datasets(DataConfig(root=str(root), augment=False))
    assert holdout is None
    assert (info.num_classes, info.input_shape, info.train_size, info.val_size, info.holdout_size) == \
        (10, (1, 28, 28), 10, 4, 0)
    for ds, (images, labels) in ((train, data["train"]), (val, data["test"])):
        assert ds.images.dtype == torch.uint8 and ds.images.shape == (len(images), 1, 28, 28)
        assert torch.equal(ds.images[:, 0], torch.from_numpy(images.astype(np.uint8)))
        assert ds.labels.tolist() == labels.tolist()
        x, y = ds[1]
        assert x.shape == (1, 28, 28) and x.dtype == torch.float32 and y == labels[1]
        torch.testing.assert_close(x[0], (torch.from_numpy(images[1]).float() / 255 - MEAN) / STD)


def test_fashion_reads_uncompressed_files(fashion):
    root, data = fashion
    name = FASHION_MNIST_FILES["test"][1]
    (root / f"{name}.gz").unlink()
    write_idx(root / name, data["test"][1], compress=False)
    _, val, _, _ = build_datasets(DataConfig(root=str(root)))
    assert val.labels.tolist() == [9, 0, 3, 3]


@pytest.mark.parametrize("damage", ["magic", "ndim", "truncated", "trailing", "bad_gzip", "count"])
def test_fashion_corrupt_file_names_the_file(fashion, damage):
    root, data = fashion
    path = root / f"{FASHION_MNIST_FILES['train'][0]}.gz"
    raw = gzip.decompress(path.read_bytes())
    if damage == "magic":
        raw = b"\x00\x00\x09" + raw[3:]
    elif damage == "ndim":
        raw = raw[:3] + b"\x02" + raw[4:]
    elif damage == "truncated":
        raw = raw[:-5]
    elif damage == "trailing":
        raw = raw + b"\x00"
    elif damage == "count":  # 9 images, 10 labels: the label file is named
        raw = raw[:4] + struct.pack(">I", 9) + raw[8:-784]
        path = root / f"{FASHION_MNIST_FILES['train'][1]}.gz"
    path_to_write = root / f"{FASHION_MNIST_FILES['train'][0]}.gz"
    path_to_write.write_bytes(gzip.compress(raw)[:-10] if damage == "bad_gzip" else gzip.compress(raw))
    with pytest.raises(ValueError, match=path.name):
        build_datasets(DataConfig(root=str(root)))


def test_read_idx_direct(tmp_path):
    arr = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    assert np.array_equal(read_idx(write_idx(tmp_path / "a.gz", arr), 3), arr)
    with pytest.raises(ValueError, match="magic"):
        read_idx(tmp_path / "a.gz", 1)


def test_fashion_missing_files(tmp_path, fashion):
    with pytest.raises(FileNotFoundError) as e:
        build_datasets(DataConfig(root=str(tmp_path / "nowhere")))
    assert "dataset-fashion-mnist" in str(e.value) and "nowhere" in str(e.value)
    root, _ = fashion
    (root / f"{FASHION_MNIST_FILES['test'][0]}.gz").unlink()
    with pytest.raises(FileNotFoundError, match="t10k-images-idx3-ubyte.gz"):
        build_datasets(DataConfig(root=str(root)))


@pytest.mark.skipif(not all((Path(FASHION_MNIST_ROOT) / f"{s}.gz").is_file()
                            for stems in FASHION_MNIST_FILES.values() for s in stems),
                    reason=f"Debian's Fashion-MNIST files are not in {FASHION_MNIST_ROOT} "
                           "(apt-get install dataset-fashion-mnist)")
def test_real_fashion_mnist():
    train, val, _, info = build_datasets(DataConfig())
    assert (info.train_size, info.val_size, info.input_shape, info.num_classes) == (60000, 10000, (1, 28, 28), 10)
    for ds in (train, val):
        assert ds.labels.min() == 0 and ds.labels.max() == 9
        assert torch.bincount(ds.labels).min() > 0
    pixels = train.images[:10000].double() / 255
    assert abs(pixels.mean().item() - MEAN) < 0.01 and abs(pixels.std().item() - STD) < 0.01


def test_augmentation_is_a_crop_and_flip_and_seeded():
    rng = np.random.default_rng(1)
    images = torch.from_numpy(rng.integers(1, 256, (8, 2, 5, 6)).astype(np.uint8))
    ds = TensorImageDataset(images, torch.arange(8), (0.0, 0.0), (1 / 255, 1 / 255), pad=2, seed=3)
    out = [x for x, _ in ds.__getitems__(list(range(8)) * 4)]
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2)).float()
    for k, x in enumerate(out):
        src = padded[k % 8]
        candidates = [c for dy in range(5) for dx in range(5)
                      for c in (src[:, dy:dy + 5, dx:dx + 6], src[:, dy:dy + 5, dx:dx + 6].flip(-1))]
        assert any(torch.allclose(x, c) for c in candidates), k
    assert any(not torch.allclose(x, images[k % 8].float()) for k, x in enumerate(out))
    again = TensorImageDataset(images, torch.arange(8), (0.0, 0.0), (1 / 255, 1 / 255), pad=2, seed=3)
    assert all(torch.equal(a, b) for a, (b, _) in zip(out, again.__getitems__(list(range(8)) * 4)))


def write_cifar(root: Path, per_batch: int = 3, test: int = 2) -> dict[str, tuple[np.ndarray, list[int]]]:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(2)
    out = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        n = test if name == "test_batch" else per_batch
        data, labels = rng.integers(0, 256, (n, 3072)).astype(np.uint8), rng.integers(0, 10, n).tolist()
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": data, b"labels": labels, b"batch_label": name.encode()}, f)
        out[name] = (data, labels)
    return out


def test_cifar10_loads(tmp_path):
    batches = write_cifar(tmp_path)
    for root in (tmp_path, tmp_path / "cifar-10-batches-py"):
        train, val, _, info = build_datasets(DataConfig(name="cifar10", root=str(root), augment=False))
        assert (info.num_classes, info.input_shape, info.train_size, info.val_size) == (10, (3, 32, 32), 15, 2)
        data = np.concatenate([batches[f"data_batch_{i}"][0] for i in range(1, 6)])
        assert torch.equal(train.images, torch.from_numpy(data.reshape(15, 3, 32, 32)))
        assert train.labels.tolist() == sum((batches[f"data_batch_{i}"][1] for i in range(1, 6)), [])
        x, y = val[1]
        assert x.shape == (3, 32, 32) and y == batches["test_batch"][1][1]
        # channel-major rows: the first 1024 bytes are the red plane
        red = torch.from_numpy(batches["test_batch"][0][1, :1024].reshape(32, 32)).float() / 255
        torch.testing.assert_close(x[0], (red - 0.4914) / 0.2470)
    x, _ = build_datasets(DataConfig(name="cifar10", root=str(tmp_path)))[0][0]
    assert x.shape == (3, 32, 32)


def test_cifar10_missing_and_corrupt(tmp_path):
    with pytest.raises(FileNotFoundError, match="CIFAR-10"):
        build_datasets(DataConfig(name="cifar10", root=str(tmp_path)))
    write_cifar(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="data_batch_3"):
        build_datasets(DataConfig(name="cifar10", root=str(tmp_path)))


def write_image_folder(root: Path, classes=("cat", "dog"), per_class: int = 3) -> None:
    from PIL import Image
    rng = np.random.default_rng(3)
    for split in ("train", "val"):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(per_class):
                size = (40 + 4 * i, 36)
                pixels = rng.integers(0, 256, (size[1], size[0], 3)).astype(np.uint8)
                Image.fromarray(pixels).save(root / split / c / f"{i}.png")


def test_image_folder(tmp_path):
    write_image_folder(tmp_path)
    cfg = DataConfig(name="imagenet", root=str(tmp_path), image_size=32, holdout=2)
    train, val, holdout, info = build_loaders(cfg, batch_size=4)
    assert (info.num_classes, info.input_shape, info.train_size, info.val_size, info.holdout_size) == \
        (2, (3, 32, 32), 4, 6, 2)
    labels = []
    for loader in (train, val, holdout):
        for x, y in loader:
            assert x.shape[1:] == (3, 32, 32) and x.dtype == torch.float32
            labels += y.tolist()
    assert sorted(set(labels)) == [0, 1] and len(labels) == 12
    # the holdout uses the deterministic evaluation transforms
    a, b = (torch.cat([x for x, _ in holdout]) for _ in range(2))
    assert torch.equal(a, b)


def test_image_folder_missing_or_mismatched(tmp_path):
    with pytest.raises(FileNotFoundError, match="train"):
        build_datasets(DataConfig(name="imagenet", root=str(tmp_path)))
    write_image_folder(tmp_path)
    (tmp_path / "val" / "dog").rename(tmp_path / "val" / "wolf")
    with pytest.raises(ValueError, match="class folders"):
        build_datasets(DataConfig(name="imagenet", root=str(tmp_path), image_size=32))


def test_synthetic_deterministic_and_labelled_by_image():
    cfg = DataConfig(name="synthetic", synthetic_samples=64, synthetic_shape=(3, 8, 8), synthetic_classes=4, seed=5)
    a, av, _, info = build_datasets(cfg)
    b, _, _, _ = build_datasets(cfg)
    c, _, _, _ = build_datasets(DataConfig(**{**cfg.__dict__, "seed": 6}))
    assert (info.train_size, info.val_size, info.input_shape, info.num_classes) == (64, 16, (3, 8, 8), 4)
    xa = torch.stack([a[i][0] for i in range(64)])
    ya = torch.tensor([a[i][1] for i in range(64)])
    assert torch.equal(xa, torch.stack([b[i][0] for i in range(64)]))
    assert ya.tolist() == [b[i][1] for i in range(64)]
    assert not torch.allclose(xa, torch.stack([c[i][0] for i in range(64)]))
    assert torch.equal(a.labels_of(xa), ya) and len(set(ya.tolist())) == 4  # label = function of image
    assert not torch.allclose(av[0][0], xa[0])  # val is a different draw
    with pytest.raises(IndexError):
        a[64]


def test_subset_and_holdout_are_disjoint(fashion):
    root, _ = fashion
    train, _, holdout, info = build_datasets(DataConfig(root=str(root), holdout=3, train_subset=4))
    assert isinstance(train, Subset) and isinstance(holdout, Subset)
    assert (info.train_size, info.holdout_size, len(train), len(holdout)) == (4, 3, 4, 3)
    assert not set(train.indices) & set(holdout.indices)
    assert train.dataset.pad == 2 and holdout.dataset.pad == 0  # holdout is not augmented
    # the holdout does not depend on train_subset; a different seed draws a different one
    same = build_datasets(DataConfig(root=str(root), holdout=3))
    assert same[2].indices == holdout.indices and same[3].train_size == 7
    other = build_datasets(DataConfig(root=str(root), holdout=3, seed=1))[2]
    assert other.indices != holdout.indices
    assert build_datasets(DataConfig(root=str(root), train_subset=100))[3].train_size == 10


@pytest.mark.parametrize("workers", [0, 1])
def test_training_order_and_augmentation_repeat(fashion, workers):
    root, _ = fashion

    def epoch(seed):
        loader = build_loaders(DataConfig(root=str(root), seed=seed), batch_size=4, workers=workers)[0]
        xs, ys = zip(*loader)
        return torch.cat(xs), torch.cat(ys)

    (x1, y1), (x2, y2), (_, y3) = epoch(0), epoch(0), epoch(1)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert len(y1) == 10 and sorted(y1.tolist()) == list(range(10))
    assert not torch.equal(y1, y3)


def test_loader_settings(fashion):
    root, _ = fashion
    train, val, holdout, _ = build_loaders(DataConfig(root=str(root)), batch_size=3, eval_batch_size=3)
    assert train.drop_last and len(train) == 3  # 10 = 3 * 3 + 1: a lone sample breaks BatchNorm
    assert not val.drop_last and len(val) == 2 and holdout is None
    assert not train.persistent_workers
    train = build_loaders(DataConfig(root=str(root)), batch_size=4, workers=1)[0]
    assert not train.drop_last and train.persistent_workers


@pytest.mark.parametrize("change, match", [
    ({"name": "mnist"}, "cifar10, fashion_mnist, imagenet, synthetic"),
    ({"train_subset": 0}, "train_subset"),
    ({"holdout": -1}, "holdout"),
    ({"holdout": 64}, "holdout"),
    ({"synthetic_shape": (3, 8)}, "synthetic_shape"),
    ({"synthetic_classes": 1}, "synthetic_classes"),
])
def test_config_validation(change, match):
    with pytest.raises(ValueError, match=match):
        build_datasets(DataConfig(**{"name": "synthetic", "synthetic_samples": 64, **change}))


@pytest.mark.parametrize("change, match", [
    ({"batch_size": 0}, "batch_size"),
    ({"eval_batch_size": -1}, "eval_batch_size"),
    ({"workers": -1}, "workers"),
])
def test_loader_validation(change, match):
    with pytest.raises(ValueError, match=match):
        build_loaders(DataConfig(name="synthetic", synthetic_samples=64), **change)


def test_registry_and_name_spelling():
    assert set(DATASETS) == {"fashion_mnist", "cifar10", "imagenet", "synthetic", "voc"}
    info = build_datasets(DataConfig(name="Synthetic", synthetic_samples=8))[3]
    assert info.train_size == 8 and info.val_size == 2
