"""The CUDA backend on a machine without a GPU: ``torch.cuda`` is faked (events read a fake clock
that the forwards advance), so the paper's protocol, the recorded GPU metadata and the refusal of
tables from another GPU / CUDA / cuDNN are checked exactly. What only a real GPU can show (that
events time what they should) is not tested here."""
from __future__ import annotations

import dataclasses
import math
import subprocess
import sys

import pytest
import torch
from torch import nn

from halp.graph import ChannelGraph
from halp.latency import backends as B
from halp.latency.backends import Backend, CudaBackend, Setting
from halp.latency.build import build_table, plan_build
from halp.latency.table import LatencyTable
from halp.latency.timing import CUDA_EVENTS, Protocol, measure, protocol_for
from halp.models import create_model

GPU = "NVIDIA H200"
DEVICE = {"kind": "cuda", "name": GPU, "capability": "9.0", "driver": "550.54.15", "cudnn_tf32": True,
          "cudnn_benchmark": False}


class Clock:
    """GPU time in ms: forwards advance it, events read it."""

    def __init__(self) -> None:
        self.now = 0.0
        self.syncs = 0
        self.events = 0


CLOCK = Clock()


class FakeEvent:
    def __init__(self, enable_timing: bool = False) -> None:
        assert enable_timing, "an event without timing cannot be timed"
        self.t: float | None = None
        CLOCK.events += 1

    def record(self) -> None:
        self.t = CLOCK.now

    def elapsed_time(self, end: "FakeEvent") -> float:
        assert self.t is not None and end.t is not None, "elapsed_time of an event never recorded"
        return end.t - self.t


def params_ms(module: nn.Module) -> float:
    """Fake forward time of a whole module: proportional to its parameters."""
    return 1e-4 * sum(p.numel() for p in module.parameters()) + 0.5


class ClockedCuda(CudaBackend):
    """The real CudaBackend (run on the CPU), whose forwards take ``params_ms`` on the fake clock."""

    def prepare(self, module, x, weight_pool=None):
        run, ms = super().prepare(module, x, weight_pool), params_ms(module)

        def timed() -> object:
            CLOCK.now += ms
            return run()
        return timed


@pytest.fixture
def cuda(monkeypatch):
    """A fake H200 with CUDA 12.4, cuDNN 9.1 and driver 550.54.15; tensors stay on the CPU."""
    global CLOCK
    CLOCK = Clock()

    def sync() -> None:
        CLOCK.syncs += 1
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda idx=None: GPU)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda idx=None: (9, 0))
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "synchronize", sync)
    monkeypatch.setattr(torch.version, "cuda", "12.4")
    monkeypatch.setattr(torch.backends.cudnn, "version", lambda: 90100)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    monkeypatch.setattr(B, "gpu_driver_version", lambda: "550.54.15")
    monkeypatch.setattr(CudaBackend, "target", "cpu")
    return Setting(backend="torch-cuda", batch=2)


def scripted(durations: list[float]):
    """A runner whose i-th call takes durations[i] ms of GPU time; ``.calls`` counts its calls."""
    def run() -> None:
        CLOCK.now += durations[run.calls]
        run.calls += 1
    run.calls = 0
    return run


# ---------------------------------------------------------------- timing
def test_cuda_timing_is_10_warmups_then_the_median_of_30_single_event_timed_forwards(cuda):
    warm = [1000.0 + i for i in range(10)]  # any warm-up counted as a sample would move the medians
    perm = [(7 * k) % 30 for k in range(30)]  # 0..29 in a scrambled order
    a = scripted(warm + [2.0 + 0.1 * k for k in perm])
    b = scripted(warm + [float((k + 1) ** 2) for k in perm])
    backend = CudaBackend("torch-cuda", cuda)
    # whatever the caller asks for (here the CPU anchors' protocol), CUDA times with the paper's
    ta, tb = measure(backend, [a, b], Protocol(rounds=9, sample_ms=50.0, seed=3))
    assert (a.calls, b.calls) == (40, 40)
    assert ta.samples == tb.samples == 30 and not ta.remeasured and not tb.remeasured
    assert ta.ms == pytest.approx(2.0 + 0.1 * (14 + 15) / 2)  # the median of 2.0, 2.1, ..., 4.9
    assert tb.ms == pytest.approx((15 ** 2 + 16 ** 2) / 2)    # the median of 1, 4, ..., 900
    # two synchronizations per timed forward, none for choosing a call count
    assert CLOCK.syncs == 2 * 60 and CLOCK.events == 2 * 60


def test_cuda_time_ms_is_the_mean_between_two_events(cuda):
    run = scripted([1.0, 2.0, 6.0])
    assert CudaBackend("torch-cuda", cuda).time_ms(run, 3) == pytest.approx(3.0)
    assert CLOCK.syncs == 2 and run.calls == 3


def test_the_cpu_protocol_and_its_record_are_unchanged():
    assert Protocol().to_dict() == {"rounds": 5, "sample_ms": 4.0, "max_calls": 200, "max_spread": 0.08,
                                    "extra_rounds": 4, "max_extra": 2, "extra_budget": 0.2, "warm_calls": 1,
                                    "weight_pool_mb": None, "seed": 0}
    p = Protocol(rounds=3)
    assert protocol_for(Backend("torch", Setting()), p) is p
    assert CUDA_EVENTS.to_dict()["warmup"] == 10 and protocol_for(CudaBackend("torch-cuda", Setting()), p) \
        == dataclasses.replace(CUDA_EVENTS, seed=0)
    with pytest.raises(ValueError, match="warmup must be >= 0"):
        Protocol(warmup=-1)

    class Counting(Backend):
        def time_ms(self, run, n):
            asked.append(n)
            for _ in range(n):
                run()
            return 1.0
    asked: list[int] = []
    run = scripted([0.0] * 100)
    (t,) = measure(Counting("torch", Setting()), [run], p)
    # 1 discarded call, 1 timed to choose 4 calls per 4 ms sample, then 3 rounds of 1 warm + 4 timed
    assert asked == [1, 4, 4, 4] and run.calls == 1 + 1 + 3 * (1 + 4) and t.samples == 3


# ---------------------------------------------------------------- metadata
def test_the_gpu_its_driver_and_cuda_cudnn_versions_are_recorded(cuda):
    backend = CudaBackend("torch-cuda", cuda)
    assert backend.device() == {**DEVICE, "arch": B.platform.machine()}
    assert backend.versions() == {"torch": B.torch_version(), "cuda": "12.4", "cudnn": 90100}
    assert B.running_versions("torch-cuda") == backend.versions()
    assert B.running_versions("torch") == {"torch": B.torch_version()}


def test_no_gpu_says_so(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="torch-cuda is not available here: torch.cuda.is_available"):
        CudaBackend("torch-cuda", Setting(backend="torch-cuda")).device()


def test_driver_version_from_nvidia_smi_or_none(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # not installed
    asked = []

    def smi(cmd, **kw):
        asked.append(cmd)
        return subprocess.CompletedProcess(cmd, 0, stdout="550.54.15\n550.54.15\n", stderr="")
    monkeypatch.setattr(B.shutil, "which", lambda name: "/usr/bin/nvidia-smi" if name == "nvidia-smi" else None)
    monkeypatch.setattr(B.subprocess, "run", smi)
    assert B.gpu_driver_version() == "550.54.15"
    assert asked == [["/usr/bin/nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]]

    def hangs(cmd, **kw):
        raise subprocess.TimeoutExpired(cmd, kw.get("timeout", 0))
    monkeypatch.setattr(B.subprocess, "run", hangs)
    assert B.gpu_driver_version() is None
    monkeypatch.setattr(B.shutil, "which", lambda name: None)
    assert B.gpu_driver_version() is None


def test_prepare_copies_the_module_to_the_setting_dtype_and_format(cuda):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
    x = torch.randn(2, 3, 8, 8)
    setting = dataclasses.replace(cuda, dtype="float16", channels_last=True)
    y = CudaBackend("torch-cuda", setting).prepare(model, x)()
    assert y.dtype == torch.float16 and y.is_contiguous(memory_format=torch.channels_last)
    # the caller's model (a job's dense or slim model) is left as it was: fp32, train mode
    assert all(p.dtype == torch.float32 for p in model.parameters()) and model.training
    assert torch.allclose(y.float(), model.eval()(x), atol=2e-2)


# ---------------------------------------------------------------- tables
@pytest.fixture(scope="module")
def graph() -> ChannelGraph:
    torch.manual_seed(0)
    return ChannelGraph.build(create_model("halp:resnet20", num_classes=10, in_chans=1), (1, 8, 8))


@pytest.fixture
def gpu_table(cuda, graph, tmp_path, monkeypatch):
    monkeypatch.setitem(B.BACKENDS, "torch-cuda", ClockedCuda)
    plan = plan_build(graph, "halp:resnet20", cuda, 16)
    table = build_table(plan, tmp_path / "gpu.json", CUDA_EVENTS, progress=False)
    return LatencyTable.load(tmp_path / "gpu.json"), table


def test_a_cuda_build_follows_the_paper_and_records_the_gpu(gpu_table):
    table, built = gpu_table
    assert table.meta["device"] == {**DEVICE, "arch": B.platform.machine()}
    assert table.meta["versions"] == {"torch": B.torch_version(), "cuda": "12.4", "cudnn": 90100}
    assert table.meta["protocol"] == CUDA_EVENTS.to_dict() and table.meta["setting"]["backend"] == "torch-cuda"
    measured = [e for v in table.entries.values() for e in v.values() if e.samples]
    assert measured and all(e.samples == 30 and e.spread == 0.0 for e in measured)
    # the clock's forwards take params_ms: so does the median of a unit's 30 forwards
    key, rows = next(iter(table.entries.items()))
    (ci, co), e = next((pt, e) for pt, e in rows.items() if e.samples)
    assert e.ms == pytest.approx(params_ms(table.units[key].build(ci, co, fused=True)))
    assert table.meta["points"] == built.meta["points"]


def test_a_table_from_another_gpu_cuda_or_cudnn_is_refused(gpu_table, cuda, monkeypatch):
    table, _ = gpu_table
    setting = dict(table.meta["setting"])
    assert table.check_setting(setting, GPU) == []
    with pytest.raises(ValueError, match=r"device: table 'NVIDIA H200', now 'NVIDIA A100-SXM4-80GB'.*"
                                         r"\(--allow-lut-mismatch\)"):
        table.check_setting(setting, "NVIDIA A100-SXM4-80GB")
    monkeypatch.setattr(torch.version, "cuda", "12.6")
    with pytest.raises(ValueError, match=r"another setting \(cuda: table '12.4', now '12.6'\)"):
        table.check_setting(setting, GPU)
    monkeypatch.setattr(torch.backends.cudnn, "version", lambda: 90500)
    assert table.check_setting(setting, GPU, allow_mismatch=True) == [
        "cuda: table '12.4', now '12.6'", "cudnn: table 90100, now 90500"]
    with pytest.raises(ValueError, match=r"cudnn: table 90100, now 90500.*\(latency.allow_mismatch=true\)"):
        table.check_setting(setting, GPU, override="latency.allow_mismatch=true",
                            versions=CudaBackend("torch-cuda", cuda).versions())
    # a CUDA table from before tables recorded CUDA and cuDNN: nothing to refuse it for
    table.meta["versions"] = {"torch": B.torch_version()}
    assert table.check_setting(setting, GPU) == []


def test_cpu_tables_are_checked_as_before_even_beside_a_gpu(cuda):
    cpu = Setting(batch=2)
    setting = {**cpu.__dict__, "memory_format": cpu.memory_format}
    table = LatencyTable(meta={"setting": setting, "device": {"name": B.cpu_name()},
                               "versions": {"torch": B.torch_version(), "cuda": "11.8", "cudnn": 8000}})
    assert table.check_setting(setting, B.cpu_name()) == []  # a CPU setting does not compare CUDA versions
    table.meta["versions"] = {"torch": "1.0.0"}
    with pytest.raises(ValueError, match=r"another setting \(torch: table '1.0.0', now '[^']+'\)"):
        table.check_setting(setting, B.cpu_name())
    with pytest.raises(ValueError, match=r"backend: table 'torch', now 'torch-cuda'"):
        table.check_setting({**setting, "backend": "torch-cuda"}, GPU, versions={})


def test_halp_lut_checks_a_gpu_table_against_this_gpu(gpu_table, cuda, monkeypatch, capsys, tmp_path):
    from halp.cli import main

    table, _ = gpu_table
    path = tmp_path / "gpu.json"
    args = ["calibrate", str(path), "halp:resnet20"]
    assert main(["lut", *args]) == 0
    out = capsys.readouterr().out
    assert "anchors: dense" in out and "warning" not in out
    assert main(["lut", "show", str(path)]) == 0
    assert "GPU: compute capability 9.0, driver 550.54.15" in capsys.readouterr().out
    monkeypatch.setattr(torch.backends.cudnn, "version", lambda: 90500)
    assert main(["lut", *args]) == 2
    assert "cudnn: table 90100, now 90500" in capsys.readouterr().err
    assert main(["lut", *args, "--allow-lut-mismatch"]) == 0
    assert "warning: setting differs: cudnn: table 90100, now 90500" in capsys.readouterr().out
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["lut", *args]) == 2
    assert "was measured with CUDA, which is not available here" in capsys.readouterr().err


def test_lut_build_options_for_the_gpu():
    import argparse

    from halp.cli.lut import _default_out, setting_from_args

    ns = argparse.Namespace(device="cuda", backend="torch", batch=256, threads=1, channels_last=False,
                            dtype="float16", allocator="steady", model="resnet50", step=32, shard=None)
    s = setting_from_args(ns)
    assert (s.backend, s.batch, s.dtype) == ("torch-cuda", 256, "float16")
    assert _default_out(ns, (3, 224, 224), s).name == "resnet50_3x224x224_b256_t1_torch-cuda_fp16_s32.json"
    with pytest.raises(ValueError, match="float16 timing is only offered on torch-cuda"):
        setting_from_args(argparse.Namespace(**{**vars(ns), "device": "cpu"}))


def test_a_jobs_dense_and_slim_models_are_timed_on_the_gpu_with_the_paper_protocol(cuda, monkeypatch):
    from experiments.assets import measure_latency
    from experiments.config import JobConfig, LatencyConfig, ModelConfig

    monkeypatch.setitem(B.BACKENDS, "torch-cuda", ClockedCuda)
    cfg = JobConfig(model=ModelConfig("halp:resnet20", width=0.25),
                    latency=LatencyConfig(backend="torch-cuda", batch=2, step=8), progress=False)
    torch.manual_seed(0)
    dense = create_model("halp:resnet20", num_classes=10, in_chans=1, width=0.25)
    slim = create_model("halp:resnet20", num_classes=10, in_chans=1, width=0.125)
    before = [p.clone() for p in dense.parameters()]
    td, ts = measure_latency(cfg, [dense, slim], (1, 8, 8))
    assert td.samples == ts.samples == 30 and CLOCK.events == cfg.measure_repeats * 2 * 2 * 30
    assert td.ms == pytest.approx(params_ms(dense)) and ts.ms == pytest.approx(params_ms(slim))
    assert math.isclose(td.ms / ts.ms, params_ms(dense) / params_ms(slim))
    assert all(torch.equal(p, q) for p, q in zip(before, dense.parameters()))
    assert next(dense.parameters()).dtype == torch.float32
