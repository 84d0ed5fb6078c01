"""Argument helpers shared by ``halp`` subcommands."""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn

from ..models import create_model, parse_name


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="model name: halp:resnet20, torchvision:resnet50, timm:mobilenetv1_100, ...")
    p.add_argument("--input-shape", type=parse_shape, default=None, metavar="C,H,W",
                   help="input of one sample (default: 1,28,28 for halp: models, 3,224,224 otherwise)")
    p.add_argument("--num-classes", type=int, default=None,
                   help="classifier outputs (default: 10 for halp: models, 1000 otherwise)")
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="load this state dict (a file saved with torch.save(model.state_dict()))")


def parse_shape(text: str) -> tuple[int, int, int]:
    try:
        parts = tuple(int(p) for p in text.replace("x", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected C,H,W (e.g. 3,224,224), got {text!r}") from None
    if len(parts) != 3 or min(parts) < 1:
        raise argparse.ArgumentTypeError(f"expected three positive sizes C,H,W, got {text!r}")
    return parts  # type: ignore[return-value]


def model_from_args(args: argparse.Namespace) -> tuple[nn.Module, tuple[int, int, int]]:
    """Build the model named on the command line; returns it (eval mode) and its input shape."""
    source, _ = parse_name(args.model)
    shape = args.input_shape or ((1, 28, 28) if source == "halp" else (3, 224, 224))
    classes = args.num_classes or (10 if source == "halp" else 1000)
    model = create_model(args.model, num_classes=classes, in_chans=shape[0])
    if args.checkpoint is not None:
        if not args.checkpoint.is_file():
            raise FileNotFoundError(f"checkpoint {args.checkpoint} does not exist")
        state = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
        state = state.get("model", state) if isinstance(state, dict) else state
        try:
            model.load_state_dict(state)
        except RuntimeError as e:
            detail = "; ".join(line.strip() for line in str(e).splitlines()[1:3])
            raise ValueError(f"checkpoint {args.checkpoint} does not fit {args.model} with "
                             f"{classes} classes and input {shape}: {detail}") from None
    return model.eval(), shape
