"""Collect run records (``result.json``) and write the paper-style tables and figures.

``build_report`` is the entry point; ``halp report`` (``experiments/report_cli.py``) only parses arguments.
Records are read tolerantly: a bad file is skipped with a warning, missing optional fields become
NaN, and unknown scalar fields are carried into ``runs.csv``. Every output is written atomically.
"""
from __future__ import annotations

import difflib
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
from scipy import stats

from halp.fileio import atomic_write

from .figures import method_label, pareto_figure, predicted_figure, save_png, sections, widths_figure

DEFAULT_REFERENCE = Path(__file__).resolve().parents[1] / "results" / "reference" / "paper_numbers.csv"
REQUIRED = ("method", "model", "dataset", "target_ratio", "pruned.top1", "pruned.latency_ms")
KEYS = ["model", "dataset", "method", "target"]
METHOD_ORDER = ("dense", "halp", "eagleeye", "taylor", "magnitude")
# aggregated metric -> column of runs.csv it is computed from
METRICS = {"top1": "pruned.top1", "top5": "pruned.top5", "latency_ms": "pruned.latency_ms",
           "speedup": "speedup", "macs": "pruned.macs", "params": "pruned.params",
           "latency_vs_target": "latency_vs_target", "predicted_over_measured": "predicted_over_measured",
           "latency_ratio": "latency_ratio", "method_seconds": "method_seconds"}
# the same metrics of the dense model, as every pruned run records it (rows for a "dense" line)
DENSE_METRICS = {"top1": "dense.top1", "top5": "dense.top5", "latency_ms": "dense.latency_ms",
                 "macs": "dense.macs", "params": "dense.params", "predicted_ms": "dense.predicted_ms"}
# nested values that are not one number per run; widths are kept aside for the widths figure
NOT_FLAT = {"config", "prune_log", "history", "chunk_sizes", "search", "lut.anchors", "pruned.widths"}
# config keys expected to differ between the runs of one group (loader knobs never change a result)
VARYING = re.compile(r"(^|\.)(seed|target_ratio|target|progress|cache_dir|root|workers|pin_memory|persistent_workers|prefetch_factor)$")

Warn = Callable[[str], None]


@dataclass
class ReportSummary:
    """What ``build_report`` did: the records used, the files skipped (and why), the files written."""
    out_dir: Path
    records: int
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    written: list[Path] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    table_md: str = ""


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if key in NOT_FLAT:
            continue
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        elif v is None or isinstance(v, (bool, int, float, str)):
            out[key] = v
    return out


def _full_widths(rec: dict) -> dict | None:
    """The dense model's group widths, from the latency table's calibration anchors."""
    for a in (rec.get("lut") or {}).get("anchors") or []:
        if isinstance(a, dict) and a.get("name") == "dense" and isinstance(a.get("widths"), dict):
            return a["widths"]
    return None


def load_records(runs_dir: str | Path, warn: Warn | None = None) -> tuple[pd.DataFrame, list[tuple[Path, str]]]:
    """Read every ``**/result.json`` under ``runs_dir`` into one row per run.

    Columns are the record's scalar fields flattened with dots (``pruned.top1``), plus ``run``
    and ``metric`` (what the quality columns ``pruned.top1``/``dense.top1`` hold: top-1 accuracy,
    or a detector's mAP@0.5 — records with ``"metric": "map50"``),
    (directory relative to ``runs_dir``), ``target`` (rounded ratio), ``predicted_over_measured``,
    and the object columns ``_widths``, ``_full_widths``, ``_config`` (not written to CSV).
    Returns the frame and the skipped files with reasons. Raises FileNotFoundError if the
    directory is missing and ValueError if it holds no usable record.
    """
    warn = warn or (lambda msg: print(f"warning: {msg}", file=sys.stderr))
    root = Path(runs_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"runs directory {root} does not exist (expected a directory of run "
                                "folders, each with a result.json)")
    rows, skipped = [], []
    for path in sorted(root.rglob("result.json")):
        try:
            rec = json.loads(path.read_text())
            if not isinstance(rec, dict):
                raise ValueError("not a JSON object")
            flat = _flatten(rec)
            metric = str(rec.get("metric") or "top1")
            if metric != "top1":  # detectors: the headline metric (mAP@0.5) fills the quality column
                for part in ("pruned", "dense"):
                    flat[f"{part}.top1"] = flat.get(f"{part}.{metric}")
            missing = [k for k in REQUIRED if flat.get(k) is None]
            if missing:
                raise ValueError(f"missing required field(s) {', '.join(missing)}")
            flat["metric"] = metric
            flat.update({k: str(flat[k]) for k in ("method", "model", "dataset")})
            flat["target"] = round(float(flat["target_ratio"]), 4)
            float(flat["pruned.top1"]), float(flat["pruned.latency_ms"])  # must be numbers
        except (OSError, ValueError, TypeError) as e:  # JSONDecodeError is a ValueError
            reason = f"invalid JSON ({e})" if isinstance(e, json.JSONDecodeError) else str(e)
            skipped.append((path, reason))
            warn(f"skipping {path}: {reason}")
            continue
        flat["run"] = str(path.parent.relative_to(root)) or "."
        widths = (rec.get("pruned") or {}).get("widths")
        flat["_widths"] = widths if isinstance(widths, dict) else None
        flat["_full_widths"] = _full_widths(rec)
        flat["_config"] = rec.get("config") if isinstance(rec.get("config"), dict) else {}
        rows.append(flat)
    if not rows:
        raise ValueError(f"no usable result.json under {root}" + (f" ({len(skipped)} skipped)" if skipped else ""))
    df = pd.DataFrame(rows)
    for col in ("seed", "speedup", "latency_vs_target", "pruned.predicted_ms", "pruned.target_ms",
                "dense.latency_ms", "dense.predicted_ms"):
        df[col] = pd.to_numeric(df[col], errors="coerce") if col in df else np.nan
    # older records may lack the derived ratios; recompute them where the parts exist
    df["speedup"] = df["speedup"].fillna(df["dense.latency_ms"] / df["pruned.latency_ms"])
    df["latency_vs_target"] = df["latency_vs_target"].fillna(df["pruned.latency_ms"] / df["pruned.target_ms"])
    df["predicted_over_measured"] = df["pruned.predicted_ms"] / df["pruned.latency_ms"]
    df["latency_ratio"] = 1.0 / df["speedup"]  # pruned / dense, timed side by side in the run
    # the method's own wall time: the job without the dense training and table it shares with others
    wall = {k: pd.to_numeric(df[f"wall_seconds.{k}"], errors="coerce") if f"wall_seconds.{k}" in df
            else pd.Series(np.nan, index=df.index) for k in ("total", "dense_train", "lut")}
    df["method_seconds"] = wall["total"] - wall["dense_train"].fillna(0) - wall["lut"].fillna(0)
    return df, skipped


def mean_ci(values: Any, level: float = 0.95) -> tuple[float, float, int]:
    """Mean, Student-t confidence half-width and count of the finite values (half-width NaN if n < 2)."""
    x = pd.to_numeric(pd.Series(values, dtype=object), errors="coerce").to_numpy(float)
    x = x[np.isfinite(x)]
    if len(x) == 0:
        return math.nan, math.nan, 0
    if len(x) == 1:
        return float(x[0]), math.nan, 1
    half = stats.t.ppf(0.5 + level / 2, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x))
    return float(x.mean()), float(half), len(x)


def _per_run_metrics(df: pd.DataFrame) -> pd.DataFrame:
    """One row per run (or per seed for dense rows derived from the pruned runs' dense blocks)."""
    m = df[KEYS + ["seed"]].copy()
    for name, col in METRICS.items():
        m[name] = pd.to_numeric(df[col], errors="coerce") if col in df else np.nan
    m["source"] = "runs"
    with_dense = set(df.loc[df["method"] == "dense", "model"] + "\0" + df.loc[df["method"] == "dense", "dataset"])
    rest = df[~(df["model"] + "\0" + df["dataset"]).isin(with_dense)]
    if "dense.top1" not in rest or rest.empty:
        return m
    cols = [c for c in DENSE_METRICS.values() if c in rest]
    per_seed = rest[["model", "dataset", "seed"]].join(rest[cols].apply(pd.to_numeric, errors="coerce"))
    per_seed = per_seed.groupby(["model", "dataset", "seed"], dropna=False)[cols].mean().reset_index()
    d = per_seed[["model", "dataset", "seed"]].assign(method="dense", target=1.0, speedup=1.0, latency_ratio=1.0,
                                                      latency_vs_target=np.nan, source="dense blocks of the pruned runs")
    for name, col in DENSE_METRICS.items():
        d[name] = per_seed[col] if col in per_seed else np.nan
    d["predicted_over_measured"] = d.pop("predicted_ms") / d["latency_ms"]
    return pd.concat([m, d], ignore_index=True)


def aggregate(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (model, dataset, method, target): n, seeds, source and ``<metric>_mean``/``_ci``."""
    rows = []
    for key, grp in _per_run_metrics(df).groupby(KEYS, sort=False):
        row = dict(zip(KEYS, key), n=len(grp), source=grp["source"].iloc[0],
                   seeds=",".join(str(int(s)) if np.isfinite(s) else "?" for s in sorted(grp["seed"].astype(float))))
        for name in METRICS:
            row[f"{name}_mean"], row[f"{name}_ci"], _ = mean_ci(grp[name])
        rows.append(row)
    agg = pd.DataFrame(rows)
    order = agg["method"].map(lambda m: METHOD_ORDER.index(m) if m in METHOD_ORDER else len(METHOD_ORDER))
    agg = agg.assign(_o=order).sort_values(["model", "dataset", "_o", "method", "target"],
                                           ascending=[True, True, True, True, False])
    return agg.drop(columns="_o").reset_index(drop=True)


def check_groups(df: pd.DataFrame) -> list[str]:
    """Warnings about groups that repeat a seed or mix configurations (other than seed/target)."""
    out = []
    seeds = df.groupby(KEYS + ["seed"], dropna=False).size()
    for key, n in seeds[seeds > 1].items():
        out.append(f"{n} records for {'/'.join(map(str, key[:4]))} seed {key[4]}: all counted as separate runs")
    for key, grp in df.groupby(KEYS):
        flats = [{k: v for k, v in _flatten(c).items() if not VARYING.search(k)} for c in grp["_config"]]
        differ = sorted({k for f in flats for k in f if any(g.get(k) != f.get(k) for g in flats)})
        if differ:
            out.append(f"{'/'.join(map(str, key))} mixes configurations differing in {', '.join(differ[:6])}"
                       + (" ..." if len(differ) > 6 else ""))
    return out


def check_anchors(df: pd.DataFrame) -> list[str]:
    """Warnings about model/dataset sections whose jobs were priced with different latency-table
    anchors (``lut.anchor_id``): their budgets in ms differ. Records without the id are not counted."""
    if "lut.anchor_id" not in df:
        return []
    out = []
    for (model, dataset), grp in df.groupby(["model", "dataset"], sort=True):
        ids = grp["lut.anchor_id"].dropna().astype(str)
        ids = ids[ids != ""]
        if ids.nunique() < 2:
            continue
        parts = []
        for aid in sorted(ids.unique()):
            runs = sorted(grp.loc[ids.index[ids == aid], "run"])
            parts.append(f"{aid} ({', '.join(runs[:4])}{f' and {len(runs) - 4} more' if len(runs) > 4 else ''})")
        out.append(f"{model}/{dataset} mixes jobs priced with different latency anchors, so with different "
                   f"budgets in ms: anchors {'; '.join(parts)}")
    return out


def _fmt(mean: float, ci: float, digits: int) -> str:
    if not np.isfinite(mean):
        return "–"
    return f"{mean:.{digits}f} ± " + (f"{ci:.{digits}f}" if np.isfinite(ci) else "–")


def _scale(values: pd.Series, units: tuple[tuple[float, str], ...]) -> tuple[float, str]:
    top = float(np.nanmax(values)) if np.isfinite(values.to_numpy(float)).any() else 0.0
    return next(((f, u) for f, u in units if top >= f), units[-1])


def _lat_digits(ms: float) -> int:
    return 1 if ms >= 100 else 2 if ms >= 10 else 3


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(str(c).replace("|", "\\|") for c in r) + " |" for r in rows])


def _device_line(df: pd.DataFrame) -> str:
    cols = [c for c in ("lut.device.name", "lut.setting.backend", "lut.setting.batch", "lut.setting.threads")
            if c in df]
    if not cols:  # older records without latency-table metadata
        return "not recorded"
    parts = []
    for _, r in df.drop_duplicates(cols).iterrows():
        get = lambda k: r.get(k) if k in r and pd.notna(r.get(k)) else "?"  # noqa: E731
        parts.append(f"{get('lut.device.name')} ({get('lut.device.kind')}), {get('lut.setting.backend')}, "
                     f"batch {get('lut.setting.batch')}, {get('lut.setting.threads')} thread(s)")
    return "; ".join(parts[:4]) + (" (mixed devices/settings!)" if len(parts) > 1 else "")


METRIC_LABELS = {"top1": "top-1 (%)", "map50": "mAP@0.5 (%)"}


def quality_label(model: str) -> str:
    """The quality column's name for ``model``'s section: detectors (``mmdet:``) report mAP@0.5."""
    return METRIC_LABELS["map50" if str(model).startswith("mmdet:") else "top1"]


def section_table(agg: pd.DataFrame, extra: bool = True) -> str:
    """The paper-layout Markdown table of one model/dataset section of ``aggregate``'s output."""
    mf, mu = _scale(agg["macs_mean"], ((1e9, "G"), (1e6, "M"), (1e3, "k")))
    pf, pu = _scale(agg["params_mean"], ((1e6, "M"), (1e3, "k")))
    ld = _lat_digits(float(np.nanmax(agg["latency_ms_mean"])))
    header = ["method", "target", f"MACs ({mu})", quality_label(agg["model"].iloc[0]), "latency (ms)", "speedup"]
    header += ["n", f"params ({pu})", "measured/target", "predicted/measured", "wall (s)"] if extra else []
    rows = []
    for _, r in agg.iterrows():
        label = method_label(r["method"]) + (" *" if r["source"] != "runs" else "")
        row = [label, f"{r['target']:.0%}", _fmt(r["macs_mean"] / mf, r["macs_ci"] / mf, 2),
               _fmt(r["top1_mean"], r["top1_ci"], 2), _fmt(r["latency_ms_mean"], r["latency_ms_ci"], ld),
               _fmt(r["speedup_mean"], r["speedup_ci"], 2)]
        if extra:
            row += [str(r["n"]), _fmt(r["params_mean"] / pf, r["params_ci"] / pf, 1),
                    _fmt(r["latency_vs_target_mean"], r["latency_vs_target_ci"], 3),
                    _fmt(r["predicted_over_measured_mean"], r["predicted_over_measured_ci"], 3),
                    _fmt(r["method_seconds_mean"], r["method_seconds_ci"], 0)]
        rows.append(row)
    return _md_table(header, rows)


def results_markdown(df: pd.DataFrame, agg: pd.DataFrame) -> str:
    """``table.md``: one section per model/dataset, means ± 95 % CI over seeds."""
    out = ["# Results", "",
           "Mean over seeds ± half-width of the 95 % confidence interval (Student t); \"–\" where n = 1. "
           "Latency is measured end to end; speedup = dense / pruned measured latency within each run; "
           "measured/target = pruned latency / (target × dense latency); predicted = latency-table estimate; "
           "wall = the job's wall time without the dense training and latency-table build it shares.", ""]
    for model, dataset, g in sections(agg):
        runs = df[(df["model"] == model) & (df["dataset"] == dataset)]
        out += [f"## {model} on {dataset}", "", f"Device: {_device_line(runs)}", "", section_table(g), ""]
        if (g["source"] != "runs").any():
            out += ["\\* dense row derived from the dense model measured in each pruned run (no `method=dense` "
                    "record); n counts seeds.", ""]
    return "\n".join(out)


def _norm(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", str(name).lower().rsplit(":", 1)[-1])


def _same_model(ours: str, ref: str) -> bool:
    """Our model name against a published row's: equal once normalised, or any mmdet SSD against the
    paper's "ssd" (its detector is SSD512-RN50; ours name the backbone and input size)."""
    return _norm(ours) == _norm(ref) or (str(ours).startswith("mmdet:ssd") and _norm(ref) == "ssd")


def _same_dataset(a: str, b: str) -> bool:
    a, b = _norm(a), _norm(b)
    return bool(a and b) and (a.startswith(b) or b.startswith(a))


def _shown(path: Path) -> str:
    """``path`` as a page shows it: relative to this repository when inside it (pages must not
    carry the absolute paths of the machine that wrote them), else as given."""
    try:
        return Path(path).resolve().relative_to(DEFAULT_REFERENCE.parents[2]).as_posix()
    except ValueError:
        return str(path)


def paper_markdown(agg: pd.DataFrame, reference: Path) -> str:
    """``paper.md``: published rows (with their grade) beside ours, per model/dataset we ran."""
    out = ["# Published numbers beside ours", ""]
    if not reference.is_file():
        return "\n".join(out + [f"Reference file {reference} not found; no published numbers to show.", ""])
    ref = pd.read_csv(reference, dtype=str, keep_default_na=False)
    cols = list(ref.columns)
    if not {"model", "dataset"} <= set(cols):
        return "\n".join(out + [f"Reference file {reference} has no model/dataset columns ({', '.join(cols)}).", ""])
    out += [f"Source: `{_shown(reference)}` ({len(ref)} rows). `grade`: primary = copied from the authors' own "
            "release/abstract; secondary = a summary to be verified against the paper. Published hardware "
            "and accuracy deltas are as stated in the file; they are not re-measured.", ""]
    ref_models = sorted(set(ref["model"].map(_norm)))
    for model, dataset, g in sections(agg):
        out += [f"## {model} on {dataset}", ""]
        mine = ref[ref["model"].map(lambda r: _same_model(model, r))]
        same = mine[mine["dataset"].map(lambda d: _same_dataset(d, dataset))] if len(mine) else mine
        if len(same):
            out += [f"Published rows for {_norm(model)} on {dataset}:", "", _md_table(cols, same.values.tolist()), ""]
        else:
            if len(mine):
                shown = mine
                out += [f"The file has {_norm(model)} only on {', '.join(sorted(set(mine['dataset'])))}, "
                        f"not on {dataset}: **our numbers have no published counterpart**; the rows below "
                        "are for orientation, not comparison.", ""]
            else:
                close = difflib.get_close_matches(_norm(model), ref_models, n=2, cutoff=0.5)
                shown = ref[ref["model"].map(_norm).isin(close)] if close else ref
                out += [f"No published row for model `{model}` in the file (it covers "
                        f"{', '.join(sorted(set(ref['dataset'])))}). **Our {model} / {dataset} results, measured "
                        "on our own device, have no paper counterpart.** "
                        + (f"Rows for the closest model name(s) ({', '.join(close)}), for orientation only:"
                           if close else "All rows of the file, for orientation only:"), ""]
            out += [_md_table(cols, shown.values.tolist()), ""]
        out += ["Ours:", "", section_table(g, extra=False), ""]
    return "\n".join(out)


def build_report(runs_dir: str | Path, out_dir: str | Path | None = None, reference: str | Path | None = None,
                 formats: tuple[str, ...] = ("md", "csv"), figures: bool = True,
                 warn: Warn | None = None) -> ReportSummary:
    """Collect the records under ``runs_dir`` and write tables (``formats``: md, csv) and figures.

    ``out_dir`` defaults to ``runs_dir/report``; ``reference`` to the repo's paper_numbers.csv.
    Warnings (skipped records, mixed groups, mixed anchors) go to ``warn`` (default: stderr) and the summary.
    """
    summary_warnings: list[str] = []

    def _warn(msg: str) -> None:
        summary_warnings.append(msg)
        (warn or (lambda m: print(f"warning: {m}", file=sys.stderr)))(msg)

    df, skipped = load_records(runs_dir, _warn)
    out = Path(out_dir) if out_dir is not None else Path(runs_dir) / "report"
    out.mkdir(parents=True, exist_ok=True)
    for msg in check_groups(df) + check_anchors(df):
        _warn(msg)
    agg = aggregate(df)
    table_md = results_markdown(df, agg)
    written: list[Path] = []
    if "md" in formats:
        written.append(atomic_write(out / "table.md", lambda tmp: Path(tmp).write_text(table_md)))
        paper = paper_markdown(agg, Path(reference or DEFAULT_REFERENCE))
        written.append(atomic_write(out / "paper.md", lambda tmp: Path(tmp).write_text(paper)))
    if "csv" in formats:
        written.append(atomic_write(out / "table.csv", lambda tmp: agg.to_csv(tmp, index=False)))
        plain = df.drop(columns=[c for c in df if c.startswith("_")])
        lead = ["run", "method", "model", "dataset", "seed", "target"]
        plain = plain[lead + [c for c in plain if c not in lead]]
        written.append(atomic_write(out / "runs.csv", lambda tmp: plain.to_csv(tmp, index=False)))
    if figures:
        written.append(save_png(pareto_figure(agg), out / "pareto.png"))
        written.append(save_png(predicted_figure(df), out / "predicted_vs_measured.png"))
        wf = widths_figure(df)
        if wf is None:
            _warn("no per-group widths in the records; widths.png not written")
        else:
            written.append(save_png(wf, out / "widths.png"))
    return ReportSummary(out, len(df), skipped, written, summary_warnings, table_md)
