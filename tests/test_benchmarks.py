"""The benchmark runner and report as code: experiment files, planning, learning-rate selection, report.

No model runs here (seconds). The runner's real end-to-end check is `python benchmarks/run.py --smoke`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))

import make_experiments  # noqa: E402
import report  # noqa: E402
import run  # noqa: E402


def test_committed_experiments_match_the_declared_table_and_load():
    assert make_experiments.main(["--check"]) == 0
    experiments = run.load_experiments(BENCH / "experiments")
    grid = [e for e in experiments if e["stage"] == "grid"]
    variants = len(make_experiments.VARIANTS)
    assert variants >= 8 and len(grid) == 5 * variants and len(experiments) == 5 * variants + variants
    # every strategy the issue names is in the grid, ia3 through the PEFT pass-through
    assert {e["strategy"] for e in grid} == {"full", "lora", "bottleneck", "prefix", "linear_probe", "ia3"}
    # fair budgets: every strategy gets the same steps on a task
    steps = {(e["task"], e["flags"]["max_steps"]) for e in grid}
    assert len(steps) == 5


def test_a_typo_in_an_experiment_file_is_refused(tmp_path):
    (tmp_path / "grid").mkdir()
    exp = make_experiments.experiment("grid", "sst2", "lora")
    exp["seed"] = 3
    (tmp_path / "grid" / "x.json").write_text(json.dumps(exp))
    with pytest.raises(run.ConfigError, match=r"x.json=\['seed'\]: missing or unknown keys. Fix: use exactly"):
        run.load_experiments(tmp_path)


def _sweep_record(results: Path, exp: dict, lr: float, score: float) -> None:
    path = results / "lr_sweep" / f"{run.run_id(exp, lr, 0)}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"validation_primary": score, "metric": "accuracy", "test_primary": 0.0,
                                "recipe_metrics": {"data": ["validation: 692 rows carved from train (0.1, seed 0)"]}}))


def test_grid_waits_for_the_sweep_then_uses_the_best_validation_rate(tmp_path):
    experiments = run.load_experiments(BENCH / "experiments")
    sweep = next(e for e in experiments if e["stage"] == "lr_sweep" and e["variant"] == "lora")
    blocked = run.plan(experiments, {}, ("grid",), ["sst2"], ["lora"], [1], smoke=False)
    assert blocked and all("no learning rate selected" in r["blocked"] for r in blocked)
    low, mid, high = sweep["learning_rates"][:3]
    for lr in sweep["learning_rates"][3:]:
        _sweep_record(tmp_path, sweep, lr, 0.70)
    for lr, score in ((low, 0.80), (mid, 0.85)):
        _sweep_record(tmp_path, sweep, lr, score)
    assert "lora" not in run.select_learning_rates(experiments, tmp_path)  # incomplete sweep: nothing chosen
    _sweep_record(tmp_path, sweep, high, 0.86)  # best, but mid is within one SE (sqrt(.86 * .14 / 692) = 0.0132)
    rates = run.select_learning_rates(experiments, tmp_path)
    assert rates["lora"]["learning_rate"] == mid and rates["lora"]["best_learning_rate"] == high
    assert rates["lora"]["standard_error"] == pytest.approx(0.0132, abs=1e-4)
    assert json.loads((tmp_path / run.RATES_FILE).read_text())["selected"]["lora"]["scores"][f"{high:g}"] == 0.86
    _sweep_record(tmp_path, sweep, high, 0.87)  # now 2 points clear of mid: more than one SE, the best is taken
    assert run.select_learning_rates(experiments, tmp_path)["lora"]["learning_rate"] == high
    _sweep_record(tmp_path, sweep, high, 0.85)  # a tie: the smaller rate wins
    rates = run.select_learning_rates(experiments, tmp_path)
    runs = run.plan(experiments, rates, ("grid",), None, ["lora"], None, smoke=False)
    assert [r["seed"] for r in runs] == sorted(r["seed"] for r in runs) and len(runs) == 15  # seed by seed
    assert all(r["learning_rate"] == mid and not r["blocked"] for r in runs)


def test_command_renders_flags_options_and_smoke_budget(tmp_path):
    experiments = run.load_experiments(BENCH / "experiments")
    exp = next(e for e in experiments if e["name"] == "rte__bottleneck_houlsby" and e["stage"] == "grid")
    r = {"experiment": exp, "learning_rate": 1e-3, "seed": 2}
    cmd = run.command(r, Path("/data"), tmp_path, "python", Path("classify.py"), smoke=False)
    text = " ".join(cmd)
    assert "--data /data/rte/train.tsv --test-file /data/rte/dev.tsv --strategy bottleneck" in text
    assert '--option variant="houlsby"' in text and "--group-by-length" in text and "--max-steps 100" in text
    assert "--learning-rate 0.001 --seed 2" in text
    smoke = " ".join(run.command(r, Path("/data"), tmp_path, "python", Path("classify.py"), smoke=True))
    assert "--max-steps 10" in smoke and "--max-train-samples 320" in smoke


def test_step_times_come_from_the_recipe_log(tmp_path):
    log = tmp_path / "log.jsonl"
    lines = [{"step": 1, "loss": 0.7, "train_seconds": 0.5}, {"step": 2, "loss": 0.6, "train_seconds": 0.9},
             {"step": 2, "validation": {"accuracy": 0.5}}, {"step": 4, "loss": 0.5, "train_seconds": 1.9}]
    log.write_text("\n".join(json.dumps(x) for x in lines))
    assert run.step_times(log) == pytest.approx([0.4, 0.5])


def _grid_record(task: str, variant: str, seed: int, score: float) -> dict:
    return {"task": task, "variant": variant, "seed": seed, "metric": "accuracy", "test_primary": score,
            "learning_rate": 1e-3, "smoke": False, "trainable_parameters": 1000 if variant != "full" else 10**6,
            "total_parameters": 10**6, "adapter_bytes_on_disk": 4000, "peak_rss_bytes": 10**9,
            "median_step_seconds": 0.5, "samples_per_second": 64.0, "train_seconds": 100.0,
            "recipe_metrics": {"max_steps": 250}, "load_average": {"start": [2.0]}}


def test_report_prints_medians_ranges_retention_and_goals(tmp_path):
    grid = [_grid_record("sst2", "full", s, x) for s, x in ((1, 0.90), (2, 0.92), (3, 0.91))]
    grid += [_grid_record("sst2", "lora", s, x) for s, x in ((1, 0.89), (2, 0.90), (3, 0.95))]
    text = report.render(grid, {}, [], tmp_path)
    assert "| full | 0.910 [0.900–0.920] (n=3) |" in text
    assert "| lora | ≥ 1.00 | 0.989 | 0.989 | 0 of 1 |" in text  # 0.90 / 0.91
    assert "Full fine-tuning on SST-2: 0.910 (goal ≥ 0.90" in text and f"Runs recorded: 6 of {5 * len(make_experiments.VARIANTS) * 3}" in text
    made = report.plots(grid, tmp_path)
    assert [p.name for p in made] == ["quality_vs_params.png", "cost.png"] and all(p.stat().st_size for p in made)


def test_majority_class_row_uses_train_majority_on_dev(tmp_path):
    for task, train, dev in (("cola", "1 1 0", "1 0 0 0"), ("mrpc", "1 1 0", "1 0 0 1")):
        (tmp_path / task).mkdir()
        for name, labels in (("train", train), ("dev", dev)):
            rows = [f'he said "hi\t{y}' for y in labels.split()]  # a stray quote must not swallow rows
            (tmp_path / task / f"{name}.tsv").write_text("sentence\tlabel\n" + "\n".join(rows) + "\n")
    base = report.majority_baselines(tmp_path, ["cola", "mrpc", "stsb"])
    assert base == {"cola": 0.0, "mrpc": pytest.approx(2 * 0.5 / 1.5)}  # all "1": precision 0.5, recall 1
    grid = [_grid_record("cola", "full", 1, 0.2)]
    assert "| *majority class of train, predicted for every dev example* | *0.000* |" in report.render(
        grid, {}, [], tmp_path, base)
