"""Detection: mmdet SSD as a prunable CNN, the mmcv stand-in, the VOC loader, Fashion-Det and mAP.

Oracles: a brute-force greedy NMS (the stand-in's keeps), the masked detector (the slim one's raw
head outputs, at full size for both paper presets), hand-computed average precisions (the metric),
and the pixels the generator drew (Fashion-Det's boxes).
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("mmdet", reason="detection needs the det extra (mmdet, mmengine, mmcv-lite)")

from halp.detection import mmcv_compat  # noqa: E402
from halp.detection.evaluation import eval_mode_for, voc_map  # noqa: E402
from halp.detection.ssd import EndToEnd, RawSSD, build_ssd, detector_config  # noqa: E402
from halp.export import load_module, save_module  # noqa: E402
from halp.graph import ChannelGraph  # noqa: E402
from halp.masks import ChannelMasks  # noqa: E402
from halp.residual import vanished_blocks  # noqa: E402
from halp.slim import masked_copy, slim_model  # noqa: E402

from conftest import randomize_norms  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------- the mmcv stand-in
def greedy_nms(boxes: torch.Tensor, scores: torch.Tensor, thr: float) -> list[int]:
    """Textbook NMS: take the best box left, drop every box overlapping it by more than ``thr``."""
    order = sorted(range(len(scores)), key=lambda i: -float(scores[i]))
    keep: list[int] = []
    for i in order:
        ok = True
        for j in keep:
            a, b = boxes[i], boxes[j]
            w = max(0.0, float(min(a[2], b[2]) - max(a[0], b[0])))
            h = max(0.0, float(min(a[3], b[3]) - max(a[1], b[1])))
            inter = w * h
            union = float((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1])) - inter
            if inter / union > thr:
                ok = False
                break
        if ok:
            keep.append(i)
    return keep


def random_boxes(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * 200
    wh = torch.rand(n, 2, generator=g) * 60 + 4
    return torch.cat([xy, xy + wh], 1), torch.rand(n, generator=g), torch.randint(0, 4, (n,), generator=g)


def test_standin_nms_keeps_what_greedy_nms_keeps():
    assert mmcv_compat.ensure_mmcv_ops() in ("mmcv", mmcv_compat.STANDIN_NAME)
    for seed in range(3):
        boxes, scores, cls = random_boxes(300, seed)
        dets, keep = mmcv_compat.nms(boxes, scores, 0.45)
        assert keep.tolist() == greedy_nms(boxes, scores, 0.45)
        torch.testing.assert_close(dets[:, 4], scores[keep])
        # per class: greedy NMS within each class, merged by score
        dets, keep = mmcv_compat.batched_nms(boxes, scores, cls, {"type": "nms", "iou_threshold": 0.5})
        want = [i for c in range(4) for i in (torch.nonzero(cls == c).flatten()[
            greedy_nms(boxes[cls == c], scores[cls == c], 0.5)]).tolist()]
        assert sorted(keep.tolist()) == sorted(want)
        assert torch.all(dets[:-1, 4] >= dets[1:, 4])  # by score, descending (mmcv's contract)
        _, top = mmcv_compat.batched_nms(boxes, scores, cls, {"iou_threshold": 0.5, "max_num": 7})
        assert top.tolist() == keep[:7].tolist()
    empty = mmcv_compat.batched_nms(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.long),
                                    {"iou_threshold": 0.5})
    assert empty[0].shape == (0, 5) and empty[1].numel() == 0


def test_standin_placeholders_fail_only_when_used():
    if mmcv_compat.has_compiled_mmcv():
        pytest.skip("compiled mmcv present: the real ops are used, no stand-in")
    import mmcv.ops

    assert mmcv.ops.__halp_standin__ == mmcv_compat.STANDIN_NAME
    from mmcv.ops import DeformConv2d  # importable (mmdet imports such names at module load)
    with pytest.raises(NotImplementedError, match="compiled ops"):
        DeformConv2d(4, 4, 3)


# ---------------------------------------------------------------------- detectors and slimming
def check_slim_detector(model: RawSSD, seed: int, tmp_path: Path) -> None:
    model = randomize_norms(model).eval()
    s = model.input_size
    graph = ChannelGraph.build(model, (3, s, s))
    assert graph.output_layers and all(".bbox_head." in n for n in graph.output_layers)  # class/box outputs fixed
    assert any(".neck." in g for g in graph.groups) and any(".backbone." in g for g in graph.groups)
    masks = ChannelMasks.random(graph, torch.Generator().manual_seed(seed), vanish_prob=0.3)
    masked, _ = masked_copy(graph, masks)
    slim = slim_model(graph, masks).eval()
    x = torch.randn(2, 3, s, s, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        dense, ref, out = model(x), masked.eval()(x), slim(x)
    assert len(out) == len(ref) == 2 * len(model.detector.bbox_head.cls_convs)
    changed = 0.0
    for d, r, o in zip(dense, ref, out):
        scale = max(float(r.abs().max()), 1e-12)
        torch.testing.assert_close(o, r, rtol=1e-4, atol=1e-4 * scale)
        changed = max(changed, float((d - r).abs().max()) / scale)
    assert changed > 1e-3  # the masks changed the function: the comparison above is not vacuous
    assert sum(p.numel() for p in slim.parameters()) < sum(p.numel() for p in model.parameters())
    # saved as a module: loads (in a fresh process) without any mmdet config, detects the same
    path = save_module(slim, tmp_path / "slim.pt")
    code = (f"import torch; from halp.export import load_module; m = load_module({str(path)!r}); "
            f"x = torch.load({str(tmp_path / 'x.pt')!r}); "
            f"torch.save([o for o in m.eval()(x)], {str(tmp_path / 'out.pt')!r})")
    torch.save(x, tmp_path / "x.pt")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=300)
    for o, r in zip(torch.load(tmp_path / "out.pt"), out):  # another process may pick other conv kernels
        torch.testing.assert_close(o, r, rtol=1e-4, atol=1e-4 * max(float(r.abs().max()), 1e-12))
    loaded = load_module(path)
    dets = loaded.predict(x, score_thr=0.0)
    assert len(dets) == 2 and all(len(d["boxes"]) == len(d["scores"]) == len(d["labels"]) > 0 for d in dets)


@pytest.mark.parametrize("name", ["ssd512_r50", "ssd300", "ssd_tiny"])
def test_slim_detector_equals_masked_full_size(name, tmp_path):
    torch.manual_seed(0)
    model = build_ssd(name, num_classes=20)
    check_slim_detector(model, seed=3, tmp_path=tmp_path)
    if name == "ssd300":  # SSD's L2Norm scales conv4_3's stream per channel: that group stays whole
        graph = ChannelGraph.build(model, (3, 300, 300))
        l2 = [g for g in graph.groups.values() if g.unsupported]
        assert len(l2) == 1 and "l2_norm" in l2[0].unsupported[0] and not l2[0].prunable
    if name == "ssd_tiny":  # ResNet branches can empty; the slim detector still equals the masked one
        graph = ChannelGraph.build(model.eval(), (3, 128, 128))
        masks = ChannelMasks.random(graph, torch.Generator().manual_seed(0), vanish_prob=1.0)
        assert vanished_blocks(graph, masks.widths())


def test_detector_trains_and_detects():
    torch.manual_seed(0)
    model = build_ssd("ssd_tiny", num_classes=3)
    x = torch.randn(2, 3, 128, 128)
    targets = [{"boxes": torch.tensor([[10.0, 10.0, 60.0, 70.0]]), "labels": torch.tensor([1]),
                "difficult": torch.tensor([False])},
               {"boxes": torch.tensor([[5.0, 50.0, 40.0, 120.0], [70.0, 8.0, 120.0, 50.0]]),
                "labels": torch.tensor([0, 2]), "difficult": torch.tensor([False, True])}]
    model.train()
    loss = model(x, targets)
    assert loss.dim() == 0 and torch.isfinite(loss) and loss > 0
    loss.backward()
    assert all(p.grad is not None for p in model.detector.bbox_head.parameters())
    model.eval()
    assert [len(d["boxes"]) for d in EndToEnd(model)(x)] == [len(d["boxes"]) for d in model.predict(x)]


def test_config_without_ssd_head_is_refused(tmp_path):
    cfg = tmp_path / "retina.py"
    cfg.write_text("model = dict(type='RetinaNet', backbone=dict(type='ResNet', depth=18), "
                   "bbox_head=dict(type='RetinaHead', num_classes=20, in_channels=256))\n")
    with pytest.raises(ValueError, match="RetinaHead.*not 'SSDHead'"):
        detector_config(str(cfg), 20)
    with pytest.raises(ValueError, match="unknown detector"):
        detector_config("ssd1024", 20)
    model, size = detector_config("ssd_tiny", 7)
    assert size == 128 and model["bbox_head"]["num_classes"] == 7


# ---------------------------------------------------------------------- the metric
def _predictor(found):
    class Fixed(torch.nn.Module):
        def predict(self, x, score_thr=None):
            return found

    return Fixed()


def test_voc_map_matches_hand_computed_ap():
    # class 0: two objects; detections: a false positive (0.9), then a hit (0.8). Precision/recall
    # after each: (0, 0), (1/2, 1/2). 11-point AP = 6 recall levels (0..0.5) x 1/2 / 11; area = 1/4.
    # class 1: one object found by the best detection: AP 1. A difficult object of class 1 matched
    # by a low-score detection counts neither way.
    t = [{"boxes": torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0], [50.0, 50.0, 70.0, 70.0],
                                 [80.0, 80.0, 90.0, 90.0]]),
          "labels": torch.tensor([0, 0, 1, 1]), "difficult": torch.tensor([False, False, False, True])}]
    found = [{"boxes": torch.tensor([[40.0, 0.0, 45.0, 5.0], [20.0, 20.0, 30.0, 30.0], [50.0, 50.0, 70.0, 70.0],
                                     [80.0, 80.0, 90.0, 90.0]]),
              "scores": torch.tensor([0.9, 0.8, 0.95, 0.1]), "labels": torch.tensor([0, 0, 1, 1])}]
    x = torch.zeros(1, 3, 8, 8)
    eleven = voc_map(_predictor(found), [(x, t)], ("a", "b"), "11points", device="cpu")
    assert eleven["ap50_per_class"]["a"] == pytest.approx(100 * 6 * 0.5 / 11)
    assert eleven["ap50_per_class"]["b"] == pytest.approx(100.0)
    assert eleven["map50"] == pytest.approx(100 * (6 * 0.5 / 11 + 1) / 2)
    area = voc_map(_predictor(found), [(x, t)], ("a", "b"), "area", device="cpu")
    assert area["ap50_per_class"]["a"] == pytest.approx(25.0)
    assert eval_mode_for("VOC2007/test") == "11points" and eval_mode_for("VOC2012/val") == "area"


# ---------------------------------------------------------------------- Fashion-Det and the VOC loader
@pytest.fixture(scope="module")
def fashiondet(tmp_path_factory):
    from experiments.data import FASHION_MNIST_ROOT

    if not Path(FASHION_MNIST_ROOT, "train-images-idx3-ubyte.gz").exists():
        pytest.skip("needs Debian's dataset-fashion-mnist (scripts/bootstrap.sh installs it)")
    from experiments.fashiondet import make_fashiondet

    return make_fashiondet(tmp_path_factory.mktemp("fd") / "fashiondet", train=24, test=8, progress=False)


def test_fashiondet_is_voc_layout_with_tight_boxes(fashiondet, tmp_path):
    from experiments.fashiondet import CLASSES, make_fashiondet
    from experiments.voc import detection_splits

    base = fashiondet / "VOC2007"
    assert (fashiondet / "classes.txt").read_text().split() == list(CLASSES)
    assert len((base / "ImageSets/Main/trainval.txt").read_text().split()) == 24
    train, plain, test, classes = detection_splits(fashiondet, ["VOC2007/trainval"], ["VOC2007/test"], 128,
                                                   (0.0,) * 3, (1.0,) * 3, augment=False, cache=False)
    assert classes == CLASSES and len(train) == 24 and len(test) == 8 and test.split == "VOC2007/test"
    counts = [len(ann.labels) for ann in train.annotations]
    assert 1 <= min(counts) and max(counts) <= 4 and len(set(counts)) > 1
    # same seed, same bytes; another seed, other canvases
    again = make_fashiondet(tmp_path / "again", train=24, test=8, progress=False)
    first = sorted((base / "JPEGImages").iterdir())[0]
    assert (again / "VOC2007/JPEGImages" / first.name).read_bytes() == first.read_bytes()
    other = make_fashiondet(tmp_path / "other", train=24, test=8, seed=1, progress=False)
    assert (other / "VOC2007/JPEGImages" / first.name).read_bytes() != first.read_bytes()
    with pytest.raises(FileExistsError):
        make_fashiondet(tmp_path / "again", train=2, test=2, progress=False)


def test_fashiondet_boxes_are_tight_around_the_drawn_pixels():
    """Oracle: the canvas minus the same background (the generator draws the background first from
    the same RNG): every pixel the item changed lies in its box, and the box is no larger than the
    changed pixels (within one pixel of resampling)."""
    from experiments.fashiondet import _background, compose

    g = torch.Generator().manual_seed(0)
    items = (torch.rand(6, 1, 28, 28, generator=g) * 255).to(torch.uint8)
    items[:, :, :4] = 0  # a dark margin, as Fashion-MNIST items have
    items[:, :, :, 24:] = 0
    labels = torch.arange(6)
    for seed in range(6):
        canvas, objects = compose(np.random.default_rng(seed), items, labels, size=96, max_items=1)
        background = _background(np.random.default_rng(seed), 96)
        diff = np.abs(canvas.astype(np.float32) - background).max(-1)
        (label, (x1, y1, x2, y2)), = objects
        ys, xs = np.nonzero(diff > 4)  # drawn (beyond the uint8 rounding of the background)
        assert x1 - 1 <= xs.min() + 1 and xs.max() + 1 <= x2 + 1 and y1 - 1 <= ys.min() + 1 and ys.max() + 1 <= y2 + 1
        ys, xs = np.nonzero(diff > 0.2 * 255 * 0.55)  # clearly drawn: alpha well above the box's 0.1
        assert xs.min() <= x1 + 1 and xs.max() + 1 >= x2 - 1 and ys.min() <= y1 + 1 and ys.max() + 1 >= y2 - 1


def test_voc_loader_reads_boxes_flags_and_flips(fashiondet, tmp_path):
    import shutil

    from experiments.voc import detection_splits, load_annotations

    root = tmp_path / "voc"
    shutil.copytree(fashiondet, root)
    xml = sorted((root / "VOC2007/Annotations").glob("trainval_*.xml"))[0]
    text = xml.read_text().replace("<difficult>0</difficult>", "<difficult>1</difficult>", 1)
    xml.write_text(text)
    ann = load_annotations(root, ["VOC2007/trainval"], tuple((root / "classes.txt").read_text().split()))[0]
    assert ann.difficult[0] and not ann.difficult[1:].any()
    xmin = int(text.split("<xmin>")[1].split("<")[0])
    assert ann.boxes[0, 0] == xmin - 1  # VOC's 1-based corner, 0-based here
    train, plain, _, _ = detection_splits(root, ["VOC2007/trainval"], ["VOC2007/test"], 64, (0.0,) * 3,
                                          (1.0,) * 3, augment=True, cache=True)
    x, t = plain[0]
    assert x.shape == (3, 64, 64)
    torch.testing.assert_close(t["boxes"], torch.from_numpy(ann.boxes) * 0.5)  # 128 -> 64 px
    flipped = None
    for seed in range(20):  # the flip is drawn from torch's RNG (reseeded per batch by the trainer)
        torch.manual_seed(seed)
        xa, ta = train[0]
        if not torch.equal(xa, x):
            flipped = (xa, ta)
            break
    assert flipped is not None
    torch.testing.assert_close(flipped[0], x.flip(-1))
    torch.testing.assert_close(flipped[1]["boxes"][:, [0, 2]], 64 - t["boxes"][:, [2, 0]])
    images, targets = plain.collate([plain[0], plain[1]])
    assert images.shape == (2, 3, 64, 64) and len(targets) == 2


@pytest.mark.parametrize("defect", ["no_imagesets", "unknown_class", "bad_image", "missing_root", "no_ssd_head"])
def test_bad_voc_input_is_a_clear_error(defect, fashiondet, tmp_path):
    import shutil

    from experiments.config import JobConfig
    from experiments.data import DataConfig
    from experiments.job import ModelConfig, run_job

    root = tmp_path / "voc"
    shutil.copytree(fashiondet, root)
    if defect == "no_imagesets":
        shutil.rmtree(root / "VOC2007/ImageSets")
        match = "no ImageSets"
    elif defect == "unknown_class":
        xml = sorted((root / "VOC2007/Annotations").glob("test_*.xml"))[0]
        xml.write_text(xml.read_text().replace("<name>", "<name>zebra", 1))
        match = "names the class 'zebra.*not one of"
    elif defect == "bad_image":
        sorted((root / "VOC2007/JPEGImages").glob("trainval_*.jpg"))[3].write_bytes(b"not a jpeg at all")
        match = "cannot be decoded"
    elif defect == "missing_root":
        root = tmp_path / "nowhere"
        match = "VOC root .* not found.*make-fashiondet"
    else:
        retina = tmp_path / "retina.py"
        retina.write_text("model = dict(type='RetinaNet', backbone=dict(type='ResNet', depth=18), "
                          "bbox_head=dict(type='RetinaHead', num_classes=20, in_channels=256))\n")
        match = "RetinaHead.*not 'SSDHead'"
    model = f"mmdet:{tmp_path / 'retina.py'}" if defect == "no_ssd_head" else "mmdet:ssd_tiny"
    cfg = JobConfig(model=ModelConfig(name=model),
                    data=DataConfig(name="voc", root=str(root), image_size=128, voc_train=("VOC2007/trainval",),
                                    voc_test=("VOC2007/test",)), cache_dir=str(tmp_path / "cache"), progress=False)
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        run_job(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()  # nothing written


# ---------------------------------------------------------------------- every method on a detector
@pytest.mark.parametrize("method", ["halp", "magnitude", "taylor", "eagleeye"])
def test_every_method_prunes_a_detector_end_to_end(method, fashiondet, tmp_path):
    """`halp-run experiment=fashiondet_ssd method=X` at toy scale: the shared job (dense training,
    pruning while fine-tuning, slimming, mAP, both latencies) with every method; EagleEye picks
    its candidate by holdout mAP. Latency is priced by a synthetic table (decisions must not depend
    on this machine's load) and still measured."""
    from hydra import compose, initialize_config_dir

    import experiments.run  # noqa: F401  (registers the schema)
    from conftest import synthetic_table
    from experiments.job import run_job
    from halp.models import create_model
    from omegaconf import OmegaConf

    graph = ChannelGraph.build(create_model("mmdet:ssd_tiny", num_classes=10).eval(), (3, 128, 128))
    table = synthetic_table(graph, lambda spec, ci, co: 1e-3 * ci * co * spec.input_hw[0] * spec.input_hw[1] / 64
                            + 0.02, step=8)
    path = table.save(tmp_path / "table.json")
    over = ["experiment=fashiondet_ssd", f"method={method}", f"data.root={fashiondet}",
            f"latency.table={path}", "latency.allow_mismatch=true", "latency.overhead=none", "latency.batch=2",
            "latency.feedback=false", "measure_rounds=1", f"cache_dir={tmp_path / 'cache'}", "progress=false", "prune.interval=1",
            "prune.steps=2", "prune.target=0.6", "dense.epochs=1", "finetune.epochs=1", "dense.batch_size=8",
            "finetune.batch_size=8", "dense.eval_batch_size=8", "finetune.eval_batch_size=8"]
    over += {"taylor": ["method.neurons=8"], "eagleeye": ["method.candidates=3", "method.calib_batches=1",
                                                          "++method.batch_size=8", "method.holdout=8", "method.window=below",
                                                          "++method.workers=1"]}.get(method, [])
    with initialize_config_dir(str(ROOT / "experiments" / "conf"), version_base=None):
        cfg = OmegaConf.to_object(compose("main", overrides=over))
    rec = run_job(cfg, tmp_path / "run")
    assert rec["metric"] == "map50" and rec["dataset"] == "fashiondet" and rec["method"] == method
    assert rec["budget"]["final"] <= rec["budget"]["target"] * (1 + 1e-6) < rec["budget"]["dense"]
    assert rec["pruned"]["macs"] < rec["dense"]["macs"] and 0 <= rec["pruned"]["map50"] <= 100
    assert set(rec["pruned"]["ap50_per_class"]) == set((fashiondet / "classes.txt").read_text().split())
    if method == "eagleeye":
        assert rec["search"] and all(0 <= c["holdout_score"] <= 100 for c in rec["search"]["candidates"])


def test_halp_inspect_reads_a_saved_slim_detector(tmp_path, capsys):
    from halp.cli import main

    torch.manual_seed(0)
    model = build_ssd("ssd_tiny", num_classes=4).eval()
    graph = ChannelGraph.build(model, (3, 128, 128))
    masks = ChannelMasks.random(graph, torch.Generator().manual_seed(1))
    slim = slim_model(graph, masks)
    path = save_module(slim, tmp_path / "slim.pt")
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"model {path}  input 3x128x128" in out and "-> OK" in out
    assert "outputs (never pruned): detector.bbox_head.cls_convs.0.0" in out
    # the groups it lists are the slim detector's: their widths are the kept widths
    for gid, width in masks.widths().items():
        assert any(line.split()[:2] == [gid, str(width)] for line in out.splitlines()), gid


def test_ssd_augmentation_keeps_every_box_on_its_object(tmp_path):
    """mmdet's SSD pipeline (data.det_augment=ssd): photometric distortion, expand, min-IoU crop,
    flip, resize. Oracle: the objects are checkerboards on a flat black canvas (expand fills with
    the mean, here black too), so after any draw the pixels inside every box vary and the pixels
    outside all boxes do not. Same torch seed, same item."""
    from PIL import Image

    from experiments.voc import VOC_CLASSES, detection_splits

    base = tmp_path / "voc" / "VOC2007"
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (base / sub).mkdir(parents=True)
    img = np.zeros((120, 160, 3), np.uint8)
    boxes = [(20, 30, 70, 90), (100, 10, 150, 50)]
    objs = ""
    for k, (x1, y1, x2, y2) in enumerate(boxes):
        yy, xx = np.mgrid[y1:y2, x1:x2]
        img[y1:y2, x1:x2] = (((yy // 4 + xx // 4) % 2) * 255)[..., None]
        objs += (f"<object><name>{VOC_CLASSES[k]}</name><difficult>{k}</difficult><bndbox><xmin>{x1 + 1}</xmin>"
                 f"<ymin>{y1 + 1}</ymin><xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>")
    Image.fromarray(img).save(base / "JPEGImages" / "a.jpg", format="PNG")  # lossless pixels, any name
    (base / "Annotations" / "a.xml").write_text(f"<annotation><size><width>160</width><height>120</height>"
                                                f"<depth>3</depth></size>{objs}</annotation>")
    for split in ("trainval", "test"):
        (base / "ImageSets/Main" / f"{split}.txt").write_text("a\n")
    train, plain, _, _ = detection_splits(tmp_path / "voc", ["VOC2007/trainval"], ["VOC2007/test"], 96, (0.0,) * 3,
                                          (1.0,) * 3, augment="ssd", cache=True)
    sizes = set()
    for seed in range(40):
        torch.manual_seed(seed)
        x, t = train[0]
        assert x.shape == (3, 96, 96) and len(t["boxes"]) == len(t["labels"]) == len(t["difficult"]) >= 1
        assert (t["boxes"] >= 0).all() and (t["boxes"] <= 96).all()
        assert set(zip(t["labels"].tolist(), t["difficult"].tolist())) <= {(0, False), (1, True)}  # flags follow boxes
        outside = torch.ones(96, 96, dtype=torch.bool)
        cores = []
        for x1, y1, x2, y2 in t["boxes"].tolist():
            # resampling (up to ~3x up after a crop) blurs an edge over several pixels: keep clear of them
            outside[max(int(y1) - 12, 0):int(y2) + 12, max(int(x1) - 12, 0):int(x2) + 12] = False
            cx, cy, w, h = (x1 + x2) / 2, (y1 + y2) / 2, (x2 - x1) / 4, (y2 - y1) / 4
            cores.append(x[:, int(cy - h):int(cy + h) + 1, int(cx - w):int(cx + w) + 1])  # the box's central half
        if outside.any():
            background = x[:, outside].median()
            # the checkerboard averages to mid-grey however much it is zoomed out; the photometric
            # distortion (brightness x0.75-1.25, contrast 0.5-1.5) keeps it far above the black canvas
            assert all(c.mean() - background > 20 for c in cores), (seed, [c.mean() for c in cores], background)
            if len(t["boxes"]) == 2:  # a crop drops a box whose centre it cuts off (as mmdet's does), not its pixels
                stray = (x[:, outside].amax(0) > background + 20).float().mean()
                assert stray < 0.01, (seed, stray)  # no object pixels far from every box
        sizes.add(tuple(t["boxes"][0].round().int().tolist()))
        torch.manual_seed(seed)
        x2, t2 = train[0]
        assert torch.equal(x, x2) and torch.equal(t["boxes"], t2["boxes"])
    assert len(sizes) > 10  # expand, crop and flip did vary the geometry
    from experiments.data import DataConfig
    with pytest.raises(ValueError, match="det_augment must be one of flip, ssd"):
        DataConfig(name="voc", det_augment="mosaic")
    assert "det_augment" not in DataConfig(name="voc").identity()  # default: cache keys as before
    assert DataConfig(name="voc", det_augment="ssd").identity()["det_augment"] == "ssd"
