"""Saving slim models and exporting them to ONNX (runs with onnxruntime, no halp needed)."""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .fileio import atomic_write


def save_module(model: nn.Module, path: str | os.PathLike) -> Path:
    """Pickle the whole module (architecture + weights) atomically; load with :func:`load_module`."""
    return atomic_write(path, lambda tmp: torch.save(model, tmp))


def load_module(path: str | os.PathLike, map_location: str = "cpu") -> nn.Module:
    """Load a module saved by :func:`save_module` (a full pickle, so only load files you trust)."""
    return torch.load(path, map_location=map_location, weights_only=False)


def export_onnx(model: nn.Module, input_shape: tuple[int, ...], path: str | os.PathLike,
                batch: int = 1, opset: int = 18) -> Path:
    """Export ``model`` (eval mode) to ONNX with a dynamic batch dimension."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    was_training = model.training
    model.eval()
    x = torch.randn(batch, *input_shape)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (x,), str(path), input_names=["input"], output_names=["output"],
                              opset_version=opset, dynamo=False,
                              dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})
    finally:
        model.train(was_training)
    return path


def onnx_forward(path: str | os.PathLike, x: torch.Tensor, threads: int = 1) -> torch.Tensor:
    """Run an exported model with onnxruntime on the CPU."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    (out,) = sess.run(None, {"input": x.detach().cpu().numpy().astype(np.float32)})
    return torch.from_numpy(out)
