"""``halp inspect``: what pruning will see in a model, and a slim round trip to prove it works."""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from ..counting import count
from ..graph import ChannelGraph
from ..roundtrip import roundtrip
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
    print("(unit: fewest channels pruned at once; grouped convs prune one position in each of their groups)")
    print(f"{'group id':<36}{'width':>7}{'unit':>6}  {'flags':<5}{'writers':>8}{'readers':>8}{'norms':>6}")
    for g in graph.groups.values():
        flags = ("S" if g.contains_stem else "") + ("V" if g.can_vanish else "") + ("X" if not g.prunable else "")
        unit = str(g.quantum) if g.prunable else "-"
        print(f"{g.id:<36}{g.width:>7}{unit:>6}  {flags:<5}{len(g.out_layers):>8}{len(g.in_layers):>8}{len(g.norms):>6}")
        if args.members:
            print(f"    writers: {', '.join(g.out_layers)}\n    readers: {', '.join(g.in_layers)}")
        if g.unsupported:
            print(f"    cannot prune (stays at full width): {'; '.join(g.unsupported)}")
    print(f"\n{len(graph.layers)} layers (c_in/c_out: width [group that sets it, '-' = fixed])")
    print(f"{'layer':<36}{'kind':<7}{'c_in':>6} {'[group]':<30}{'c_out':>6} {'[group]':<30}"
          f"{'k':>4}{'s':>3}{'g':>6}  fmap_in")
    for li in graph.layers.values():
        print(f"{li.name:<36}{li.kind:<7}{li.in_channels:>6} {li.in_group or '-':<30}"
              f"{li.out_channels:>6} {li.out_group or '-':<30}{li.kernel[0]:>4}{li.stride[0]:>3}"
              f"{li.groups:>6}  {li.input_hw[0]}x{li.input_hw[1]}")
    result = None
    if not args.no_roundtrip:
        rt = roundtrip(graph, args.seed)
        result = rt.to_dict()
        print(f"\nslim round trip (seed {rt.seed}): kept {rt.kept_channels}/{rt.total_channels} channels, "
              f"{rt.emptied_branches} residual branches emptied, max |masked - slim| = {rt.max_abs_diff:.3g} "
              f"(outputs up to {rt.max_abs_output:.3g}), params slim {rt.slim_params} "
              f"vs from widths {rt.predicted_params}, MACs {_fmt_int(rt.slim_macs)}, "
              f"{rt.seconds:.2f}s -> {'OK' if rt.ok else 'MISMATCH'}")
        if not rt.ok:
            print(f"problem: {rt.problem()}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        data = {"model": args.model, "dense": {"macs": dense.macs, "params": dense.params},
                **graph.describe(), "roundtrip": result}
        args.json.write_text(json.dumps(data, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0 if result is None or result["ok"] else 1
