#!/usr/bin/env bash
# The GPU self-check as it is run on a lent GPU machine (issue 12; output in results/gpu_selfcheck.md).
#   bash scripts/gpu_selfcheck.sh OUTDIR
# On a machine where the project is not installed, put its pure-Python dependencies that the
# machine lacks (torch-pruning, hydra-core, omegaconf, antlr4) in .site/ first; the machine's own
# torch, torchvision and timm are used. Steps, each bounded by `timeout`:
#   1. the environment (GPU, driver, versions);
#   2. python -m experiments.selfcheck (ResNet-50 at 224x224, CUDA, fp16 AMP, CUDA-event table, ...);
#   3. halp lut validate on the table the self-check built (the CUDA timing protocol end to end);
#   4. NCCL with one rank: DDP with device_ids and an all_reduce on CUDA tensors (a single GPU
#      cannot hold two NCCL ranks, so this is as far as one GPU goes);
#   5. the self-check's job again with measured feedback on (latency.feedback=true).
set -u
out=${1:?usage: gpu_selfcheck.sh OUTDIR}
mkdir -p "$out"
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
export PYTHONPATH="$root/.site:$root${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 WANDB_MODE=disabled
py=${PYTHON:-python3}
work=${SELFCHECK_WORK:-/tmp/halp-selfcheck}
rm -rf "$work"

{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1
  $py -c "import torch, torchvision, timm, numpy, torch_pruning, hydra
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version())
print('torchvision', torchvision.__version__, 'timm', timm.__version__, 'numpy', numpy.__version__,
      'torch_pruning', torch_pruning.__version__, 'hydra', hydra.__version__)
print('gpus', torch.cuda.device_count(), [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])"
  git log -1 --format='commit %H' 2>/dev/null || true
} 2>&1 | tee "$out/env.txt"

echo "== self-check" | tee "$out/selfcheck.txt"
timeout "${SELFCHECK_TIMEOUT:-420}" $py -m experiments.selfcheck --out "$work" 2>&1 | tee -a "$out/selfcheck.txt"
cp "$work/job.log" "$out/job.log" 2>/dev/null
cp "$work/job/result.json" "$out/selfcheck.result.json" 2>/dev/null

table=$(find "$work/cache" -name '*.json' -path '*lut*' ! -name '*anchor*' 2>/dev/null | head -n 1)
echo "== lut validate ${table:-(no table found)}" | tee "$out/validate.txt"
if [ -n "$table" ]; then
  timeout "${VALIDATE_TIMEOUT:-120}" $py -m halp.cli lut validate "$table" torchvision:resnet50 --num-classes 10 \
    -k 8 --json "$out/validate.json" 2>&1 | tee -a "$out/validate.txt"
fi

echo "== nccl, one rank" | tee -a "$out/env.txt"
timeout 90 $py - <<'EOF' 2>&1 | tee -a "$out/env.txt"
import os
import torch
import torch.distributed as dist
from experiments import distributed as hd
if not torch.cuda.is_available():
    raise SystemExit("no CUDA: skipped")
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29533")
backend = hd.pick_backend("auto", "cuda")
dist.init_process_group(backend, rank=0, world_size=1)
torch.cuda.set_device(0)
net = torch.nn.parallel.DistributedDataParallel(torch.nn.Conv2d(3, 8, 3).cuda(), device_ids=[0])
net(torch.randn(2, 3, 8, 8, device="cuda")).sum().backward()
t = torch.arange(4.0, device="cuda")
dist.all_reduce(t)
print("backend", dist.get_backend(), "| DDP device_ids", net.device_ids, "| all_reduce", t.tolist(),
      "| grad on", next(net.parameters()).grad.device)
dist.destroy_process_group()
print("nccl one-rank check PASSED")
EOF
echo "== the self-check's job again with measured feedback (latency.feedback=true), reusing its table"
timeout "${FEEDBACK_TIMEOUT:-180}" $py - "$work" "$out" <<'EOF' 2>&1 | tail -n 25
import json, sys
from pathlib import Path
import torch
from experiments.selfcheck import overrides, run_job_process
work, out = Path(sys.argv[1]), Path(sys.argv[2])
args = [a for a in overrides(torch.cuda.is_available(), work) if not a.startswith("hydra.run.dir=")]
rc, sec = run_job_process(args + ["latency.feedback=true", f"hydra.run.dir={work / 'job_fb'}"], 1, out / "feedback.log")
print(f"exit {rc} after {sec:.0f} s")
rec = work / "job_fb" / "result.json"
if rec.exists():
    (out / "feedback.result.json").write_text(rec.read_text())
    r = json.loads(rec.read_text())
    print(f"dense {r['dense']['latency_ms']:.3f} ms, slim {r['pruned']['latency_ms']:.3f} ms, "
          f"slim/target {r['latency_vs_target']:.3f}; trials {r['prune_log'][-1].get('feedback_trials')}")
EOF
ls -la "$out"
