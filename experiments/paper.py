"""The paper's claims, tested on a CPU-scale reproduction: which runs make which page, and how a
claim is decided.

A *page* mirrors one table or figure of the paper (``experiments/conf/experiment/repro_cpu/*``).
Its runs are selected from the records by their configuration, not by folder: the default arm of
every ablation is the main comparison's HALP-50 % run of the same seed, so it is trained once.
A *claim* compares two arms seed by seed (same seed = same dense model, same data order), and its
verdict is read off the 95 % confidence interval of the paired difference:

* **holds**: the interval lies above zero (and, where latency matters, the favoured arm is not
  significantly slower: the CI of its latency difference does not lie wholly above
  :data:`LATENCY_MARGIN`);
* **does not hold**: the interval lies below zero (and the favoured arm is not significantly
  faster, by the same margin);
* **inconclusive at this n**: anything else.

Pages are written by :mod:`experiments.paper_pages`; this module holds no I/O but reading records.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from .remeasure import FILE_NAME as RETIMED_FILE
from .report import Warn, load_records, mean_ci

# the knobs a page's arms differ in, read from each record's config (defaults of the main comparison)
KNOBS: dict[str, tuple[str, object]] = {
    "solver": ("method.solver", "exact"), "saliency": ("method.saliency", "taylor_bn"),
    "chunk": ("prune.chunk", "auto"), "steps": ("prune.steps", 10), "cost": ("latency.cost", "latency"),
    "two_sided": ("latency.two_sided", True),
}


def _get(config: dict, dotted: str) -> object:
    node: object = config
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def load_runs(roots: list[Path], warn: Warn | None = None) -> pd.DataFrame:
    """Every record under ``roots``, one row per run, with the page knobs as columns and
    ``retimed`` = the re-timed slim/dense ratio from ``<root>/remeasured.json`` (NaN where missing)."""
    frames = []
    for root in roots:
        df, _ = load_records(root, warn)
        retimed_path = Path(root) / RETIMED_FILE
        retimed = json.loads(retimed_path.read_text())["runs"] if retimed_path.exists() else {}
        df["retimed"] = [float(retimed[r]["ratio"]) if r in retimed else math.nan for r in df["run"]]
        df["root"] = Path(root).name
        frames.append(df)
    df = pd.concat(frames, ignore_index=True)
    for knob, (path, default) in KNOBS.items():
        df[knob] = [default if _get(c, path) is None else _get(c, path) for c in df["_config"]]
    df["chunk"] = df["chunk"].astype(str)
    df["seed"] = df["seed"].astype(int)
    df["top1"] = pd.to_numeric(df["pruned.top1"], errors="coerce")
    df["dense_top1"] = pd.to_numeric(df["dense.top1"], errors="coerce")
    df["predicted_over_target"] = pd.to_numeric(df.get("budget.final_over_target"), errors="coerce")
    df["retimed_over_target"] = df["retimed"] / df["target"]
    missing = df.loc[df["retimed"].isna() & (df["method"] != "dense"), "run"].tolist()
    if missing and warn:
        warn(f"{len(missing)} run(s) have no re-timed ratio (run `halp remeasure` on their folder); their latency "
             f"columns are empty: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    return df


def at_defaults(df: pd.DataFrame, *, but: tuple[str, ...] = ()) -> pd.Series:
    """Rows whose knobs are the main comparison's, except those named in ``but``."""
    ok = pd.Series(True, index=df.index)
    for knob, (_, default) in KNOBS.items():
        if knob not in but:
            ok &= df[knob].astype(str) == str(default)
    return ok


@dataclass
class Stat:
    """Mean, 95 % CI half-width and n of some values."""
    mean: float
    ci: float
    n: int

    @classmethod
    def of(cls, values: object) -> "Stat":
        return cls(*mean_ci(values))

    @property
    def low(self) -> float:
        return self.mean - self.ci if np.isfinite(self.ci) else math.nan

    @property
    def high(self) -> float:
        return self.mean + self.ci if np.isfinite(self.ci) else math.nan

    def fmt(self, digits: int = 2, signed: bool = False) -> str:
        if not np.isfinite(self.mean):
            return "–"
        s = f"{self.mean:+.{digits}f}" if signed else f"{self.mean:.{digits}f}"
        return s + " ± " + (f"{self.ci:.{digits}f}" if np.isfinite(self.ci) else "–")


HOLDS, FAILS, INCONCLUSIVE = "holds", "does not hold", "inconclusive at this n"
# latency differences (re-timed slim / dense) inside this margin count as equal latency: the
# re-timing itself scatters by about 1 % of the dense latency between repeats on this machine
LATENCY_MARGIN = 0.01


@dataclass
class Claim:
    """One claim of the paper, tested on paired differences ``better - worse`` per seed."""
    text: str
    better: str
    worse: str
    delta: Stat            # of the quality difference (positive: the claim's direction)
    latency: Stat | None   # of the re-timed latency difference better - worse (None: not compared)
    unit: str = "top-1 points"
    verdict: str = ""
    why: str = ""

    def __post_init__(self) -> None:
        self.verdict, self.why = decide(self.delta, self.latency)


def decide(delta: Stat, latency: Stat | None) -> tuple[str, str]:
    """The verdict the confidence intervals give (see the module docstring), and why."""
    if delta.n < 2 or not np.isfinite(delta.ci):
        return INCONCLUSIVE, f"n = {delta.n}: no confidence interval"
    slower = latency is not None and np.isfinite(latency.low) and latency.low > LATENCY_MARGIN
    faster = latency is not None and np.isfinite(latency.high) and latency.high < -LATENCY_MARGIN
    if delta.low > 0:
        if slower:
            return INCONCLUSIVE, "better, but also significantly slower: not at equal latency"
        return HOLDS, "the 95 % CI of the difference lies above 0"
    if delta.high < 0:
        if faster:
            return INCONCLUSIVE, "worse, but also significantly faster: not at equal latency"
        return FAILS, "the 95 % CI of the difference lies below 0"
    return INCONCLUSIVE, "the 95 % CI of the difference contains 0"


def paired(a: pd.DataFrame, b: pd.DataFrame, column: str) -> pd.Series:
    """``a[column] - b[column]`` matched by seed (seeds present in both only)."""
    x = a.groupby("seed")[column].mean()
    y = b.groupby("seed")[column].mean()
    return (x - y).dropna()


def compare(text: str, better: tuple[str, pd.DataFrame], worse: tuple[str, pd.DataFrame],
            column: str = "top1", unit: str = "top-1 points", latency: bool = True) -> Claim:
    """The claim that arm ``better`` beats arm ``worse`` on ``column`` (paired by seed)."""
    lat = Stat.of(paired(better[1], worse[1], "retimed")) if latency else None
    return Claim(text, better[0], worse[0], Stat.of(paired(better[1], worse[1], column)), lat, unit)


def interpolated(curve: pd.DataFrame, x: float, column: str = "top1") -> float:
    """``column`` of a one-seed accuracy-latency curve (rows with ``retimed``) at latency ``x``,
    linearly interpolated; NaN outside the curve's measured range (no extrapolation)."""
    c = curve.dropna(subset=["retimed", column]).sort_values("retimed")
    if len(c) < 2 or not (c["retimed"].iloc[0] <= x <= c["retimed"].iloc[-1]):
        return math.nan
    return float(np.interp(x, c["retimed"], c[column]))


@dataclass
class Arm:
    """One line of a page's table (and one series of its figure)."""
    label: str
    runs: pd.DataFrame


@dataclass
class Page:
    """One table/figure of the paper, at CPU scale."""
    key: str
    title: str
    mirrors: str
    preset: str                      # experiment=repro_cpu/<preset>, the sweep that makes it
    arms: Callable[[pd.DataFrame], list[Arm]]
    claims: Callable[[pd.DataFrame, list[Arm]], list[Claim]]
    reference: tuple[str, ...] = ()  # model names of the published rows shown beside ours
    notes: list[str] = field(default_factory=list)


# --- the pages ------------------------------------------------------------------------------------
BASELINES = ("eagleeye", "taylor", "magnitude")
LABELS = {"halp": "HALP", "eagleeye": "EagleEye", "taylor": "Taylor", "magnitude": "Magnitude"}
R20 = "halp:resnet20"


def _halp50(df: pd.DataFrame, but: tuple[str, ...] = ()) -> pd.DataFrame:
    """ResNet-20 HALP at 50 %: the ablations' runs (the default arm is the main comparison's)."""
    return df[(df["model"] == R20) & (df["method"] == "halp") & (df["target"] == 0.5) & at_defaults(df, but=but)]


def _main_arms(model: str) -> Callable[[pd.DataFrame], list[Arm]]:
    def arms(df: pd.DataFrame) -> list[Arm]:
        sel = df[(df["model"] == model) & at_defaults(df)]
        return [Arm(LABELS[m], sel[sel["method"] == m]) for m in ("halp", *BASELINES) if (sel["method"] == m).any()]
    return arms


def _main_claims(df: pd.DataFrame, arms: list[Arm]) -> list[Claim]:
    by = {a.label: a.runs for a in arms}
    out = []
    for base in BASELINES:
        if "HALP" not in by or LABELS[base] not in by:
            continue
        for t in sorted(set(by["HALP"]["target"]) & set(by[LABELS[base]]["target"])):
            h, b = by["HALP"], by[LABELS[base]]
            out.append(compare(f"At {t:.0%} of the dense latency, HALP is more accurate than {LABELS[base]}",
                               (f"HALP {t:.0%}", h[h["target"] == t]), (f"{LABELS[base]} {t:.0%}", b[b["target"] == t])))
    return out


def _knob_arms(knob: str, values: tuple[tuple[object, str], ...]) -> Callable[[pd.DataFrame], list[Arm]]:
    def arms(df: pd.DataFrame) -> list[Arm]:
        sel = _halp50(df, but=(knob,))
        return [Arm(label, sel[sel[knob].astype(str) == str(v)]) for v, label in values]
    return arms


def _pairs(*pairs: tuple[str, str, str]) -> Callable[[pd.DataFrame, list[Arm]], list[Claim]]:
    """Claims ``text``: arm ``better`` beats arm ``worse`` on top-1 at equal latency."""
    def claims(df: pd.DataFrame, arms: list[Arm]) -> list[Claim]:
        by = {a.label: a.runs for a in arms}
        return [compare(text, (b, by[b]), (w, by[w])) for text, b, w in pairs]
    return claims


def _flops_arms(df: pd.DataFrame) -> list[Arm]:
    lat = df[(df["model"] == R20) & (df["method"] == "halp") & at_defaults(df)]
    macs = df[(df["model"] == R20) & (df["method"] == "halp") & at_defaults(df, but=("cost",)) & (df["cost"] == "macs")]
    return [Arm("latency budget", lat), Arm("FLOPs (MACs) budget", macs)]


def _flops_claims(df: pd.DataFrame, arms: list[Arm]) -> list[Claim]:
    lat, macs = arms[0].runs, arms[1].runs
    out = []
    for t in sorted(set(macs["target"])):
        rows = macs[macs["target"] == t]
        # per seed: the latency-aware curve of that seed, read at the FLOPs run's re-timed latency
        at_same = pd.DataFrame({"seed": rows["seed"], "retimed": rows["retimed"],
                                "top1": [interpolated(lat[lat["seed"] == s], x) for s, x in zip(rows["seed"], rows["retimed"])]})
        out.append(compare(f"At the latency a {t:.0%} MACs budget reaches, a latency budget gives a more accurate "
                           "network (latency-aware HALP read off its 30-70 % curve at that latency, per seed)",
                           ("latency budget", at_same), (f"MACs {t:.0%}", rows), latency=False))
    return out


def _pricing_claims(df: pd.DataFrame, arms: list[Arm]) -> list[Claim]:
    two, one = arms[0].runs.copy(), arms[1].runs.copy()
    for runs in (two, one):  # closeness to the target, in % of it (higher is closer)
        runs["on_target"] = -100 * (runs["retimed_over_target"] - 1).abs()
    out = [compare("Pricing every latency a group changes lands closer to the latency target than pricing "
                   "only its writers (|re-timed / target - 1|)", ("two-sided", two), ("one-sided", one),
                   column="on_target", unit="% of the target", latency=False)]
    out.append(compare("Two-sided pricing gives a more accurate network than one-sided",
                       ("two-sided", two), ("one-sided", one)))
    return out


PAGES: tuple[Page, ...] = (
    Page("main_resnet20", "HALP vs EagleEye, Taylor and magnitude pruning: ResNet-20",
         "Table 1 / Fig. 1 (ResNet-50 on ImageNet: accuracy against latency for each method)",
         "main_resnet20", _main_arms(R20), _main_claims, reference=("resnet50",)),
    Page("main_mobilenetv2", "HALP vs EagleEye, Taylor and magnitude pruning: compact MobileNetV2 (0.5)",
         "the MobileNetV2 rows of the paper's MobileNet table (ImageNet)",
         "main_mobilenetv2", _main_arms("halp:mobilenetv2"), _main_claims, reference=("mobilenetv2",)),
    Page("ablation_solver", "Solver: exact knapsack vs greedy", "the solver ablation (knapsack vs greedy selection)",
         "ablation_solver", _knob_arms("solver", (("exact", "exact knapsack"), ("greedy", "greedy"))),
         _pairs(("The exact knapsack prunes to a more accurate network than greedy selection",
                 "exact knapsack", "greedy"))),
    Page("ablation_saliency", "Saliency: BN-Taylor vs its square vs L1 / L2 filter norms",
         "the importance-criterion ablation (BN-Taylor vs weight magnitude)",
         "ablation_saliency", _knob_arms("saliency", (("taylor_bn", "BN-Taylor"), ("taylor_bn_sq", "BN-Taylor squared"),
                                                      ("l1", "L1 norm"), ("l2", "L2 norm"))),
         _pairs(("BN-Taylor saliency beats the L1 norm", "BN-Taylor", "L1 norm"),
                ("BN-Taylor saliency beats the L2 norm", "BN-Taylor", "L2 norm"),
                ("BN-Taylor (|.|) beats its square", "BN-Taylor", "BN-Taylor squared"))),
    Page("ablation_grouping", "Grouping: latency-aware chunks vs single channels vs fixed 32",
         "the latency-aware grouping ablation",
         "ablation_grouping", _knob_arms("chunk", (("auto", "staircase chunks"), ("1", "1 channel"), ("32", "32 channels"))),
         _pairs(("Latency-aware grouping beats one channel per decision", "staircase chunks", "1 channel"),
                ("Latency-aware grouping beats fixed 32-channel groups", "staircase chunks", "32 channels"))),
    Page("ablation_steps", "Number of pruning steps (same 200-iteration window)",
         "the ablation of the number of pruning steps",
         "ablation_steps", _knob_arms("steps", ((1, "1 step"), (5, "5 steps"), (10, "10 steps"), (30, "30 steps"))),
         _pairs(("30 steps prune better than 1", "30 steps", "1 step"),
                ("10 steps prune better than 1", "10 steps", "1 step"),
                ("30 steps prune better than 10", "30 steps", "10 steps"))),
    Page("ablation_flops", "Latency-aware vs FLOPs-aware budget, at equal measured latency",
         "the latency vs FLOPs constraint ablation", "ablation_flops", _flops_arms, _flops_claims),
    Page("ablation_pricing", "One- vs two-sided pricing of a channel group",
         "no figure of the paper (its eq. prices a group by the layers that write it); this suite's issue 11",
         "ablation_pricing", _knob_arms("two_sided", ((True, "two-sided"), (False, "one-sided"))), _pricing_claims),
)
