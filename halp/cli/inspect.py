"""``halp inspect``: what pruning will see in a model, and a slim round trip to prove it works."""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from ..counting import count
from ..graph import ChannelGraph
from ..masks import ChannelMasks
from ..residual import vanished_blocks
from ..slim import masked_copy, slim_model
from .common import add_model_args, model_from_args

HELP = """Print a model's channel groups (coupled channels that are pruned together), the geometry of
every conv that a latency table will need, MACs and parameters, and check a round trip: random
masks -> physically slimmed model -> same outputs as the masked model. Run this first on your own
model: if the round trip passes, halp can prune it."""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inspect", help="show channel groups and conv geometry; verify slimming",
                       description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--seed", type=int, default=0, help="seed of the random masks (default 0)")
    p.add_argument("--no-roundtrip", action="store_true", help="skip the random-mask slim check")
    p.add_argument("--members", action="store_true", help="list every member layer of each group")
    p.add_argument("--json", type=Path, default=None, metavar="FILE",
                   help="also write groups, layers and the round-trip result to FILE as JSON")
    p.set_defaults(func=run)


def _fmt_int(n: int) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= div:
            return f"{n / div:.3f}{unit}"
    return str(n)


def roundtrip(graph: ChannelGraph, seed: int) -> dict:
    """Random masks (every group >= 1 channel, some residual branches emptied) -> slim -> compare."""
    gen = torch.Generator().manual_seed(seed)
    masks = ChannelMasks.random(graph, gen, vanish_prob=0.2)
    t0 = time.perf_counter()
    masked, _ = masked_copy(graph, masks)
    slim = slim_model(graph, masks)
    x = torch.randn(2, *graph.input_shape, generator=gen)
    with torch.no_grad():
        a, b = masked.eval()(x), slim.eval()(x)
    diff = float((a - b).abs().max())
    predicted = count(graph, masks.widths())
    return {"seed": seed, "max_abs_diff": diff, "emptied_branches": len(vanished_blocks(graph, masks.widths())), "max_abs_output": float(a.abs().max()),
            "kept_channels": sum(masks.widths().values()),
            "total_channels": sum(g.width for g in graph.groups.values()),
            "slim_params": sum(p.numel() for p in slim.parameters()),
            "predicted_params": predicted.params, "slim_macs": predicted.macs,
            "seconds": round(time.perf_counter() - t0, 3)}


def run(args: argparse.Namespace) -> int:
    model, shape = model_from_args(args)
    t0 = time.perf_counter()
    graph = ChannelGraph.build(model, shape)
    build_s = time.perf_counter() - t0
    dense = count(graph)
    print(f"model {args.model}  input {'x'.join(map(str, shape))}  "
          f"MACs {_fmt_int(dense.macs)}  params {_fmt_int(dense.params)}  "
          f"graph traced in {build_s:.2f}s")
    print(f"stem (input never pruned): {', '.join(graph.stem_layers)}; "
          f"outputs (never pruned): {', '.join(graph.output_layers)}")
    print(f"\n{len(graph.groups)} channel groups "
          "(flags: S = holds the stem conv, V = inside a residual branch, may drop to 0, "
          "X = cannot be pruned)")
    print(f"{'group id':<36}{'width':>7}  {'flags':<5}{'writers':>8}{'readers':>8}{'norms':>6}")
    for g in graph.groups.values():
        flags = ("S" if g.contains_stem else "") + ("V" if g.can_vanish else "") + ("X" if not g.prunable else "")
        print(f"{g.id:<36}{g.width:>7}  {flags:<5}{len(g.out_layers):>8}{len(g.in_layers):>8}{len(g.norms):>6}")
        if args.members:
            print(f"    writers: {', '.join(g.out_layers)}\n    readers: {', '.join(g.in_layers)}")
            if g.unsupported:
                print(f"    cannot prune: {', '.join(g.unsupported)}")
    print(f"\n{len(graph.layers)} layers (c_in/c_out: width [group that sets it, '-' = fixed])")
    print(f"{'layer':<36}{'kind':<7}{'c_in':>6} {'[group]':<30}{'c_out':>6} {'[group]':<30}"
          f"{'k':>4}{'s':>3}{'g':>6}  fmap_in")
    for li in graph.layers.values():
        print(f"{li.name:<36}{li.kind:<7}{li.in_channels:>6} {li.in_group or '-':<30}"
              f"{li.out_channels:>6} {li.out_group or '-':<30}{li.kernel[0]:>4}{li.stride[0]:>3}"
              f"{li.groups:>6}  {li.input_hw[0]}x{li.input_hw[1]}")
    result = None
    if not args.no_roundtrip:
        result = roundtrip(graph, args.seed)
        ok = result["max_abs_diff"] <= 1e-4 * max(1.0, result["max_abs_output"]) and \
            result["slim_params"] == result["predicted_params"]
        print(f"\nslim round trip (seed {result['seed']}): kept {result['kept_channels']}/"
              f"{result['total_channels']} channels, {result['emptied_branches']} residual branches emptied, max |masked - slim| = {result['max_abs_diff']:.3g} "
              f"(outputs up to {result['max_abs_output']:.3g}), params slim {result['slim_params']} "
              f"vs from widths {result['predicted_params']}, MACs {_fmt_int(result['slim_macs'])}, "
              f"{result['seconds']:.2f}s -> {'OK' if ok else 'MISMATCH'}")
        result["ok"] = ok
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        data = {"model": args.model, "dense": {"macs": dense.macs, "params": dense.params},
                **graph.describe(), "roundtrip": result}
        args.json.write_text(json.dumps(data, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0 if result is None or result["ok"] else 1
