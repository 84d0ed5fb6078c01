"""Where latency is measured: one interface, chosen by name.

- ``torch`` — PyTorch eager on the CPU (default; what this project measures and claims).
- ``onnxruntime`` — ONNX Runtime's CPU execution provider.
- ``torch-cuda`` — PyTorch eager on a CUDA GPU timed with CUDA events, with the paper's protocol
  (:data:`~halp.latency.timing.CUDA_EVENTS`). Written to the same interface and tested on the CPU
  with a fake CUDA, but **unverified on a GPU**: our machines have none.
"""
from __future__ import annotations

import copy
import ctypes
import ctypes.util
import io
import os
import platform
import shutil
import subprocess
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

Runner = Callable[[], object]


@dataclass
class Setting:
    """The deployment setting a table is valid for."""

    backend: str = "torch"
    batch: int = 1
    threads: int = 1
    channels_last: bool = False
    dtype: str = "float32"
    allocator: str = "steady"

    def __post_init__(self) -> None:
        if self.allocator not in ("steady", "default"):
            raise ValueError(f"allocator must be 'steady' or 'default', got {self.allocator!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown backend {self.backend!r}; choose one of {', '.join(BACKENDS)}")
        if self.batch < 1:
            raise ValueError(f"batch must be >= 1, got {self.batch}")
        if self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")
        if self.dtype not in ("float32", "float16"):
            raise ValueError(f"dtype must be float32 or float16, got {self.dtype!r}")
        if self.dtype == "float16" and self.backend != "torch-cuda":
            raise ValueError("float16 timing is only offered on torch-cuda")

    @property
    def memory_format(self) -> str:
        return "channels_last" if self.channels_last else "contiguous"


# glibc mallopt parameters
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def steady_allocator() -> bool:
    """Keep freed memory in the process (glibc): no mmap/munmap and page faults per forward.

    With glibc's defaults a conv's output buffer may be mmapped and returned to the OS on every
    call, and whether that happens depends on the process's allocation history: we measured the
    same conv at 1.1 ms or 0.29 ms in one process. Long-running servers (and jemalloc/tcmalloc)
    sit in the steady regime, so we time there. Returns False where this is not glibc.
    """
    name = ctypes.util.find_library("c")
    if platform.system() != "Linux" or not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, 32 * 1024 * 1024)
                    and libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    except (OSError, AttributeError):
        return False


def torch_version() -> str:
    """The running torch's version without the local build tag (``2.4.1``, not ``2.4.1+cpu``)."""
    return torch.__version__.split("+")[0]


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@dataclass
class Backend:
    """Prepares a module + input for repeated forwards and times them."""

    name: str
    setting: Setting
    _restore_threads: int = field(default=0, repr=False)

    def available(self) -> tuple[bool, str]:
        return True, ""

    def device(self) -> dict:
        return {"kind": "cpu", "name": cpu_name(), "arch": platform.machine(),
                "logical_cpus": os.cpu_count()}

    def versions(self) -> dict:
        return {"torch": torch_version()}

    def __enter__(self) -> "Backend":
        ok, why = self.available()
        if not ok:
            raise RuntimeError(f"backend {self.name} is not available here: {why}")
        self._restore_threads = torch.get_num_threads()
        torch.set_num_threads(self.setting.threads)
        if self.setting.allocator == "steady" and not steady_allocator():
            warnings.warn("could not tune the C allocator (not glibc?): timings may vary with "
                          "allocation history; recording allocator='default'")
            self.setting.allocator = "default"
        return self

    def __exit__(self, *exc: object) -> None:
        torch.set_num_threads(self._restore_threads)

    def prepare(self, module: nn.Module, x: torch.Tensor, weight_pool: torch.Tensor | None = None) -> Runner:
        """A closure running ``module(x)``. With ``weight_pool`` (a large flat tensor), a unit
        whose first layer is a conv or linear takes that layer's weights from a different slice
        of the pool on every call, so the weights come from as far down the cache hierarchy as
        they would in the whole network (see :class:`~halp.latency.timing.Protocol`)."""
        module = module.eval()
        if self.setting.channels_last and x.dim() == 4:
            module = module.to(memory_format=torch.channels_last)
            x = x.contiguous(memory_format=torch.channels_last)
        first = module[0] if isinstance(module, nn.Sequential) else module
        if weight_pool is None or not isinstance(first, (nn.Conv2d, nn.Linear)):
            def run() -> object:
                with torch.inference_mode():
                    return module(x)
            return run
        views = _weight_views(weight_pool, first.weight, self.setting.channels_last)
        rest = list(module)[1:] if isinstance(module, nn.Sequential) else []
        state = {"i": 0}
        if isinstance(first, nn.Conv2d):
            def layer(w: torch.Tensor) -> torch.Tensor:
                return F.conv2d(x, w, first.bias, first.stride, first.padding, first.dilation, first.groups)
        else:
            def layer(w: torch.Tensor) -> torch.Tensor:
                return F.linear(x, w, first.bias)

        def run() -> object:
            with torch.inference_mode():
                state["i"] = (state["i"] + 1) % len(views)
                y = layer(views[state["i"]])
                for m in rest:
                    y = m(y)
                return y
        return run

    def time_ms(self, run: Runner, n: int) -> float:
        """Mean milliseconds of ``n`` back-to-back calls."""
        t0 = time.perf_counter()
        for _ in range(n):
            run()
        return (time.perf_counter() - t0) * 1e3 / n


ALIGN_BYTES = 64  # PyTorch's CPU allocator aligns every tensor to 64 bytes; so must our weight views
MAX_VIEWS = 4096  # tiny weights: this many views spread over the pool, not one per 64 bytes


def _weight_views(pool: torch.Tensor, weight: torch.Tensor, channels_last: bool) -> list[torch.Tensor]:
    """Views of ``pool`` shaped like ``weight``, each starting 64-byte aligned as a real weight
    would (a depthwise weight 16 bytes off the 64-byte grid measured up to 1.5x slower).

    At most ``MAX_VIEWS``, spaced evenly over the pool: a weight of a few hundred bytes would
    otherwise get one view per 64 bytes of the pool (over 100,000 for a 9 MB pool), and creating
    them took up to a second per table point, more than timing it. Consecutive calls still read
    far-apart memory; views repeat only after ``MAX_VIEWS`` calls."""
    n = weight.numel()
    per = ALIGN_BYTES // pool.element_size()
    skip = (-(pool.data_ptr() % ALIGN_BYTES) // pool.element_size()) % per  # the pool's first aligned element
    stride = -(-n // per) * per
    stride = max(stride, -(-(pool.numel() - skip - n) // (MAX_VIEWS * per)) * per)
    count = (pool.numel() - skip - n) // stride + 1 if n + skip <= pool.numel() else 0
    views = [pool[skip + i * stride: skip + i * stride + n].view(weight.shape) for i in range(count)] if count \
        else [weight.detach()]
    if channels_last and weight.dim() == 4:
        views = [v.contiguous(memory_format=torch.channels_last) for v in views[:1]] * len(views)
    return views


class OnnxRuntimeBackend(Backend):
    def available(self) -> tuple[bool, str]:
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            return False, "onnxruntime is not installed (pip install 'halp[onnx]')"
        return True, ""

    def versions(self) -> dict:
        import onnxruntime

        return {**super().versions(), "onnxruntime": onnxruntime.__version__}

    def prepare(self, module: nn.Module, x: torch.Tensor, weight_pool: torch.Tensor | None = None) -> Runner:
        import onnxruntime as ort  # weights are baked into the session: no weight pool

        buf = io.BytesIO()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(module.eval(), (x,), buf, input_names=["input"], dynamo=False,
                              opset_version=18)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.setting.threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        sess = ort.InferenceSession(buf.getvalue(), opts, providers=["CPUExecutionProvider"])
        feed = {"input": x.numpy()}
        return lambda: sess.run(None, feed)


def gpu_driver_version() -> str | None:
    """The NVIDIA driver's version (``550.54.15``) from pynvml if installed, else ``nvidia-smi``;
    None when neither answers. Unverified on a GPU."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            v = pynvml.nvmlSystemGetDriverVersion()
            return v.decode() if isinstance(v, bytes) else str(v)
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # not installed, or no NVML on this machine: try nvidia-smi
        pass
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        out = subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    lines = [ln.strip() for ln in out.splitlines() if ln.strip()]
    return lines[0] if lines else None  # one line per GPU; one driver serves them all


def cuda_versions() -> dict:
    """The CUDA and cuDNN versions this torch runs with (``torch.version.cuda``,
    ``torch.backends.cudnn.version()``; None where it has none): kernels, and so latencies, change
    between them, so a CUDA table records them and is refused under others."""
    return {"cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version()}


def running_versions(backend: str) -> dict:
    """The library versions a table made with ``backend`` is checked against, here and now."""
    if backend == "torch-cuda":
        return {"torch": torch_version(), **cuda_versions()}
    return {"torch": torch_version()}


class CudaBackend(Backend):
    """PyTorch eager on the current CUDA device, timed with CUDA events.

    :func:`~halp.latency.timing.measure` times it with the paper's protocol whatever protocol the
    caller passes (:data:`~halp.latency.timing.CUDA_EVENTS`: 10 warm-up + 30 timed forwards, one
    event pair per forward, median). It has no weight pool: weights stay where the module has them.
    Unverified on a GPU (tested with a fake ``torch.cuda``)."""

    target = "cuda"  # where prepare() puts module and input (tests point it at the CPU)

    def available(self) -> tuple[bool, str]:
        if not torch.cuda.is_available():
            return False, "torch.cuda.is_available() is False (no GPU or no CUDA driver)"
        return True, ""

    def device(self) -> dict:
        """The GPU: name (checked against a table's), compute capability, driver; informational:
        whether cuDNN may use TF32 for fp32 convs and autotunes (both change fp32 latency).
        Unverified on a GPU."""
        ok, why = self.available()
        if not ok:
            raise RuntimeError(f"backend {self.name} is not available here: {why}")
        idx = torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(idx)
        return {"kind": "cuda", "name": torch.cuda.get_device_name(idx), "capability": f"{major}.{minor}",
                "driver": gpu_driver_version(), "arch": platform.machine(),
                "cudnn_tf32": bool(torch.backends.cudnn.allow_tf32),
                "cudnn_benchmark": bool(torch.backends.cudnn.benchmark)}

    def versions(self) -> dict:
        return {**super().versions(), **cuda_versions()}

    def prepare(self, module: nn.Module, x: torch.Tensor, weight_pool: torch.Tensor | None = None) -> Runner:
        """``module(x)`` on the GPU in the setting's dtype and memory format. The module is copied:
        the caller's (e.g. a job's dense and slim models) stays on the CPU in fp32.
        Unverified on a GPU."""
        dtype = torch.float16 if self.setting.dtype == "float16" else torch.float32
        module = copy.deepcopy(module).eval().to(self.target, dtype)
        x = x.to(self.target, dtype)
        if self.setting.channels_last and x.dim() == 4:
            module = module.to(memory_format=torch.channels_last)
            x = x.contiguous(memory_format=torch.channels_last)

        def run() -> object:
            with torch.inference_mode():
                return module(x)
        return run

    def time_ms(self, run: Runner, n: int) -> float:
        """Mean milliseconds of ``n`` back-to-back calls between two CUDA events. The GPU is idle
        at the start (synchronized), so launch latency counts, as it does for a deployed forward.
        Unverified on a GPU."""
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        for _ in range(n):
            run()
        end.record()
        torch.cuda.synchronize()  # elapsed_time needs both events completed
        return start.elapsed_time(end) / n


BACKENDS: dict[str, type[Backend]] = {"torch": Backend, "onnxruntime": OnnxRuntimeBackend,
                                      "torch-cuda": CudaBackend}


def get_backend(setting: Setting) -> Backend:
    """The backend named by ``setting.backend`` (use it as a context manager)."""
    return BACKENDS[setting.backend](setting.backend, setting)
