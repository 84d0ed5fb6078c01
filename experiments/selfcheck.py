"""A self-check of the GPU path, for the first minutes on a new GPU machine: does the whole job run
here, at the paper's scale where it matters, before a week of cluster time is spent on it?

``python -m experiments.selfcheck`` runs the main job on synthetic ImageNet-shaped data with
ResNet-50 at 224x224 on CUDA with fp16 AMP, channels_last and loader workers, DDP over every
visible GPU (torchrun), a small latency table timed with CUDA events, 5 pruning steps, slimming
and the dense/slim latency measurement; then it slims the job's final masks again on the device and
compares slim and masked outputs. It prints a pass/fail table and exits non-zero on a failure.
Without CUDA it runs the same code on the CPU at toy scale (ResNet-50 at 32x32, bf16, one
process) and says so; the test suite runs that mode.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


def overrides(cuda: bool, out: Path) -> list[str]:
    """The job's Hydra overrides: the paper's GPU setting scaled to minutes, or its CPU miniature."""
    common = ["model.name=torchvision:resnet50", "data.name=synthetic", "data.synthetic_classes=10",
              "method=halp", "prune.target=0.7", "prune.start=0", "prune.interval=2", "prune.steps=5",
              "prune.chunk=auto", "dense.epochs=1", "logger=none", "progress=false",
              f"cache_dir={out / 'cache'}", f"hydra.run.dir={out / 'job'}", "measure_rounds=3"]
    if cuda:  # CUDA only
        return common + [
            "device=gpu_b256", "latency.batch=64", "latency.step=128", "latency.refine_budget=0.05",
            "trainer.device=cuda", "trainer.amp=fp16", "trainer.channels_last=true",
            "data.synthetic_shape=[3,224,224]", "data.synthetic_samples=2048", "data.workers=4",
            "dense.batch_size=128", "finetune.batch_size=128", "dense.eval_batch_size=128",
            "finetune.eval_batch_size=128", "dense.lr=0.1", "finetune.lr=0.01", "finetune.epochs=2"]
    return common + [
        "device=cpu_b32", "latency.batch=2", "latency.step=128", "latency.rounds=1",
        "latency.refine_budget=0.02", "latency.time_limit_s=600",
        "trainer.device=cpu", "trainer.amp=bf16", "trainer.channels_last=true",
        "data.synthetic_shape=[3,32,32]", "data.synthetic_samples=64", "data.workers=2",
        "dense.batch_size=16", "finetune.batch_size=16", "dense.eval_batch_size=16",
        "finetune.eval_batch_size=16", "dense.threads=2", "finetune.threads=2", "dense.lr=0.01",
        "finetune.lr=0.01", "finetune.epochs=3"]  # 4 iterations per epoch: 5 steps every 2 need 10


def run_job_process(args: list[str], ranks: int, log: Path) -> tuple[int, float]:
    """``halp-run ARGS`` in a child process (under torchrun with ``ranks`` > 1); its output to ``log``."""
    cmd = [sys.executable, "-m", "experiments.run", *args]
    if ranks > 1:  # CUDA only: one process per GPU
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
               "-m", "experiments.run", *args]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "WANDB_MODE": "disabled"}
    t0 = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    return rc, time.perf_counter() - t0


def slim_matches_masked(masks_path: Path, input_shape: tuple[int, int, int], device: torch.device) -> Check:
    """The job's final masks on a fresh ResNet-50 (random BN statistics): slim and masked outputs on
    the device, in fp32, must agree."""
    from halp.graph import ChannelGraph
    from halp.masks import ChannelMasks
    from halp.models import create_model
    from halp.slim import masked_copy, slim_model

    torch.manual_seed(0)
    model = create_model("torchvision:resnet50", num_classes=10)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    graph = ChannelGraph.build(model, input_shape)
    masks = ChannelMasks.load(masks_path)
    masked, _ = masked_copy(graph, masks)
    slim = slim_model(graph, masks)
    x = torch.randn(4, *input_shape, device=device)
    # in true fp32: cuDNN's default TF32 convs round to ~1e-3, far above what slimming may change
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.no_grad():
            a = masked.eval().to(device)(x)
            b = slim.eval().to(device)(x)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
    diff, scale = float((a - b).abs().max()), float(a.abs().max())
    kept = sum(masks.widths().values()), sum(g.width for g in graph.groups.values())
    ok = diff <= 1e-4 * max(1.0, scale) and kept[0] < kept[1]
    return Check("slim = masked (job's masks)", ok,
                 f"max |diff| {diff:.2e} (outputs up to {scale:.2f}), {kept[0]}/{kept[1]} channels kept, on {device}, fp32 (no TF32)")


def checks_from_record(rec: dict, cuda: bool) -> list[Check]:
    p, d = rec["pruned"], rec["dense"]
    steps = len(rec["prune_log"])
    tp = rec["throughput"]["finetune"] or {}
    return [
        Check("trained on the device", rec["runtime"]["device"].startswith("cuda" if cuda else "cpu"),
              f"{rec['runtime']['description']}, {rec['world_size']} rank(s)"),
        Check("5 pruning steps within budget", steps == 5 and p["predicted_ms"] <= p["target_predicted_ms"] * (1 + 1e-9),
              f"{steps} steps; predicted {p['predicted_ms']:.3f} ms <= target {p['target_predicted_ms']:.3f} ms"),
        Check("latency table", bool(rec["lut"]["setting"]) and (rec["lut"]["setting"]["backend"] == "torch-cuda") == cuda,
              f"{rec['lut']['setting']['backend']}, batch {rec['lut']['setting']['batch']}, "
              f"{rec['wall_seconds']['lut']:.0f} s"),
        Check("measured latency", d["latency_ms"] > 0 and p["latency_ms"] > 0,
              f"dense {d['latency_ms']:.3f} ms, slim {p['latency_ms']:.3f} ms ({rec['speedup']:.2f}x), "
              f"slim/target {rec['latency_vs_target']:.3f}"),
        Check("throughput recorded", (tp.get("train_images_per_s") or 0) > 0,
              f"train {tp.get('train_images_per_s') or 0:.1f} img/s/rank, eval {tp.get('eval_images_per_s') or 0:.1f}, "
              f"data wait {100 * (tp.get('data_wait_fraction') or 0):.1f} %, peak {tp.get('peak_memory_mb') or 0:.0f} MB"),
    ]


def selfcheck(out: Path, force_cpu: bool = False) -> list[Check]:
    """Run the check into ``out``; the rows of its table."""
    cuda = torch.cuda.is_available() and not force_cpu
    ranks = torch.cuda.device_count() if cuda else 1
    out.mkdir(parents=True, exist_ok=True)
    env = (f"CUDA: {ranks} GPU(s), {torch.cuda.get_device_name(0)}, CUDA {torch.version.cuda}, "
           f"cuDNN {torch.backends.cudnn.version()}" if cuda else
           "no CUDA here: the same code runs on the CPU at toy scale (CPU mode)")
    rows = [Check("environment", True, f"torch {torch.__version__}; {env}")]
    args = overrides(cuda, out)
    rc, seconds = run_job_process(args, ranks, out / "job.log")
    rows.append(Check("job", rc == 0, f"exit {rc} after {seconds:.0f} s (log: {out / 'job.log'})"))
    record = out / "job" / "result.json"
    if rc != 0 or not record.exists():
        return rows
    rec = json.loads(record.read_text())
    rows += checks_from_record(rec, cuda)
    if cuda and ranks > 1:
        rows.append(Check("DDP", rec["world_size"] == ranks, f"{rec['world_size']} ranks over {ranks} GPUs (NCCL)"))
    shape = (3, 224, 224) if cuda else (3, 32, 32)
    rows.append(slim_matches_masked(out / "job" / "masks.json", shape, torch.device("cuda" if cuda else "cpu")))
    return rows


def format_table(rows: list[Check]) -> str:
    width = max(len(r.name) for r in rows)
    lines = [f"{'check':<{width}}  result  detail", f"{'-' * width}  ------  ------"]
    lines += [f"{r.name:<{width}}  {'PASS' if r.ok else 'FAIL':<6}  {r.detail}" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m experiments.selfcheck", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/selfcheck", help="folder for the job, its cache and log (default: %(default)s)")
    ap.add_argument("--cpu", action="store_true", help="CPU mode even where CUDA exists")
    args = ap.parse_args(argv)
    rows = selfcheck(Path(args.out).resolve(), args.cpu)
    print(format_table(rows))
    ok = all(r.ok for r in rows)
    print("self-check", "PASSED" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
