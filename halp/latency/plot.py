"""Staircase plots of a latency table (matplotlib, written to PNG)."""
from __future__ import annotations

import math
import os
from pathlib import Path

from ..fileio import atomic_write
from .table import LatencyTable


def plot_staircases(table: LatencyTable, path: str | os.PathLike, max_units: int = 12) -> Path:
    """One panel per unit (the ones with most points first): latency vs c_out for a few c_in
    values, the whole unit solid and the conv alone dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted(table.entries, key=lambda k: -len(table.entries[k]))[:max_units]
    if not keys:
        raise ValueError("the table has no entries to plot")
    cols = min(3, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.6 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        pts = table.entries[key]
        cins = sorted({ci for ci, _ in pts})
        chosen = sorted({cins[round(i * (len(cins) - 1) / 3)] for i in range(4)}) if len(cins) > 1 else cins
        depthwise = table.units[key].depthwise
        for ci in ([None] if depthwise else chosen):
            row = sorted((co, e) for (c, co), e in pts.items() if depthwise or c == ci)
            xs = [co for co, _ in row]
            line, = ax.plot(xs, [e.ms for _, e in row], marker=".", drawstyle="steps-pre",
                            label="c=c_in=c_out" if depthwise else f"c_in={ci}")
            if any(e.conv_ms is not None and e.conv_ms != e.ms for _, e in row):
                ax.plot(xs, [e.conv_ms for _, e in row], ls="--", color=line.get_color(), alpha=0.6)
        ax.set_title(key, fontsize=8)
        ax.set_xlabel("c_out")
        ax.set_ylabel("ms")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    st = table.meta.get("setting", {})
    fig.suptitle(f"{table.meta.get('model')} on {table.meta.get('device', {}).get('name')}: batch "
                 f"{st.get('batch')}, {st.get('threads')} thread(s), {st.get('backend')} "
                 "(solid: conv+BN+act, dashed: conv alone)", fontsize=9)
    fig.tight_layout()
    out = atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return out
