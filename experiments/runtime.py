"""Where and in which precision the trainer computes: one device for everything a job touches.

A GPU job that leaves one tensor on the wrong device fails late (or, worse, runs on the CPU
without saying so), so the choice is made once, here, and every consumer (the trainer, evaluation,
the pruners' buffers, checkpoints, DDP) asks this object instead of guessing. ``auto`` means CUDA
when it exists. fp16 autocast needs a :class:`torch.amp.GradScaler`; bf16 does not. The CUDA-only
branches (``cuda`` device, fp16 scaling, cuDNN benchmark, ``device_ids`` for DDP) are few and marked
"CUDA only"; on our CPU-only machines they have not run (see the README).
"""
from __future__ import annotations

import os
from contextlib import nullcontext
from dataclasses import dataclass
from typing import ContextManager

import torch

DEVICES = ("auto", "cpu", "cuda")
AMP_MODES = ("off", "bf16", "fp16")


@dataclass
class RuntimeConfig:
    """``trainer.*``: the compute device and precision shared by dense training and fine-tuning.

    ``device``: auto (CUDA if available) | cpu | cuda. ``amp``: off | bf16 | fp16 (fp16: CUDA only,
    with loss scaling). ``channels_last``: NHWC weights and batches (faster convs on GPUs with tensor
    cores and on recent CPUs). ``cudnn_benchmark``: let cuDNN time its kernels once per shape
    (our shapes are fixed)."""

    device: str = "auto"
    amp: str = "off"
    channels_last: bool = False
    cudnn_benchmark: bool = True

    def __post_init__(self) -> None:
        if self.device not in DEVICES:
            raise ValueError(f"trainer.device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        if self.amp not in AMP_MODES:
            raise ValueError(f"trainer.amp must be one of {', '.join(AMP_MODES)}, got {self.amp!r}")

    def resolve(self, local_rank: int = 0) -> "Runtime":
        """The concrete runtime of this process (rank ``local_rank`` on its node)."""
        kind = self.device
        if kind == "auto":
            kind = "cuda" if torch.cuda.is_available() else "cpu"
        if kind == "cuda":  # CUDA only
            if not torch.cuda.is_available():
                raise ValueError("trainer.device=cuda, but torch.cuda.is_available() is False on this machine "
                                 "(no GPU, no driver, or a CPU-only torch); use trainer.device=cpu or auto")
            index = local_rank % torch.cuda.device_count()
            torch.cuda.set_device(index)
            torch.backends.cudnn.benchmark = self.cudnn_benchmark
            device = torch.device("cuda", index)
        else:
            device = torch.device("cpu")
        if self.amp == "fp16" and device.type != "cuda":
            raise ValueError("trainer.amp=fp16 needs CUDA (loss-scaled half precision); on the CPU use "
                             "trainer.amp=bf16 or off")
        return Runtime(device, self.amp, self.channels_last)


@dataclass(frozen=True)
class Runtime:
    """A resolved :class:`RuntimeConfig`: what tensors go to and how forward passes are cast."""

    device: torch.device
    amp: str = "off"
    channels_last: bool = False

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def amp_dtype(self) -> torch.dtype | None:
        """The reduced precision of forward passes (``None`` with ``amp=off``)."""
        return {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[self.amp]

    def autocast(self) -> ContextManager:
        """Mixed precision for forward passes (a no-op with ``amp=off``)."""
        dtype = self.amp_dtype
        return nullcontext() if dtype is None else torch.autocast(self.device.type, dtype=dtype)

    def grad_scaler(self) -> torch.amp.GradScaler | None:
        """A loss scaler for fp16 (CUDA only); bf16 and fp32 need none."""
        return torch.amp.GradScaler("cuda") if self.amp == "fp16" else None

    def model(self, model: torch.nn.Module) -> torch.nn.Module:
        """Move ``model`` here in place (parameters keep their identity, so graphs and pruners that
        hold references to the modules stay valid)."""
        return model.to(self.device, memory_format=self.memory_format)

    def batch(self, x: torch.Tensor) -> torch.Tensor:
        """A batch of images on the device, in the model's memory format; ``non_blocking`` copies
        overlap with compute when the loader pins memory (CUDA only)."""
        x = x.to(self.device, non_blocking=self.is_cuda)
        return x.contiguous(memory_format=self.memory_format) if self.channels_last and x.dim() == 4 else x

    def labels(self, y: torch.Tensor | list) -> torch.Tensor | list:
        """Class labels, or detection targets (a list of per-image dicts of tensors), on the device."""
        if isinstance(y, torch.Tensor):
            return y.to(self.device, non_blocking=self.is_cuda)
        return [{k: v.to(self.device, non_blocking=self.is_cuda) for k, v in t.items()} for t in y]

    def peak_memory_mb(self) -> float:
        """Peak memory of this process: allocated CUDA memory on a GPU, resident set size on the CPU."""
        if self.is_cuda:  # CUDA only
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        try:
            import resource
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux
        except (ImportError, OSError):
            return float("nan")

    def describe(self) -> str:
        name = torch.cuda.get_device_name(self.device) if self.is_cuda else f"cpu ({os.cpu_count()} cores)"
        return f"{self.device} [{name}], amp {self.amp}, {'channels_last' if self.channels_last else 'NCHW'}"


CPU = Runtime(torch.device("cpu"))
