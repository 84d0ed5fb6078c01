"""Fashion-Det: a real-image detection set that works offline, in the PASCAL VOC layout.

Each canvas (default 128 x 128 RGB) holds 1-4 Fashion-MNIST items, each scaled to 24-64 px, tinted,
and alpha-blended (its grey level is its opacity) onto a textured background (smooth colour noise
plus stripes), placed so that two items overlap by at most 10 % of the smaller box. The class is the
item's Fashion-MNIST label and the box is tight around the item's visible pixels. Training canvases
use items of Fashion-MNIST's training split, test canvases its test split, with fixed seeds, so the
set is the same on every machine.

The output is a ``VOCdevkit``: ``VOC2007/{Annotations,JPEGImages,ImageSets/Main/{trainval,test}.txt}``
plus ``classes.txt``, read by the same loader as real VOC (``experiments.voc``). It is written into a
temporary folder and moved into place at the end, so an interrupted run leaves nothing half-written.
"""
from __future__ import annotations

import io
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from halp.progress import progress_bar

from .data import load_fashion_mnist

CLASSES = ("tshirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle_boot")
YEAR = "VOC2007"


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A textured, muted background (float32 HxWx3 in 0..255): smooth colour noise and stripes."""
    coarse = torch.from_numpy(rng.uniform(20, 110, (1, 3, 4, 4)).astype(np.float32))
    img = F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)[0].numpy()
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    angle, period = rng.uniform(0, np.pi), rng.uniform(6, 24)
    stripes = 12 * np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * 2 * np.pi / period)
    grain = rng.normal(0, 6, (3, size, size))
    return np.clip(img + stripes + grain, 0, 255).transpose(1, 2, 0).astype(np.float32)


def _overlap(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over the smaller box's area."""
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    if w <= 0 or h <= 0:
        return 0.0
    smaller = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return float(w * h / smaller)


def compose(rng: np.random.Generator, images: torch.Tensor, labels: torch.Tensor, size: int = 128,
            max_items: int = 4) -> tuple[np.ndarray, list[tuple[int, list[int]]]]:
    """One canvas (uint8 HxWx3) and its objects ``(label, [xmin, ymin, xmax, ymax])`` (VOC's
    1-based inclusive pixel corners)."""
    canvas = _background(rng, size)
    objects: list[tuple[int, list[int]]] = []
    placed: list[np.ndarray] = []
    for _ in range(int(rng.integers(1, max_items + 1))):
        i = int(rng.integers(len(images)))
        side = int(rng.integers(24, 65))
        item = F.interpolate(images[i][None].float(), size=(side, side), mode="bilinear", align_corners=False,
                             antialias=True)[0, 0].numpy()
        alpha = np.clip(item / 255.0, 0, 1)
        ys, xs = np.nonzero(alpha > 0.1)
        if len(xs) == 0:
            continue
        for _attempt in range(20):  # a spot where it barely overlaps what is already there
            x0, y0 = (int(v) for v in rng.integers(0, size - side + 1, 2))
            box = np.array([x0 + xs.min(), y0 + ys.min(), x0 + xs.max() + 1, y0 + ys.max() + 1], np.float32)
            if all(_overlap(box, p) <= 0.1 for p in placed):
                break
        else:
            continue
        tint = rng.uniform(0.55, 1.0, 3) * 255
        region = canvas[y0:y0 + side, x0:x0 + side]
        region[:] = region * (1 - alpha[..., None]) + (tint[None, None] * alpha[..., None])
        placed.append(box)
        objects.append((int(labels[i]), [int(box[0]) + 1, int(box[1]) + 1, int(box[2]), int(box[3])]))
    if not objects:  # every attempt collided: place one item alone
        return compose(rng, images, labels, size, 1)
    return np.clip(canvas, 0, 255).round().astype(np.uint8), objects


def _xml(stem: str, size: int, objects: list[tuple[int, list[int]]]) -> str:
    objs = "".join(
        f"<object><name>{CLASSES[c]}</name><pose>Unspecified</pose><truncated>0</truncated><difficult>0</difficult>"
        f"<bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin><xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>"
        for c, b in objects)
    return (f"<annotation><folder>{YEAR}</folder><filename>{stem}.jpg</filename><source><database>Fashion-Det "
            f"(halp, from Fashion-MNIST)</database></source><size><width>{size}</width><height>{size}</height>"
            f"<depth>3</depth></size><segmented>0</segmented>{objs}</annotation>\n")


def make_fashiondet(out: str | os.PathLike, train: int = 6000, test: int = 1000, size: int = 128, seed: int = 0,
                    fashion_root: str | None = None, progress: bool = True, force: bool = False) -> Path:
    """Write the set to ``out`` (a VOCdevkit folder) and return it. Refuses to overwrite an existing
    ``out`` unless ``force``."""
    out = Path(out).expanduser()
    for name, v, low in (("train", train, 1), ("test", test, 1), ("size", size, 64), ("seed", seed, 0)):
        if not isinstance(v, int) or isinstance(v, bool) or v < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {v!r}")
    if out.exists() and not force:
        raise FileExistsError(f"{out} exists; choose another folder or pass --force to replace it")
    sources = {"trainval": load_fashion_mnist(fashion_root, True), "test": load_fashion_mnist(fashion_root, False)}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        from PIL import Image

        base = tmp / YEAR
        for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
            (base / sub).mkdir(parents=True)
        (tmp / "classes.txt").write_text("\n".join(CLASSES) + "\n")
        for split, count, salt in (("trainval", train, 1), ("test", test, 2)):
            images, labels = sources[split]
            rng = np.random.default_rng([seed, salt])
            stems = []
            for k in progress_bar(range(count), enabled=progress, desc=f"fashiondet {split}"):
                stem = f"{split}_{k:06d}"
                canvas, objects = compose(rng, images, labels, size)
                buf = io.BytesIO()
                Image.fromarray(canvas, "RGB").save(buf, format="JPEG", quality=95)
                (base / "JPEGImages" / f"{stem}.jpg").write_bytes(buf.getvalue())
                (base / "Annotations" / f"{stem}.xml").write_text(_xml(stem, size, objects))
                stems.append(stem)
            (base / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(stems) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
