"""``halp slim``: physically slim a model from a mask file and save it (and optionally ONNX)."""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ..counting import count
from ..export import export_onnx, save_module
from ..graph import ChannelGraph
from ..masks import ChannelMasks
from ..slim import masked_copy, slim_model
from .common import add_model_args, model_from_args

HELP = """Load a model (and its checkpoint), apply a halp mask file, remove the pruned channels for
real, check that the slim model computes what the masked one does, and save it as a plain
nn.Module (torch.load(..., weights_only=False)) and, with --onnx, as ONNX."""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("slim", help="slim a model from a mask file; save .pt / .onnx",
                       description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--masks", type=Path, required=True, help="mask file written by halp (JSON)")
    p.add_argument("--out", type=Path, required=True, help="where to write the slim model (.pt)")
    p.add_argument("--onnx", type=Path, default=None, help="also export ONNX here")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    model, shape = model_from_args(args)
    masks = ChannelMasks.load(args.masks)
    graph = ChannelGraph.build(model, shape)
    masks.check_model(graph, args.model)  # masks of another model may fit a part of this one: refuse them
    masked, _ = masked_copy(graph, masks)
    slim = slim_model(graph, masks).eval()
    x = torch.randn(2, *shape)
    with torch.no_grad():
        ref, out = masked.eval()(x), slim(x)
    diff = float((ref - out).abs().max())
    if diff > 1e-4 * max(1.0, float(ref.abs().max())):
        raise RuntimeError(f"slim model differs from the masked one by {diff:.3g}; not saved")
    dense, pruned = count(graph), count(graph, masks.widths())
    save_module(slim, args.out)
    print(f"slim model -> {args.out}: MACs {dense.macs:,} -> {pruned.macs:,} "
          f"({pruned.macs / dense.macs:.1%}), params {dense.params:,} -> {pruned.params:,}, "
          f"max |masked - slim| = {diff:.2g}")
    if args.onnx:
        export_onnx(slim, shape, args.onnx)
        print(f"ONNX -> {args.onnx}")
    return 0
