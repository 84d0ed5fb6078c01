"""Argument helpers shared by ``halp`` subcommands."""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn

from ..export import load_module
from ..models import create_model, parse_name


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="model name (halp:resnet20, torchvision:resnet50, timm:mobilenetv1_100, "
                                 "mmdet:ssd512_r50, ...) or a saved module file (a job's slim.pt)")
    p.add_argument("--input-shape", type=parse_shape, default=None, metavar="C,H,W",
                   help="input of one sample (default: 1,28,28 for halp: models, the detector's input size "
                        "for mmdet: models, 3,224,224 otherwise)")
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
    """Build the model named on the command line (or load the saved module it names); returns it
    (eval mode) and its input shape."""
    path = Path(args.model)
    if path.suffix in (".pt", ".pth") and path.is_file():
        if args.checkpoint is not None:
            raise ValueError("--checkpoint applies to a model name; a saved module holds its own weights")
        model = load_module(path)
        if not isinstance(model, nn.Module):
            raise ValueError(f"{path} holds a {type(model).__name__}, not a saved module (a state dict? "
                             "then name the model and pass --checkpoint)")
        size = getattr(model, "input_size", None)
        return model.eval(), args.input_shape or ((3, size, size) if size else (3, 224, 224))
    source, _ = parse_name(args.model)
    classes = args.num_classes or (10 if source == "halp" else 20 if source == "mmdet" else 1000)
    default = (1, 28, 28) if source == "halp" else (3, 224, 224)
    model = create_model(args.model, num_classes=classes, in_chans=3 if source == "mmdet" else
                         (args.input_shape or default)[0])
    size = getattr(model, "input_size", None)  # detectors: their anchors fix the input size
    shape = args.input_shape or ((3, size, size) if size else default)
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
