"""``halp report --paper`` and ``halp remeasure``: claims decided by the CI of paired differences
(checked against hand-computed intervals), pages rebuilt byte for byte, the W&B read-back of a
page's table and figure, and a re-timing that resumes."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from experiments.paper import FAILS, HOLDS, INCONCLUSIVE, PAGES, Stat, decide, interpolated, paired
from experiments.paper_pages import build_paper, log_to_wandb
from experiments.tracking import LoggerConfig

ROOT = Path(__file__).resolve().parents[1]
NOISE = (0.2, -0.1, -0.1)  # per seed, shared by every arm of that seed (as a shared dense model would be)
JITTER = (0.05, -0.05, 0.0)


def record(method: str, target: float, seed: int, top1: float, macs: float = 0.5, **knobs: object) -> dict:
    """A result.json as a job writes it, reduced to what the pages read."""
    halp = {"name": "halp", "solver": knobs.get("solver", "exact"), "saliency": knobs.get("saliency", "taylor_bn")}
    steps = knobs.get("steps", 10)
    cfg = {"method": halp if method == "halp" else {"name": method}, "seed": seed,
           "prune": {"target": target, "steps": steps, "interval": 200 // steps, "chunk": knobs.get("chunk", "auto")},
           "latency": {"cost": knobs.get("cost", "latency"), "two_sided": knobs.get("two_sided", True)}}
    return {"method": method, "model": knobs.get("model", "halp:resnet20"), "dataset": "fashion_mnist", "seed": seed,
            "target_ratio": target, "git_commit": "0123456789abcdef", "config": cfg,
            "lut": {"device": {"name": "AMD EPYC", "kind": "cpu"}, "setting": {"backend": "torch", "batch": 32, "threads": 1}},
            "dense": {"top1": 91.0 + NOISE[seed], "latency_ms": 24.0, "macs": 1e6, "params": 1000},
            "pruned": {"top1": top1, "latency_ms": 24.0 * target, "macs": 1e6 * macs, "params": 500,
                       "predicted_ms": 12.0, "target_ms": 24.0 * target},
            "budget": {"final_over_target": 0.999}, "wall_seconds": {"total": 100.0, "dense_train": 0.0, "lut": 0.0}}


def write_runs(root: Path) -> dict[str, dict]:
    """A fake reproduction: every page's arms, three seeds, known effects. Returns the re-timings."""
    runs, retimed = {}, {}

    def add(sweep: str, name: str, ratio: float, rec: dict) -> None:
        runs[f"{sweep}/{name}"] = rec
        retimed[f"{sweep}/{name}"] = {"ratio": ratio, "ratios": [ratio], "target": rec["target_ratio"], "job_ratio": ratio}

    effect = {"halp": 0.0, "eagleeye": -0.0, "taylor": +1.0, "magnitude": -2.0}  # vs HALP
    for s in range(3):
        for m, e in effect.items():
            for t in (0.3, 0.5, 0.7):
                jitter = JITTER[s] if m == "eagleeye" else 0.0
                add("main_resnet20", f"{m}-t{t}-s{s}", t * 1.01, record(m, t, s, 85 + 10 * t + NOISE[s] + e + jitter))
        add("ablation_solver", f"greedy-s{s}", 0.5, record("halp", 0.5, s, 90 + NOISE[s] - 0.5, solver="greedy"))
        for sal, e in (("taylor_bn_sq", -0.3), ("l1", -1.0), ("l2", JITTER[s])):
            add("ablation_saliency", f"{sal}-s{s}", 0.5, record("halp", 0.5, s, 90 + NOISE[s] + e, saliency=sal))
        for chunk in ("1", "32"):
            add("ablation_grouping", f"chunk_{chunk}-s{s}", 0.5, record("halp", 0.5, s, 90 + NOISE[s] - 0.4, chunk=chunk))
        for steps in (1, 5, 30):
            add("ablation_steps", f"steps_{steps}-s{s}", 0.5, record("halp", 0.5, s, 90 + NOISE[s] - 1.0 / steps, steps=steps))
        # FLOPs budget: lands at 0.6 of the dense latency, 1 point below the latency curve there
        add("ablation_flops", f"macs-t0.5-s{s}", 0.6, record("halp", 0.5, s, 85 + 10 * 0.6 / 1.01 + NOISE[s] - 1.0, cost="macs"))
        # one-sided pricing misses its target by 8 %, two-sided (main, 0.5 * 1.01) by 1 %
        add("ablation_pricing", f"one_sided-s{s}", 0.54, record("halp", 0.5, s, 90 + NOISE[s], two_sided=False))
    for name, rec in runs.items():
        (root / name).mkdir(parents=True)
        (root / name / "result.json").write_text(json.dumps(rec))
    (root / "remeasured.json").write_text(json.dumps({"format": "halp-remeasure/1", "runs": retimed}))
    return retimed


def test_confidence_interval_and_verdicts_match_hand_computed_values():
    d = np.array([0.9, 1.4, 1.1])
    half = stats.t.ppf(0.975, 2) * d.std(ddof=1) / math.sqrt(3)  # the textbook Student-t interval
    s = Stat.of(d)
    assert s.n == 3 and s.mean == pytest.approx(1.1333333) and s.ci == pytest.approx(half)
    assert decide(s, None)[0] == HOLDS
    assert decide(Stat.of(-d), None)[0] == FAILS
    assert decide(Stat.of([1.0, -0.5, 0.2]), None)[0] == INCONCLUSIVE
    assert decide(Stat.of([1.0]), None)[0] == INCONCLUSIVE  # one seed: no interval, no verdict
    slower = Stat.of([0.05, 0.06, 0.07])
    assert decide(s, slower) == (INCONCLUSIVE, "better, but also significantly slower: not at equal latency")
    a = pd.DataFrame({"seed": [0, 1, 2], "top1": [90.0, 91.0, 92.0]})
    b = pd.DataFrame({"seed": [2, 0, 3], "top1": [91.0, 89.5, 80.0]})
    assert paired(a, b, "top1").to_dict() == {0: 0.5, 2: 1.0}  # matched by seed, unmatched seeds dropped


def test_interpolation_reads_a_curve_and_never_extrapolates():
    curve = pd.DataFrame({"retimed": [0.7, 0.3, 0.5], "top1": [92.0, 88.0, 91.0]})
    assert interpolated(curve, 0.4) == pytest.approx(89.5)
    assert interpolated(curve, 0.6) == pytest.approx(91.5)
    assert math.isnan(interpolated(curve, 0.8)) and math.isnan(interpolated(curve, 0.2))


def test_pages_decide_each_claim_from_its_numbers_and_rebuild_byte_for_byte(tmp_path):
    runs = tmp_path / "runs"
    write_runs(runs)
    out = ROOT / "results" / "_test_paper_pages"  # inside the repo: paths on the pages are relative to it
    try:
        written, results, df = build_paper([runs], out)
        pages = {r.page.key: r for r in results}
        assert set(pages) == {p.key for p in PAGES} - {"main_mobilenetv2"}
        verdicts = {c.text: c.verdict for r in results for c in r.claims}
        main = {c.worse: c for c in pages["main_resnet20"].claims}
        for t in ("30%", "50%", "70%"):
            assert main[f"Magnitude {t}"].verdict == HOLDS and main[f"Magnitude {t}"].delta.mean == pytest.approx(2.0)
            assert main[f"Taylor {t}"].verdict == FAILS
            assert main[f"EagleEye {t}"].verdict == INCONCLUSIVE
        assert verdicts["The exact knapsack prunes to a more accurate network than greedy selection"] == HOLDS
        assert verdicts["BN-Taylor saliency beats the L1 norm"] == HOLDS
        assert verdicts["BN-Taylor saliency beats the L2 norm"] == INCONCLUSIVE
        assert verdicts["30 steps prune better than 1"] == HOLDS
        steps = next(c for c in pages["ablation_steps"].claims if c.text == "30 steps prune better than 10")
        assert steps.delta.mean == pytest.approx(-1 / 30) and steps.verdict == FAILS  # 10 steps: main_resnet20 HALP 50 %
        flops = pages["ablation_flops"].claims[0]
        assert flops.delta.mean == pytest.approx(1.0) and flops.verdict == HOLDS  # interpolated, per seed
        pricing = pages["ablation_pricing"].claims[0]
        assert pricing.delta.mean == pytest.approx(100 * (0.08 - 0.01), abs=1e-6) and pricing.verdict == HOLDS
        text = (out / "main_resnet20.md").read_text()
        assert "| HALP 50% − Magnitude 50% | +2.00 ± 0.00 top-1 points (n = 3) | +0.000 ± 0.000 | **holds** |" in text
        assert str(tmp_path) not in "".join(p.read_text() for p in out.glob("*.md"))
        assert "results/reference/paper_numbers.csv" in text  # the published rows, by repo-relative path
        assert (out / "main_resnet20.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert "halp report --paper results/_test_paper_pages/runs --out results/_test_paper_pages" in (out / "README.md").read_text()
        files = lambda: {p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}  # noqa: E731
        first = files()
        assert len([p for p in first if p.name == "result.json"]) == 69 and Path("runs/remeasured.json") in first
        build_paper([runs], out)
        assert files() == first  # byte for byte
        build_paper([out / "runs"], out)  # from the records kept beside the pages, as committed
        assert files() == first
    finally:
        shutil.rmtree(out, ignore_errors=True)


def test_missing_retiming_is_warned_and_leaves_latency_empty(tmp_path):
    runs = tmp_path / "runs"
    write_runs(runs)
    (runs / "remeasured.json").unlink()
    warnings: list[str] = []
    _, results, df = build_paper([runs], tmp_path / "out", warn=warnings.append)
    assert df["retimed"].isna().all()
    assert any("no re-timed ratio" in w and "halp remeasure" in w for w in warnings)
    assert "| HALP | 50% | 3 (0,1,2) | 90.00 ± 0.43 | – | – |" in (tmp_path / "out" / "main_resnet20.md").read_text()


def test_report_cli_paper_mode_and_its_errors(tmp_path, capsys):
    from halp.cli import main
    runs = tmp_path / "runs"
    write_runs(runs)
    assert main(["report", "--paper", str(runs), "--out", str(tmp_path / "p"), "--no-figures"]) == 0
    assert "main_resnet20: At 30% of the dense latency, HALP is more accurate than EagleEye: inconclusive" in capsys.readouterr().out
    assert not list((tmp_path / "p").glob("*.png"))
    assert main(["report", str(runs), str(runs)]) == 2  # several folders only with --paper
    assert "several only with --paper" in capsys.readouterr().err
    empty = tmp_path / "empty"
    (empty / "x").mkdir(parents=True)
    (empty / "x" / "result.json").write_text(json.dumps(record("halp", 0.5, 0, 90, model="timm:other")))
    assert main(["report", "--paper", str(empty)]) == 2
    assert "no run under" in capsys.readouterr().err


def test_pages_go_to_wandb_and_read_back_offline(tmp_path):
    pytest.importorskip("wandb")
    from wandb_offline import read_offline_image, read_offline_table
    runs = tmp_path / "runs"
    write_runs(runs)
    out = tmp_path / "pages"
    _, results, _ = build_paper([runs], out)
    wb = tmp_path / "wb"
    run_id = log_to_wandb(results, out, LoggerConfig(backend="wandb", mode="offline"), wb)
    assert run_id
    table = read_offline_table(wb, "paper/ablation_solver/table")
    got = {row[table["columns"].index("arm")]: row[table["columns"].index("top1_mean")] for row in table["data"]}
    assert got == pytest.approx({"exact knapsack": 90.0, "greedy": 89.5})
    png = read_offline_image(wb, "paper/main_resnet20/figure")
    assert png == (out / "main_resnet20.png").read_bytes()


def test_remeasure_times_each_run_beside_its_dense_model_and_resumes(tmp_path, monkeypatch, capsys):
    import statistics

    from experiments import remeasure as rm
    from halp.cli import main
    from toy_job import halp_run, overrides
    sweep = tmp_path / "sweep"
    out = halp_run("-m", f"hydra.sweep.dir={sweep}", "method=halp,magnitude", "prune.target=0.5",
                   *overrides(tmp_path), cwd=tmp_path, env={"WANDB_MODE": "disabled"})
    assert out.returncode == 0, out.stderr[-3000:]
    # an interrupted sweep resumes: rerun, the finished job is skipped and the missing one runs
    done = (sweep / "halp-halp_resnet20-t0.5-s0" / "result.json").read_bytes()
    (sweep / "magnitude-halp_resnet20-t0.5-s0" / "result.json").unlink()
    again = halp_run("-m", f"hydra.sweep.dir={sweep}", "method=halp,magnitude", "prune.target=0.5",
                     *overrides(tmp_path), cwd=tmp_path, env={"WANDB_MODE": "disabled"})
    assert again.returncode == 0, again.stderr[-3000:]
    assert (again.stdout + again.stderr).count("already holds this job's result") == 1
    assert (sweep / "halp-halp_resnet20-t0.5-s0" / "result.json").read_bytes() == done
    assert (sweep / "magnitude-halp_resnet20-t0.5-s0" / "result.json").exists()
    timed: list[int] = []
    real = rm.measure

    def spy(backend, runners, protocol):
        timed.append(len(runners))
        return real(backend, runners, protocol)

    monkeypatch.setattr(rm, "measure", spy)
    blob = rm.remeasure(sweep, rounds=2, repeat=2, progress=False)
    names = ["halp-halp_resnet20-t0.5-s0", "magnitude-halp_resnet20-t0.5-s0"]
    assert sorted(blob["runs"]) == names and timed == [2, 2, 2, 2]  # each run: dense + slim, twice
    for name, r in blob["runs"].items():
        rec = json.loads((sweep / name / "result.json").read_text())
        assert r["dense_checkpoint"] == Path(rec["dense"]["checkpoint"]).name  # the dense model it was pruned from
        assert r["ratios"] == pytest.approx([s / d for s, d in zip(r["slim_ms"], r["dense_ms"])])
        assert r["ratio"] == pytest.approx(statistics.median(r["ratios"])) and len(r["ratios"]) == 2
        assert r["slim_id"] == rm.file_id(sweep / name / "slim.pt")
    saved = json.loads((sweep / "remeasured.json").read_text())
    assert saved["runs"] == blob["runs"]
    timed.clear()
    rm.remeasure(sweep, rounds=2, repeat=2, progress=False)
    assert timed == []  # everything already timed: a rerun does nothing
    del saved["runs"][names[0]]  # as if interrupted after the first run
    (sweep / "remeasured.json").write_text(json.dumps(saved))
    assert main(["remeasure", str(sweep), "--rounds", "1", "--repeat", "1", "--no-progress"]) == 0
    assert timed == [2] and names[0] in capsys.readouterr().out
    again = json.loads((sweep / "remeasured.json").read_text())["runs"]
    assert again[names[1]] == saved["runs"][names[1]]  # the finished one was kept as it was
    (sweep / "bad").mkdir()
    (sweep / "bad" / "result.json").write_text("{")
    (sweep / "bad" / "slim.pt").write_bytes(b"")
    warnings: list[str] = []
    rm.remeasure(sweep, rounds=1, repeat=1, progress=False, say=warnings.append)
    assert any("skipping" in w and "bad" in w for w in warnings)
    with pytest.raises(ValueError, match="rounds and repeat"):
        rm.remeasure(sweep, rounds=0)
    with pytest.raises(FileNotFoundError):
        rm.remeasure(tmp_path / "nowhere")


def _sweep(name: str) -> list:
    """The JobConfigs of ``halp-run -m experiment=repro_cpu/<name>``, expanded as Hydra's basic sweeper does."""
    import itertools

    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    import experiments.run  # noqa: F401  (schema and resolvers)
    conf = Path(experiments.run.__file__).resolve().parent / "conf"
    with initialize_config_dir(str(conf), version_base=None):
        hc = compose("main", overrides=[f"experiment=repro_cpu/{name}"], return_hydra_config=True).hydra
        params = {k: str(v).split(",") for k, v in hc.sweeper.params.items()}
        jobs = [OmegaConf.to_object(compose("main", overrides=[f"experiment=repro_cpu/{name}",
                                                               *[f"{k}={v}" for k, v in zip(params, combo)]]))
                for combo in itertools.product(*params.values())]
    return hc.sweep.dir, jobs


def test_every_sweep_preset_lands_on_its_page_and_ablations_pair_with_the_main_runs(tmp_path):
    """The presets and the report agree: each job of repro_cpu/<sweep> is an arm of page <sweep>,
    and the main comparison's HALP-50 % runs are every ablation's default arm."""
    import dataclasses

    from experiments.paper import load_runs
    runs = tmp_path / "runs"
    sizes = {}
    for page in PAGES:
        sweep_dir, jobs = _sweep(page.preset)
        assert sweep_dir == f"runs/repro_cpu/{page.preset}"
        sizes[page.key] = len(jobs)
        for i, cfg in enumerate(jobs):
            assert cfg.cache_dir == "runs/repro_cpu/cache" and cfg.finetune.epochs == 1 and cfg.data.train_subset is None
            rec = record(cfg.method_name, cfg.prune.target, cfg.seed, 90.0, model=cfg.model.name)
            rec["config"] = json.loads(json.dumps(dataclasses.asdict(cfg), default=str))  # as the job writes it
            (runs / page.key / str(i)).mkdir(parents=True)
            (runs / page.key / str(i) / "result.json").write_text(json.dumps(rec))
    assert sizes == {"main_resnet20": 36, "main_mobilenetv2": 36, "ablation_solver": 3, "ablation_saliency": 9,
                     "ablation_grouping": 6, "ablation_steps": 9, "ablation_flops": 6, "ablation_pricing": 3}
    df = load_runs([runs])
    assert sorted(df.loc[df["run"].str.startswith("ablation_steps"), "_config"].map(
        lambda c: (c["prune"]["steps"], c["prune"]["interval"])).unique()) == [(1, 200), (5, 40), (30, 6)]
    main_halp50 = set(df.loc[df["run"].str.startswith("main_resnet20") & (df["method"] == "halp") & (df["target"] == 0.5), "run"])
    assert len(main_halp50) == 3
    for page in PAGES:
        chosen = set(pd.concat([a.runs for a in page.arms(df)])["run"])
        own = set(df.loc[df["run"].str.startswith(page.key + "/"), "run"])
        assert own <= chosen, (page.key, sorted(own - chosen)[:3])  # every job of the sweep is on its page
        extra = chosen - own
        if page.key.startswith("ablation_flops"):
            assert extra == set(df.loc[df["run"].str.startswith("main_resnet20") & (df["method"] == "halp"), "run"])
        elif page.key.startswith("ablation_"):
            assert extra == main_halp50, page.key  # the default arm, trained once
        else:
            assert not extra, page.key


def test_a_sweep_still_running_gives_pages_with_inconclusive_claims(tmp_path):
    runs = tmp_path / "runs"
    write_runs(runs)
    shutil.rmtree(runs / "ablation_solver")  # not started yet
    shutil.rmtree(runs / "ablation_pricing")
    for s in (1, 2):
        shutil.rmtree(runs / "main_resnet20" / f"taylor-t0.5-s{s}")  # one seed finished so far
    _, results, _ = build_paper([runs], tmp_path / "out")
    pages = {r.page.key: r for r in results}
    solver = pages["ablation_solver"].claims[0]  # the exact arm exists (main), greedy does not
    assert (solver.verdict, solver.delta.n) == (INCONCLUSIVE, 0)
    assert "ablation_pricing" in pages and {c.delta.n for c in pages["ablation_pricing"].claims} == {0}
    taylor50 = next(c for c in pages["main_resnet20"].claims if c.worse == "Taylor 50%")
    assert (taylor50.verdict, taylor50.delta.n) == (INCONCLUSIVE, 1)
    assert "| Taylor | 50% | 1 (0) |" in (tmp_path / "out" / "main_resnet20.md").read_text()
    index = (tmp_path / "out" / "README.md").read_text()
    assert "(main_resnet20.md) | Table 1 / Fig. 1 (ResNet-50 on ImageNet: accuracy against latency for each method) | " \
           "1-3 (**incomplete**" in index
    assert "(ablation_solver.md) | the solver ablation (knapsack vs greedy selection) | 3 (**incomplete**" in index
    assert "(ablation_grouping.md) | the latency-aware grouping ablation | 3 | 2 / 0 / 0 |" in index
