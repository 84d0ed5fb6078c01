"""``halp report --paper``: one Markdown page and one figure per table/figure of the paper
(:data:`experiments.paper.PAGES`), an index (``README.md``) and, optionally, the same tables and
figures in one W&B run.

Everything on a page is computed from the records and the re-timing files it is given, and written
in a fixed order with fixed formatting, so running the command again on the same runs rewrites the
same bytes (no timestamps, no absolute paths).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from halp.fileio import atomic_write

from .figures import panel_grid, save_png
from .paper import LATENCY_MARGIN, PAGES, Arm, Claim, Page, Stat, load_runs
from .remeasure import FILE_NAME as RETIMED, FORMAT as RETIMED_FORMAT
from .report import DEFAULT_REFERENCE, Warn, _fmt, _md_table, _shown

SCALE = """The whole reproduction must fit in about 6 hours of one 2-core CPU machine, so the presets
(`experiments/conf/experiment/repro_cpu/`) keep the full data and cut epochs instead:

- **Data**: all of Fashion-MNIST (60k training, 10k test images, 28×28), no subsets.
- **Dense models**: 2 epochs from scratch per seed (~90 % top-1 on ResNet-20), 3 seeds per model;
  a seed fixes its dense model, so paired claims compare methods on the same starting network.
- **Pruning and fine-tuning**: 1 epoch (469 iterations), pruning in its first 200 iterations
  (10 steps, every 20; the steps ablation keeps that 200-iteration window). The paper fine-tunes
  for 90 epochs on ImageNet; here the pruned networks get 269 iterations to recover, which makes
  the comparison harsher on methods that remove important channels.
- **Models**: ResNet-20 (ResNet-56 costs ~2.7× more per epoch) and the compact MobileNetV2 at
  width 0.5 (the full width costs ~13 min per epoch here). All ablations on ResNet-20.
- **Baselines at this scale**: EagleEye scores 20 candidates after 25 adaptive-BN batches on a
  2,000-image holdout; Taylor removes 40 channels per step.
- **Threads**: 1 per job, so two sweeps run side by side on the 2 cores (latency is timed on 1
  thread in every case). Latency on the pages comes from `halp remeasure` on a quiet machine, not
  from the jobs, whose own timings are disturbed by the sweep beside them."""

MIN_SEEDS = 3  # what the reproduction promises per arm (and what a CI needs to say anything)
PALETTE = ("tab:red", "tab:blue", "tab:green", "tab:orange", "tab:purple", "tab:brown")
VERDICT_MARK = {"holds": "**holds**", "does not hold": "**does not hold**"}


@dataclass
class PageResult:
    page: Page
    arms: list[Arm]
    claims: list[Claim]
    markdown: str
    figure: Figure | None
    table: pd.DataFrame = field(default_factory=pd.DataFrame)


def arm_table(arms: list[Arm]) -> pd.DataFrame:
    """One row per (arm, target): means ± CI over seeds of what the page shows."""
    rows = []
    for arm in arms:
        for t, g in sorted(arm.runs.groupby("target"), key=lambda kv: -kv[0]):
            s = {k: Stat.of(g[k]) for k in ("top1", "retimed", "retimed_over_target", "predicted_over_target")}
            macs = Stat.of(pd.to_numeric(g["pruned.macs"], errors="coerce") / pd.to_numeric(g["dense.macs"], errors="coerce"))
            rows.append({"arm": arm.label, "target": float(t), "n": s["top1"].n,
                         "seeds": ",".join(str(v) for v in sorted(g["seed"].unique())),
                         **{f"{k}_mean": v.mean for k, v in s.items()}, **{f"{k}_ci": v.ci for k, v in s.items()},
                         "macs_mean": macs.mean, "macs_ci": macs.ci})
    return pd.DataFrame(rows)


def _table_md(table: pd.DataFrame, dense: Stat) -> str:
    header = ["arm", "target", "n (seeds)", "top-1 (%)", "latency ÷ dense, re-timed", "re-timed ÷ target",
              "predicted ÷ target", "MACs ÷ dense"]
    rows = [["dense", "100%", f"{dense.n}", dense.fmt(2), "1", "", "", "1"]]
    for _, r in table.iterrows():
        rows.append([r["arm"], f"{r['target']:.0%}", f"{r['n']} ({r['seeds']})", _fmt(r["top1_mean"], r["top1_ci"], 2),
                     _fmt(r["retimed_mean"], r["retimed_ci"], 3), _fmt(r["retimed_over_target_mean"], r["retimed_over_target_ci"], 3),
                     _fmt(r["predicted_over_target_mean"], r["predicted_over_target_ci"], 3),
                     _fmt(r["macs_mean"], r["macs_ci"], 3)])
    return _md_table(header, rows)


def _claims_md(claims: list[Claim]) -> str:
    rows = [[c.text, f"{c.better} − {c.worse}", f"{c.delta.fmt(2, signed=True)} {c.unit} (n = {c.delta.n})",
             c.latency.fmt(3, signed=True) if c.latency is not None else "equal by construction",
             VERDICT_MARK.get(c.verdict, c.verdict), c.why] for c in claims]
    return _md_table(["claim", "difference", "mean ± 95 % CI", "latency ÷ dense, difference", "verdict", "why"], rows)


def page_figure(title: str, table: pd.DataFrame, dense: Stat) -> Figure:
    """Top-1 against re-timed latency (% of dense), one line per arm, 95 % CI bars on both axes."""
    fig, (ax,) = panel_grid(1, w=7.0, h=4.8)
    for i, (arm, g) in enumerate(table.groupby("arm", sort=False)):
        g = g.sort_values("retimed_mean")
        ax.errorbar(100 * g["retimed_mean"], g["top1_mean"], xerr=100 * g["retimed_ci"].fillna(0),
                    yerr=g["top1_ci"].fillna(0), fmt="-o", color=PALETTE[i % len(PALETTE)], capsize=3, label=arm)
        for x, (_, r) in zip(100 * g["retimed_mean"], g.iterrows()):
            ax.annotate(f"{r['target']:.0%}", (x, r["top1_mean"]), fontsize=8, xytext=(4, 4),
                        textcoords="offset points", color=PALETTE[i % len(PALETTE)])
    if np.isfinite(dense.mean):
        ax.axhline(dense.mean, color="gray", ls="--", lw=1, label=f"dense ({dense.mean:.2f})")
    ax.set(title=title, xlabel="latency, % of the dense model's (re-timed side by side, median)",
           ylabel="top-1 accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, title="labels: target", title_fontsize=8)
    return fig


def _reference_md(page: Page, reference: Path) -> list[str]:
    if not page.reference or not reference.is_file():
        return []
    ref = pd.read_csv(reference, dtype=str, keep_default_na=False)
    rows = ref[ref["model"].isin(page.reference)]
    if rows.empty:
        return []
    cols = ["source", "grade", "model", "dataset", "method", "variant", "top1", "speedup", "hardware"]
    return [f"Published rows (`{_shown(reference)}`; grade: primary = the authors' release or abstract, secondary = "
            "a summary to verify). They are ImageNet numbers on a GPU: our CPU-scale runs test the same claim, "
            "not the same numbers.", "", _md_table(cols, rows[cols].values.tolist()), ""]


def render_page(page: Page, df: pd.DataFrame, reference: Path) -> PageResult | None:
    """The page's Markdown and figure, or None when no record belongs to it."""
    every = page.arms(df)
    arms = [a for a in every if len(a.runs)]
    if not arms:
        return None
    runs = pd.concat([a.runs for a in arms]).drop_duplicates("run")
    dense = Stat.of(runs.groupby("seed")["dense_top1"].mean())
    table = arm_table(arms)
    claims = page.claims(df, every)  # an arm without runs yet: its claims are inconclusive (n = 0)
    commits = sorted(set(runs["git_commit"].dropna().astype(str).str[:7])) if "git_commit" in runs else []
    setting = runs.iloc[0]
    md = [f"# {page.title}", "",
          f"Mirrors: {page.mirrors}. Sweep: `halp-run -m experiment=repro_cpu/{page.preset}` (its header says "
          "what differs from the paper: model, data, device, schedule).", "",
          f"Model `{setting['model']}` on {setting['dataset']}; latency: {setting.get('lut.device.name', '?')} "
          f"({setting.get('lut.setting.backend', '?')}, batch {setting.get('lut.setting.batch', '?')}, "
          f"{setting.get('lut.setting.threads', '?')} thread(s)). {len(runs)} runs from commit(s) "
          f"{', '.join(f'`{c}`' for c in commits) or 'unknown'}; seeds {','.join(map(str, sorted(runs['seed'].unique())))} "
          "(a seed fixes the dense model and the data order; claims pair runs by seed).", "",
          "Mean ± half-width of the 95 % confidence interval over seeds (Student t). \"Re-timed\": each slim "
          "model timed side by side with its dense model, interleaved, in one process after the sweep "
          "(`halp remeasure`), median of the repeats; the jobs' own timings are not used. \"Predicted\": the "
          "latency table's estimate of the final widths.", "",
          _table_md(table, dense), "", f"![{page.title}]({page.key}.png)", "",
          "## Claims", "", _claims_md(claims) if claims else "No claim can be tested: an arm has no runs.", "",
          "Verdicts: **holds** when the 95 % CI of the paired difference lies above 0 (and the favoured arm is not "
          f"significantly slower: the CI of its latency difference is not wholly above +{LATENCY_MARGIN:.2f} of the "
          "dense latency), **does not hold** when it lies below 0 (and the favoured arm is not significantly "
          "faster, by the same margin), inconclusive otherwise.", ""]
    md += _reference_md(page, reference)
    md += [f"{n}" for n in page.notes]
    return PageResult(page, arms, claims, "\n".join(md).rstrip() + "\n", page_figure(page.title, table, dense), table)


def index_md(results: list[PageResult], df: pd.DataFrame, out: Path) -> str:
    """``README.md`` of the pages: index, verdicts, commands, commits and what it cost."""
    commits = sorted(set(df["git_commit"].dropna().astype(str))) if "git_commit" in df else []
    wall = pd.to_numeric(df.get("wall_seconds.total"), errors="coerce").fillna(0).sum()
    dense_s = pd.to_numeric(df.get("wall_seconds.dense_train"), errors="coerce").fillna(0).sum()
    lut_s = pd.to_numeric(df.get("wall_seconds.lut"), errors="coerce").fillna(0).sum()
    lines = ["# The paper's claims at CPU scale", "",
             f"{len(df)} runs; records made by commit(s) {', '.join(f'`{c[:12]}`' for c in commits) or 'unknown'}. "
             f"Their jobs took {wall / 3600:.2f} h of wall time in all (dense training {dense_s / 3600:.2f} h and "
             f"latency tables {lut_s / 3600:.2f} h of it, counted in the job that made them).", "",
             "| page | mirrors | seeds per arm | claims: holds / does not hold / inconclusive |", "|---|---|---|---|"]
    for r in results:
        counts = [sum(c.verdict == v for c in r.claims) for v in ("holds", "does not hold", "inconclusive at this n")]
        n = [int(v) for v in r.table["n"]] if len(r.table) else [0]
        seeds = f"{min(n)}" if min(n) == max(n) else f"{min(n)}-{max(n)}"
        if min(n) < MIN_SEEDS or len(r.arms) < len(r.page.arms(df)):
            seeds += f" (**incomplete**: fewer than {MIN_SEEDS} seeds in some arm)"
        lines.append(f"| [{r.page.title}]({r.page.key}.md) | {r.page.mirrors} | {seeds} | {' / '.join(map(str, counts))} |")
    lines += ["", "## Verdicts", ""]
    for r in results:
        lines += [f"- {r.page.title}:"] + [f"  - {c.text}: {VERDICT_MARK.get(c.verdict, c.verdict)} "
                                           f"({c.delta.fmt(2, signed=True)} {c.unit}, n = {c.delta.n})" for c in r.claims]
    lines += ["", "## Scale: what was chosen and why", "", SCALE, ""]
    o = _shown(out)
    lines += ["## Commands", "", "The sweeps write to `runs/repro_cpu/` (each preset's `hydra.sweep.dir`); the report copies "
              f"their records and re-timing to `{o}/{RECORDS}/` and makes the pages from there.", "", "```",
              *[f"halp-run -m experiment=repro_cpu/{r.page.preset}" for r in results],
              "halp remeasure runs/repro_cpu", f"halp report --paper runs/repro_cpu --out {o}", "```", "",
              "Rebuild the pages from the committed records (same bytes):", "", "```",
              f"halp report --paper {o}/{RECORDS} --out {o}", "```", ""]
    return "\n".join(lines)


RECORDS = "runs"  # <out>/runs: the records (and re-timing) the pages are made from, committed with them


def collect(roots: list[Path], dest: Path) -> int:
    """Copy every ``result.json`` and ``remeasured.json`` under ``roots`` to ``dest`` (same layout;
    with several roots, each under its folder name), replacing what ``dest`` held: the pages are
    always made from ``<out>/runs``, so they can be rebuilt from what is committed. Returns the
    number of records copied."""
    import json
    import shutil

    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    retimed: dict = {}
    n = 0
    for root in roots:
        prefix = f"{root.name}/" if len(roots) > 1 else ""
        for path in sorted(root.rglob("result.json")):
            target = tmp / prefix / path.relative_to(root)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
            n += 1
        blob = root / RETIMED
        if blob.exists():
            data = json.loads(blob.read_text())
            retimed.update({prefix + k: v for k, v in data["runs"].items()})
    if retimed:
        (tmp / RETIMED).write_text(json.dumps({"format": RETIMED_FORMAT, "runs": dict(sorted(retimed.items()))},
                                              indent=1) + "\n")
    old = dest.with_name(dest.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if dest.exists():
        dest.rename(old)
    tmp.rename(dest)
    shutil.rmtree(old, ignore_errors=True)
    return n


def build_paper(roots: list[Path], out: Path, reference: Path | None = None, figures: bool = True,
                warn: Warn | None = None) -> tuple[list[Path], list[PageResult], pd.DataFrame]:
    """Copy the records under ``roots`` to ``out/runs`` (unless that is the one root given), then
    write every page that has runs, its figure and the index into ``out``; returns the files
    written, the pages and the runs."""
    records = out / RECORDS
    roots = [Path(r) for r in roots]
    if [r.resolve() for r in roots] != [records.resolve()]:
        collect(roots, records)
    df = load_runs([records], warn)
    out.mkdir(parents=True, exist_ok=True)
    results = [r for p in PAGES if (r := render_page(p, df, Path(reference or DEFAULT_REFERENCE))) is not None]
    if not results:
        raise ValueError(f"no run under {', '.join(map(str, roots))} belongs to a reproduction page "
                         "(experiment=repro_cpu/*)")
    written = []
    for r in results:
        written.append(atomic_write(out / f"{r.page.key}.md", lambda tmp, t=r.markdown: Path(tmp).write_text(t)))
        if figures and r.figure is not None:
            written.append(save_png(r.figure, out / f"{r.page.key}.png"))
    index = index_md(results, df, out)
    written.append(atomic_write(out / "README.md", lambda tmp: Path(tmp).write_text(index)))
    return written, results, df


def log_to_wandb(results: list[PageResult], out: Path, logger: object, run_dir: Path) -> str | None:
    """Log every page's table (``paper/<page>/table``) and figure (``paper/<page>/figure``) to one W&B
    run in ``run_dir``; returns its id (None if W&B is off or failed)."""
    from .tracking import Tracker

    tracker = Tracker.start(logger, run_dir, name="paper-report", config={"pages": [r.page.key for r in results]})
    with tracker:
        for r in results:
            cols = [c for c in r.table.columns]
            rows = [[None if isinstance(v, float) and math.isnan(v) else v for v in row]
                    for row in r.table.itertuples(index=False)]
            tracker.media(tables={f"paper/{r.page.key}/table": (cols, rows)},
                          images={f"paper/{r.page.key}/figure": out / f"{r.page.key}.png"})
        return tracker.run_id if tracker.active else None
