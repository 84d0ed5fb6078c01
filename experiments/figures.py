"""The report's figures: accuracy vs measured latency (Pareto), predicted vs measured latency,
and the per-group widths of pruned models. Input frames come from :mod:`experiments.report`."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

import baselines  # noqa: F401  (registers the baselines, whose labels the figures print)
from halp.fileio import atomic_write
from halp.pruners import pruner_label

COLORS = {"dense": "black", "halp": "tab:red", "eagleeye": "tab:blue", "taylor": "tab:green",
          "magnitude": "tab:orange"}


def method_label(method: str) -> str:
    """How tables and legends name ``method``: its registered label (the name if unregistered)."""
    return "dense" if method == "dense" else pruner_label(method)


def sections(agg: pd.DataFrame) -> list[tuple[str, str, pd.DataFrame]]:
    """(model, dataset, rows) of the aggregated table, one per report section."""
    return [(m, d, g) for (m, d), g in agg.groupby(["model", "dataset"], sort=True)]


def panel_grid(n: int, w: float = 6.0, h: float = 4.5) -> tuple[Figure, list]:
    cols = min(2, max(1, n))
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(w * cols, h * rows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(rows, cols, i + 1) for i in range(n)]
    return fig, axes


def save_png(fig: Figure, path: Path) -> Path:
    """Write ``fig`` as a PNG, atomically."""
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))


def pareto_figure(agg: pd.DataFrame) -> Figure:
    """Top-1 vs measured latency per method (error bars = 95 % CI), dense as a star and a dashed line.

    Latency is each pruned model's measured latency as a percentage of the dense model's, both
    timed side by side at the end of the same run: absolute times drift between runs on a shared
    machine, so milliseconds from different runs are not comparable; these ratios are."""
    secs = sections(agg)
    fig, axes = panel_grid(len(secs))
    for ax, (model, dataset, g) in zip(axes, secs):
        for method, mg in g.groupby("method", sort=False):
            mg = mg.sort_values("latency_ratio_mean")
            c = COLORS.get(method)
            x, xerr = 100 * mg["latency_ratio_mean"], 100 * mg["latency_ratio_ci"].fillna(0)
            if method == "dense":
                r = mg.iloc[0]
                ax.axhline(r["top1_mean"], color="gray", ls="--", lw=1)
                ax.plot(100.0, r["top1_mean"], "*", ms=16, color=c, label="dense", zorder=5)
                continue
            ax.errorbar(x, mg["top1_mean"], xerr=xerr, yerr=mg["top1_ci"].fillna(0), fmt="-o", color=c, capsize=3,
                        label=method_label(method))
            for xi, (_, r) in zip(x, mg.iterrows()):
                ax.annotate(f"{r['target']:.0%}", (xi, r["top1_mean"]), fontsize=8,
                            xytext=(4, 4), textcoords="offset points", color=c)
        ax.set(title=f"{model} on {dataset}", ylabel="mAP@0.5 (%)" if str(model).startswith("mmdet:") else "top-1 accuracy (%)",
               xlabel="measured latency, % of the dense model's (timed side by side in each run)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, title="method (labels: latency target)", title_fontsize=8)
    return fig


def predicted_figure(df: pd.DataFrame) -> Figure:
    """Predicted (latency table) vs measured pruned latency, one point per run, y = x for reference."""
    secs = [(k, g) for k, g in df.groupby(["model", "dataset"], sort=True)]
    fig, axes = panel_grid(len(secs), 5.5, 5.0)
    for ax, ((model, dataset), g) in zip(axes, secs):
        g = g[np.isfinite(g["pruned.predicted_ms"])]
        for method, mg in g.groupby("method", sort=False):
            ax.scatter(mg["pruned.latency_ms"], mg["pruned.predicted_ms"], s=30, alpha=0.8,
                       color=COLORS.get(method), label=method_label(method))
        vals = pd.concat([g["pruned.latency_ms"], g["pruned.predicted_ms"]]).astype(float)
        lo, hi = (float(vals.min()), float(vals.max())) if len(vals) else (0.0, 1.0)
        pad = 0.08 * (hi - lo or hi or 1.0)
        ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], "k--", lw=1, label="y = x")
        ratio = (g["pruned.predicted_ms"] / g["pruned.latency_ms"]).median() if len(g) else math.nan
        ax.text(0.98, 0.02, f"median predicted/measured = {ratio:.3f}\n{len(g)} run(s)", ha="right",
                va="bottom", transform=ax.transAxes, fontsize=9)
        ax.set(title=f"{model} on {dataset}", xlabel="measured latency of the pruned model (ms)", ylabel="predicted latency (ms, latency table)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return fig


def widths_figure(df: pd.DataFrame) -> Figure | None:
    """Kept fraction of each channel group (median over seeds), one panel per model/dataset/method."""
    ok = df[(df["method"] != "dense") & df["_widths"].map(lambda w: isinstance(w, dict) and bool(w))]
    panels = [(k, g) for k, g in ok.groupby(["model", "dataset", "method"], sort=True)]
    if not panels:
        return None
    n_groups = max(len(w) for w in ok["_widths"])
    width = min(24.0, max(8.0, 0.32 * n_groups + 2))
    fig = Figure(figsize=(width, 3.6 * len(panels)), layout="constrained")
    FigureCanvasAgg(fig)
    for i, ((model, dataset, method), g) in enumerate(panels):
        ax = fig.add_subplot(len(panels), 1, i + 1)
        names = list(g["_widths"].iloc[0])  # group order as the record lists it (network order)
        # full widths from the latency table's dense anchor; else the widest seen in any run
        full = next((f for f in df.loc[df["model"] == model, "_full_widths"] if isinstance(f, dict)), None)
        if full is None:
            full = {k: max(w.get(k, 0) for w in df.loc[df["model"] == model, "_widths"] if isinstance(w, dict))
                    for k in names}
        targets = sorted(g["target"].unique(), reverse=True)
        bw = 0.8 / len(targets)
        x = np.arange(len(names))
        for j, t in enumerate(targets):
            tg = g[g["target"] == t]
            frac = np.array([[w.get(k, np.nan) / full[k] if full.get(k) else np.nan for k in names]
                             for w in tg["_widths"]], float)
            med, pos = np.nanmedian(frac, axis=0), x + (j - (len(targets) - 1) / 2) * bw
            bars = ax.bar(pos, med, bw, label=f"target {t:.0%} (n={len(tg)})")
            gone = med == 0  # a group removed entirely has no bar; mark it so it is not read as missing
            ax.plot(pos[gone], np.full(gone.sum(), 0.03), "x", color=bars.patches[0].get_facecolor(), ms=6)
        ax.set_xticks(x, names, rotation=90, fontsize=7 if len(names) > 30 else 8)
        ax.set(ylim=(0, 1.3), ylabel="kept fraction of channels", xlabel="channel group (network order; x = removed)",
               title=f"{method_label(method)}: {model} on {dataset} (median over seeds)")
        ax.axhline(1.0, color="gray", lw=0.8, ls=":")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8, ncol=min(len(targets), 6), loc="upper center")
    return fig
