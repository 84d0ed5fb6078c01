"""``halp lut``: build, merge, validate, show, import and export latency lookup tables."""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from ..graph import ChannelGraph
from ..latency.anchors import anchor_ms
from ..latency.backends import Setting, cpu_name, get_backend
from ..latency.build import TIME_LIMIT_S, build_table, describe_plan, estimate_build, parse_shard, plan_build
from ..latency.refine import Refinement
from ..latency.calibration import recalibrate
from ..latency.cost import CostModel
from ..latency.quality import chunk_sizes, monotonicity_violations, noise_summary, smooth_monotone
from ..latency.table import LatencyTable, load_reference, merge
from ..latency.timing import Protocol, protocol_for
from ..latency.validate import format_validation, validate
from .common import add_model_args, model_from_args

HELP = """Latency lookup tables (LUTs) measured on *this* device. A table gives the latency of every
conv unit (conv + BN + activation, and the conv alone) of a model at every (c_in, c_out) its
channel groups can reach in steps of --step channels, plus one end-to-end time of the dense model
for calibrating the rest. HALP's pruner reads it to know what each channel costs.

  halp lut build MODEL --input-shape 3,224,224 --batch 1 --threads 1 --step 32 --out rn50.json
  halp lut validate rn50.json MODEL --input-shape 3,224,224 -k 20
  halp lut show rn50.json --png rn50.png"""


def _add_setting_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch", type=int, default=1, help="batch size of the deployment (default 1)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cpu (default) or cuda (the paper's protocol: CUDA events, 10 warm-up + 30 timed "
                        "forwards, median; unverified on a GPU)")
    p.add_argument("--dtype", choices=("float32", "float16"), default="float32",
                   help="float32 (default) or float16 (--device cuda only)")
    p.add_argument("--backend", choices=("torch", "onnxruntime"), default="torch",
                   help="runtime on the CPU: PyTorch eager (default) or ONNX Runtime")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads (default 1)")
    p.add_argument("--channels-last", action="store_true", help="time in channels_last memory format")
    p.add_argument("--allocator", choices=("steady", "default"), default="steady",
                   help="steady (default): keep freed memory in the process, as a long-running "
                        "server does; default: glibc as configured")


def setting_from_args(args: argparse.Namespace) -> Setting:
    backend = "torch-cuda" if args.device == "cuda" else args.backend
    if args.device == "cuda" and args.backend != "torch":
        raise ValueError("on --device cuda only the torch backend exists")
    return Setting(backend=backend, batch=args.batch, threads=args.threads, channels_last=args.channels_last,
                   dtype=args.dtype, allocator=args.allocator)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("lut", help="build / validate / show latency lookup tables",
                       description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    lsub = p.add_subparsers(dest="lut_command", metavar="SUBCOMMAND", required=True)

    b = lsub.add_parser("build", help="measure a latency table for a model on this device",
                        description="Measure the (c_in, c_out) points the model's layers can reach: a "
                                    "coarse lattice, refined where latency bends, the rest interpolated "
                                    "(--full measures all). Prints the plan and its estimated time first. "
                                    "Resumable (rerun the same command after an interruption) and "
                                    "shardable (--shard i/n, then `halp lut merge`).")
    add_model_args(b)
    _add_setting_args(b)
    b.add_argument("--step", type=int, default=32,
                   help="channels removed per step of every group: the table's grid (default 32)")
    b.add_argument("--out", type=Path, default=None, help="table file (default luts/<model>_<setting>.json)")
    b.add_argument("--shard", default=None, metavar="i/n", help="measure only the i-th of n disjoint parts")
    b.add_argument("--rounds", type=int, default=5,
                   help="timed samples per point (default 5; --device cuda: always the paper's 30)")
    b.add_argument("--no-resume", action="store_true", help="discard an existing partial build")
    b.add_argument("--full", action="store_true",
                   help="measure every reachable point (default: coarse lattice, refined where the latency "
                        "bends, the rest interpolated)")
    b.add_argument("--refine-tol", type=float, default=Refinement.tol,
                   help=f"accept a cell when its midpoints are within this relative error of interpolation "
                        f"(default {Refinement.tol})")
    b.add_argument("--refine-budget", type=float, default=Refinement.budget,
                   help=f"measure at most this fraction of the reachable points (default {Refinement.budget}; never "
                        "less than the coarse lattice and its first check)")
    b.add_argument("--time-limit", type=float, default=TIME_LIMIT_S, metavar="SECONDS",
                   help=f"wall-time bound: past it refinement stops and the rest is interpolated (default "
                        f"{TIME_LIMIT_S:.0f})")
    b.add_argument("--monotone", choices=("report", "enforce"), default="report",
                   help="report (default) points where more channels cost less, or enforce "
                        "monotone rows by isotonic regression (hides real cliffs)")
    b.add_argument("--quiet", action="store_true", help="no progress bar")
    b.set_defaults(func=run_build)

    m = lsub.add_parser("merge", help="join shards built with --shard i/n")
    m.add_argument("parts", nargs="+", type=Path)
    m.add_argument("--out", type=Path, required=True)
    m.add_argument("--allow-partial", action="store_true", help="merge even if shards are missing")
    m.set_defaults(func=run_merge)

    v = lsub.add_parser("validate", help="predicted vs measured latency of slimmed models",
                        description="Draw K width configurations (uniform-ratio and random), slim "
                                    "the model to each, time them and the three calibration anchors "
                                    "(dense, half, smallest) end to end in one interleaved run in the "
                                    "table's setting, and compare predictions with the measurements.")
    v.add_argument("table", type=Path)
    add_model_args(v)
    v.add_argument("-k", type=int, default=20, help="number of configurations (default 20)")
    v.add_argument("--seed", type=int, default=0)
    v.add_argument("--off-grid", action="store_true",
                   help="draw any widths, not only those on the table's grid (tests interpolation)")
    v.add_argument("--rounds", type=int, default=7, help="timed samples per configuration")
    v.add_argument("--allow-lut-mismatch", action="store_true",
                   help="use a table measured in another setting or on another device")
    v.add_argument("--table-anchors", action="store_true",
                   help="calibrate with the anchors stored in the table instead of re-measuring them first")
    v.add_argument("--json", type=Path, default=None, help="write rows and summary here")
    v.add_argument("--quiet", action="store_true")
    v.set_defaults(func=run_validate)

    c = lsub.add_parser("calibrate", help="re-measure the end-to-end anchors of a table (seconds)",
                        description="Time the dense model, a half-width and the smallest model end to "
                                    "end in the table's setting and store them in the table: the "
                                    "anchors that map unit sums to end-to-end latency.")
    c.add_argument("table", type=Path)
    add_model_args(c)
    c.add_argument("--allow-lut-mismatch", action="store_true")
    c.set_defaults(func=run_calibrate)

    s = lsub.add_parser("show", help="text summary (noise, monotonicity, chunk sizes) and a PNG of the staircases")
    s.add_argument("table", type=Path)
    s.add_argument("--png", type=Path, default=None, help="write staircase plots here")
    s.add_argument("--units", type=int, default=12, help="plot at most this many units (default 12)")
    s.set_defaults(func=run_show)

    i = lsub.add_parser("import-ref", help="convert a reference HALP pickle to a halp table")
    i.add_argument("pickle", type=Path)
    i.add_argument("--out", type=Path, required=True)
    i.add_argument("--device-name", default="unknown (imported)", help="the device it was measured on")
    i.set_defaults(func=run_import)

    e = lsub.add_parser("export-ref", help="write a table in the reference HALP pickle format")
    e.add_argument("table", type=Path)
    e.add_argument("--out", type=Path, required=True)
    e.set_defaults(func=run_export)


def _default_out(args: argparse.Namespace, shape: tuple, setting: Setting) -> Path:
    name = args.model.replace(":", "_").replace("/", "_")
    tag = f"{'x'.join(map(str, shape))}_b{setting.batch}_t{setting.threads}_{setting.backend}"
    if setting.channels_last:
        tag += "_cl"
    if setting.dtype != "float32":
        tag += "_fp16"
    shard = f".shard{args.shard.replace('/', 'of')}" if args.shard else ""
    return Path("luts") / f"{name}_{tag}_s{args.step}{shard}.json"


def run_build(args: argparse.Namespace) -> int:
    setting = setting_from_args(args)
    backend = get_backend(setting)
    ok, why = backend.available()
    if not ok:
        raise ValueError(f"backend {setting.backend} is not available: {why}")
    model, shape = model_from_args(args)
    graph = ChannelGraph.build(model, shape)
    refine = Refinement.off() if args.full else Refinement(tol=args.refine_tol, budget=args.refine_budget)
    plan = plan_build(graph, args.model, setting, args.step, parse_shard(args.shard), refine=refine)
    out = args.out or _default_out(args, shape, setting)
    protocol = protocol_for(backend, Protocol(rounds=args.rounds))  # on CUDA the paper's: the table records it
    print(f"{args.model} {shape} batch {setting.batch}, {setting.threads} thread(s), {setting.backend}, "
          f"{setting.memory_format}{'' if setting.dtype == 'float32' else ', ' + setting.dtype}"
          f"{f' (shard {args.shard})' if args.shard else ''} -> {out}")
    print(describe_plan(plan, estimate_build(plan, protocol), args.time_limit), flush=True)
    t0 = time.perf_counter()
    table = build_table(plan, out, protocol, resume=not args.no_resume, progress=not args.quiet,
                        time_limit_s=args.time_limit)
    noise = noise_summary(table)
    viol = monotonicity_violations(table)
    if args.monotone == "enforce" and viol:
        changed = smooth_monotone(table)
        table.meta["monotone"] = "enforced"
        table.save(out)
        print(f"monotone rows enforced: {changed} entries changed")
    pts = table.meta["points"]
    print(f"built in {time.perf_counter() - t0:.0f}s: {pts['measured']} points measured, {pts['interpolated']} "
          f"interpolated ({pts['reachable']} reachable), median spread "
          f"{noise['median_spread']:.1%} (p90 {noise['p90_spread']:.1%}), {noise['remeasured']} re-measured, "
          f"{len(viol)} monotonicity violations; dense model {anchor_ms(table.calibration, 'dense'):.3f} ms")
    return 0


def run_merge(args: argparse.Namespace) -> int:
    table = merge([LatencyTable.load(p) for p in args.parts], allow_partial=args.allow_partial)
    table.save(args.out)
    print(f"merged {len(args.parts)} parts: {table.n_points} points -> {args.out}")
    return 0


def _table_and_graph(args: argparse.Namespace) -> tuple[LatencyTable, Setting, ChannelGraph]:
    """Load a table, check it was measured in this setting on this device, build the model's graph."""
    table = LatencyTable.load(args.table)
    st = table.meta.get("setting", {})
    setting = Setting(backend=st.get("backend", "torch"), batch=int(st.get("batch", 1)),
                      threads=int(st.get("threads") or 1), channels_last=st.get("memory_format") == "channels_last",
                      dtype=st.get("dtype", "float32"), allocator=st.get("allocator", "steady"))
    device, versions = cpu_name(), None  # None: check_setting's default, this torch
    if setting.backend == "torch-cuda":  # the GPU's name and its CUDA / cuDNN versions
        backend = get_backend(setting)
        ok, why = backend.available()
        if not ok:
            raise ValueError(f"{args.table} was measured with CUDA, which is not available here: {why}")
        device, versions = backend.device()["name"], backend.versions()
    diffs = table.check_setting({**setting.__dict__, "memory_format": setting.memory_format}, device,
                                allow_mismatch=args.allow_lut_mismatch, versions=versions)
    for d in diffs:
        print(f"warning: setting differs: {d}")
    if args.input_shape is None and table.meta.get("input_shape"):
        args.input_shape = tuple(table.meta["input_shape"])
    if args.num_classes is None and table.meta.get("num_classes"):
        args.num_classes = int(table.meta["num_classes"])
    model, shape = model_from_args(args)
    return table, setting, ChannelGraph.build(model, shape)


def run_calibrate(args: argparse.Namespace) -> int:
    table, setting, graph = _table_and_graph(args)
    CostModel.create(graph, table, overhead="none")  # the table must belong to this model
    table.calibration = recalibrate(graph, table, setting)
    table.save(args.table)
    print("anchors: " + ", ".join(f"{a['name']} {a['ms']:.3f} ms" for a in table.calibration["anchors"])
          + f" -> {args.table}")
    return 0


def run_validate(args: argparse.Namespace) -> int:
    table, setting, graph = _table_and_graph(args)
    res = validate(graph, table, setting, k=args.k, seed=args.seed, on_grid=not args.off_grid,
                   protocol=Protocol(rounds=args.rounds, sample_ms=50.0, seed=args.seed),
                   progress=not args.quiet, fresh_anchors=not args.table_anchors)
    print(format_validation(res))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"rows": res.rows, "summary": res.summary}, indent=1) + "\n")
    return 0


def run_show(args: argparse.Namespace) -> int:
    from ..latency.plot import plot_staircases

    table = LatencyTable.load(args.table)
    meta = table.meta
    st = meta.get("setting", {})
    print(f"{args.table}: model {meta.get('model')} input {meta.get('input_shape')} on "
          f"{meta.get('device', {}).get('name')}; backend {st.get('backend')}, batch {st.get('batch')}, "
          f"threads {st.get('threads')}, {st.get('memory_format')}, {st.get('dtype')}, allocator "
          f"{st.get('allocator', '?')}; built {meta.get('created')} in {meta.get('wall_s')}s")
    dev = meta.get("device", {})
    if dev.get("kind") == "cuda":
        print(f"GPU: compute capability {dev.get('capability')}, driver {dev.get('driver')}, cuDNN TF32 "
              f"{dev.get('cudnn_tf32')}, cuDNN benchmark {dev.get('cudnn_benchmark')}; " +
              ", ".join(f"{k} {v}" for k, v in (meta.get("versions") or {}).items()))
    n = noise_summary(table)
    print(f"{n['points']} points over {n['units']} units; spread of repeats (IQR/median): median "
          f"{n['median_spread']:.1%}, p90 {n['p90_spread']:.1%}, max {n['max_spread']:.1%}; "
          f"{n['remeasured']} points re-measured")
    for a in (table.calibration or {}).get("anchors", []):
        print(f"end-to-end anchor {a['name']}: {a['ms']:.3f} ms (spread {a['spread']:.1%})")
    viol = monotonicity_violations(table)
    print(f"{len(viol)} monotonicity violations (more c_out, less time, beyond 2x noise)")
    for v in viol[:5]:
        print(f"  {v['unit']} c_in {v['c_in']}: c_out {v['c_out'][0]}->{v['c_out'][1]} "
              f"{v['ms'][0]:.3f}->{v['ms'][1]:.3f} ms (-{v['drop_pct']:.0f}%)")
    if meta.get("model") and table.groups:
        try:
            from ..models import create_model
            model = create_model(meta["model"], num_classes=meta.get("num_classes", 10 if meta["model"].startswith("halp:") else 1000),
                                 in_chans=meta["input_shape"][0])
            graph = ChannelGraph.build(model, tuple(meta["input_shape"]))
            sizes = chunk_sizes(graph, table)
            print("latency-aware chunk sizes (channels per knapsack item): " +
                  ", ".join(f"{gid}={g}" for gid, g in sizes.items()))
        except (ValueError, RuntimeError) as e:
            print(f"(chunk sizes not derived: {e})")
    if args.png:
        plot_staircases(table, args.png, max_units=args.units)
        print(f"staircase plot -> {args.png}")
    return 0


def run_import(args: argparse.Namespace) -> int:
    table = load_reference(args.pickle, device_name=args.device_name)
    table.save(args.out)
    print(f"imported {table.n_points} points over {len(table.units)} units -> {args.out}")
    return 0


def run_export(args: argparse.Namespace) -> int:
    table = LatencyTable.load(args.table)
    table.save_reference(args.out)
    print(f"wrote {len(table.to_reference())} reference entries -> {args.out}")
    return 0
