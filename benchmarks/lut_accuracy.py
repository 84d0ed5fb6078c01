"""Build a latency table and validate it: wall time, points, noise, predicted-vs-measured error.

    python benchmarks/lut_accuracy.py halp:resnet56 --input-shape 1,28,28 --batch 32 --step 8
    python benchmarks/lut_accuracy.py torchvision:resnet50 --input-shape 3,224,224 --batch 1 --step 32
    python benchmarks/lut_accuracy.py torchvision:resnet50 --input-shape 3,224,224 --batch 1 --step 32 --full

Without --full the table is built coarse-then-refined (the default of `halp lut build`); --full
measures every reachable point (the build before refinement), for the before/after comparison.

Prints the numbers and writes them to --out-dir as JSON (the table is kept there too and reused
unless --rebuild). Timings are medians measured in this run; absolute values drift between runs.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from halp.graph import ChannelGraph
from halp.latency.backends import Setting
from halp.latency.build import build_table, describe_plan, estimate_build, plan_build
from halp.latency.quality import chunk_sizes, monotonicity_violations, noise_summary
from halp.latency.refine import Refinement
from halp.latency.table import LatencyTable
from halp.latency.timing import Protocol
from halp.latency.validate import format_validation, validate
from halp.models import create_model, parse_name


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--input-shape", default="3,224,224")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--step", type=int, default=32)
    ap.add_argument("-k", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out-dir", type=Path, default=Path("benchmarks/out"))
    ap.add_argument("--rebuild", action="store_true")
    ap.add_argument("--full", action="store_true", help="measure every reachable point (no refinement)")
    args = ap.parse_args()

    shape = tuple(int(s) for s in args.input_shape.split(","))
    classes = 10 if parse_name(args.model)[0] == "halp" else 1000
    graph = ChannelGraph.build(create_model(args.model, num_classes=classes, in_chans=shape[0]), shape)
    setting = Setting(batch=args.batch, threads=args.threads)
    tag = (f"{args.model.replace(':', '_')}_{'x'.join(map(str, shape))}_b{args.batch}_t{args.threads}_s{args.step}"
           + ("_full" if args.full else ""))
    lut = args.out_dir / f"{tag}.lut.json"
    report: dict = {"model": args.model, "input_shape": shape, "batch": args.batch,
                    "threads": args.threads, "step": args.step}
    if args.rebuild or not lut.exists():
        plan = plan_build(graph, args.model, setting, args.step,
                          refine=Refinement.off() if args.full else Refinement())
        protocol = Protocol(rounds=args.rounds)
        print(describe_plan(plan, estimate_build(plan, protocol)), flush=True)
        t0 = time.perf_counter()
        table = build_table(plan, lut, protocol)
        report["build_wall_s"] = round(time.perf_counter() - t0, 1)
    else:
        table = LatencyTable.load(lut)
        report["build_wall_s"] = table.meta.get("wall_s")
    report["points"] = table.meta.get("points")
    report["noise"] = noise_summary(table)
    report["monotonicity_violations"] = len(monotonicity_violations(table))
    report["anchors_at_build"] = {a["name"]: a["ms"] for a in table.calibration["anchors"]}
    sizes = chunk_sizes(graph, table)
    report["chunk_sizes"] = sorted(set(sizes.values()))
    print(f"\n== {args.model} {shape} batch {args.batch}, {args.threads} thread(s), step {args.step}")
    pts = report["points"] or {}
    print(f"build: {report['build_wall_s']} s, {pts.get('measured', report['noise']['points'])} measured "
          f"of {report['noise']['points']} points over "
          f"{report['noise']['units']} units, median spread {report['noise']['median_spread']:.2%} "
          f"(p90 {report['noise']['p90_spread']:.2%}), {report['noise']['remeasured']} re-measured, "
          f"{report['monotonicity_violations']} monotonicity violations; chunk sizes {report['chunk_sizes']}")
    for on_grid, fresh in ((True, True), (True, False), (False, True)):
        t0 = time.perf_counter()
        v = validate(graph, table, setting, k=args.k, seed=args.seed, on_grid=on_grid, fresh_anchors=fresh)
        name = ("on-grid" if on_grid else "off-grid") + ("" if fresh else ", table anchors")
        report[name] = {"summary": v.summary, "rows": v.rows, "wall_s": round(time.perf_counter() - t0, 1)}
        print(f"\n-- validation, {name} widths, K={args.k} ({report[name]['wall_s']} s)")
        print(format_validation(v))
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / f"{tag}.report.json").write_text(json.dumps(report, indent=1, default=str) + "\n")


if __name__ == "__main__":
    main()
