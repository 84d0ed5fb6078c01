"""Multi-process training of one job: who am I, and how do the processes agree.

A job runs as ``world`` processes started by torchrun (``RANK``/``WORLD_SIZE``/``MASTER_ADDR``/
``MASTER_PORT``) or as Slurm tasks (``SLURM_PROCID``/``SLURM_NTASKS``, the first node of the job is
the master, the port is derived from the job id). Gloo on the CPU, NCCL on GPUs (each rank on the
GPU of its local rank, set by :meth:`experiments.runtime.RuntimeConfig.resolve` before joining;
NCCL has not run on our CPU-only machines).

Each process takes its shard of every global batch; DDP averages the gradients, so every rank
computes the same saliency, and the pruning decision is taken on rank 0 and broadcast (so that
floating-point ties can never split the ranks). Only rank 0 writes files.
"""
from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


SINGLE = DistEnv()


def _first_host(nodelist: str) -> str:
    """First host of a Slurm node list (``node[01-04,07]`` → ``node01``), via scontrol if present."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             timeout=10)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.split()[0]
    except (OSError, subprocess.SubprocessError):
        pass
    m = re.match(r"([^\[,]+)(?:\[(\d+))?", nodelist)
    return (m.group(1) + (m.group(2) or "")) if m else "127.0.0.1"


def detect() -> DistEnv:
    """The process's place in the job from torchrun's or Slurm's environment (single otherwise)."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistEnv(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)))
    if int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in env:
        return DistEnv(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)))
    return SINGLE


def pick_backend(backend: str, device_type: str) -> str:
    """The process-group backend for tensors on ``device_type``: NCCL carries only CUDA tensors,
    so ``auto`` means NCCL on CUDA and gloo on the CPU, and NCCL with CPU tensors is an error."""
    if backend == "auto":
        return "nccl" if device_type == "cuda" else "gloo"
    if backend == "nccl" and device_type != "cuda":
        raise ValueError("dist_backend=nccl needs the model on CUDA (NCCL cannot carry CPU tensors); "
                         "use dist_backend=gloo or auto with trainer.device=cpu")
    return backend


def init(backend: str = "auto", timeout_s: float = 1800.0, device_type: str = "cpu") -> DistEnv:
    """Join the job's process group if there is more than one process; return where we are.
    ``device_type`` is where the job's tensors live (see :func:`pick_backend`)."""
    de = detect()
    if not de.enabled or dist.is_initialized():
        return de
    backend = pick_backend(backend, device_type)
    if "MASTER_ADDR" not in os.environ:  # Slurm tasks: derive a rendezvous both ranks agree on
        os.environ["MASTER_ADDR"] = _first_host(os.environ.get("SLURM_JOB_NODELIST", "127.0.0.1"))
        os.environ["MASTER_PORT"] = str(20000 + int(os.environ.get("SLURM_JOB_ID", "0")) % 20000)
    dist.init_process_group(backend, rank=de.rank, world_size=de.world, timeout=timedelta(seconds=timeout_s))
    return de


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier(de: DistEnv) -> None:
    if de.enabled:
        dist.barrier()


def broadcast(de: DistEnv, obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (any picklable object)."""
    if not de.enabled:
        return obj
    box = [obj if de.rank == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]
