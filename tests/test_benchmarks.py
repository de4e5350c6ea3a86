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
    # full fine-tuning at 3 and up to 6 epochs and at the fixed lower rate, LoRA at 3
    assert len(grid) == 5 * variants and len([e for e in experiments if e["stage"] == "headline"]) == 4
    longer = [e for e in experiments if e["stage"] == "evidence"]
    assert longer and all(e["flags"]["epochs"] > 3 and e["learning_rates"] == {"from_task": e["task"]} for e in longer)
    # every strategy the issue names is in the grid, ia3 through the PEFT pass-through
    assert {e["strategy"] for e in grid} == {"full", "lora", "bottleneck", "prefix", "linear_probe", "ia3"}
    # fair budgets: every strategy gets the same epochs, evaluations and patience on a task
    budgets = {(e["task"], e["flags"]["epochs"], e["flags"]["eval_every"], e["flags"]["patience"]) for e in grid}
    assert len(budgets) == 5 and all(epochs >= 3 for _, epochs, _, _ in budgets)
    # the default probe is the one benchmarked: no pooling override (it follows the checkpoint)
    assert all(e["options"] == {} for e in grid if e["strategy"] == "linear_probe")


def test_a_typo_in_an_experiment_file_is_refused(tmp_path):
    (tmp_path / "grid").mkdir()
    exp = make_experiments.experiment("sst2", "lora")
    exp["seed"] = 3
    (tmp_path / "grid" / "x.json").write_text(json.dumps(exp))
    with pytest.raises(run.ConfigError, match=r"x.json=\['seed'\]: missing or unknown keys. Fix: use exactly"):
        run.load_experiments(tmp_path)
    del exp["seed"]
    exp["learning_rates"]["start"] = [0.123]  # not on the ladder: the sweep could never extend from it
    (tmp_path / "grid" / "x.json").write_text(json.dumps(exp))
    with pytest.raises(run.ConfigError, match="is not a valid rate plan"):
        run.load_experiments(tmp_path)


def _record(results: Path, exp: dict, lr: float, seed: int, val: float | None, test: float | None = 0.5,
            **extra) -> None:
    metric = {"stsb": "combined", "cola": "matthews_correlation", "mrpc": "f1"}.get(exp["task"], "accuracy")
    stage = exp["stage"] if exp["stage"] != "grid" else "sweep" if seed == exp["sweep_seed"] else "seeds"
    rec = {"run_id": run.run_id(exp, lr, seed), "stage": stage,
           "task": exp["task"], "variant": exp["variant"], "seed": seed, "learning_rate": lr, "metric": metric,
           "validation_primary": val, "test_primary": test, "smoke": False, "steps": 100,
           "command": ["python", "recipes/classify.py", "--epochs", str(exp["flags"]["epochs"])],
           "trainable_parameters": 10**6 if exp["variant"] == "full" else 1000, "total_parameters": 10**6,
           "adapter_bytes_on_disk": 4000, "peak_rss_bytes": 10**9, "train_seconds": 100.0,
           "recipe_metrics": {"data": ["validation: 575 rows carved from train (0.1, seed 1)"]},
           "load_average": {"start": [2.0]}, **extra}
    path = results / run.RUNS / f"{rec['run_id']}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rec))


def _exp(experiments, name):
    return next(e for e in experiments if e["name"] == name)


def test_sweep_extends_past_an_edge_then_takes_the_smallest_rate_within_one_se(tmp_path):
    experiments = run.load_experiments(BENCH / "experiments")
    exp = _exp(experiments, "stsb__lora")
    start = exp["learning_rates"]["start"]
    assert run.sweep(exp, tmp_path) == {"complete": False, "todo": start}
    assert [r["learning_rate"] for r in run.plan(experiments, tmp_path, "sweep", ["stsb"], ["lora"])] == start
    # seeds 2-3 and the headline wait for the sweep
    assert all(r["blocked"] for r in run.plan(experiments, tmp_path, "seeds", ["stsb"], ["lora"]))
    low, mid, high = start
    _record(tmp_path, exp, low, 1, 0.80)
    _record(tmp_path, exp, mid, 1, 0.50)
    _record(tmp_path, exp, high, 1, float("nan"))  # a constant prediction: the worst score, not a crash
    ladder = exp["learning_rates"]["ladder"]
    below = ladder[ladder.index(low) - 1]
    assert run.sweep(exp, tmp_path) == {"complete": False, "todo": [below]}  # best on the low edge: one rung down
    _record(tmp_path, exp, below, 1, 0.81)
    further = ladder[ladder.index(below) - 1]
    assert run.sweep(exp, tmp_path)["todo"] == [further]
    _record(tmp_path, exp, further, 1, 0.70)
    state = run.sweep(exp, tmp_path)
    # best `below` (0.81) is interior now; `low` (0.80) is within one SE ((1 - 0.81^2) / sqrt(574) = 0.0144) but
    # larger, and the rule takes the smallest rate within reach of the best
    assert state["complete"] and state["best_learning_rate"] == below and state["learning_rate"] == below
    assert state["standard_error"] == pytest.approx((1 - 0.81 ** 2) / 574 ** 0.5)
    assert state["scores"][f"{high:g}"] is None
    rates = run.select_learning_rates(experiments, tmp_path)
    assert rates["stsb"]["lora"]["learning_rate"] == below
    assert json.loads((tmp_path / run.RATES_FILE).read_text())["selected"]["stsb"]["lora"]["scores"][f"{low:g}"] == 0.8
    seeds = run.plan(experiments, tmp_path, "seeds", ["stsb"], ["lora"])
    assert [(r["seed"], r["learning_rate"], r["blocked"]) for r in seeds] == [(2, below, None), (3, below, None)]


def test_a_flat_sweep_climbs_to_the_ladder_s_top_then_learned_nothing_skips_seeds_and_the_default_vote(tmp_path, capsys):
    experiments = run.load_experiments(BENCH / "experiments")
    exp = _exp(experiments, "mrpc__bottleneck_pfeiffer")
    ladder, start = exp["learning_rates"]["ladder"], exp["learning_rates"]["start"]
    majority = 0.8065040650406504  # F1 of always predicting "paraphrase": the same at every rate
    for lr in start:
        _record(tmp_path, exp, lr, 1, majority)
    # the tie-break would call the smallest rate best and go down the ladder; a flat sweep goes up
    above = ladder[ladder.index(start[-1]) + 1]
    assert run.sweep(exp, tmp_path) == {"complete": False, "todo": [above]}
    for lr in ladder[ladder.index(above):]:
        assert run.sweep(exp, tmp_path)["todo"] == [lr]
        _record(tmp_path, exp, lr, 1, majority)
    state = run.sweep(exp, tmp_path)
    assert state["complete"] and state["learned_nothing"] and not state["on_ladder_edge"]
    assert state["learning_rate"] == start[0]  # its seed-1 run stays the cell, so retention counts the failure
    assert [(r["seed"], r["blocked"]) for r in run.plan(experiments, tmp_path, "seeds", ["mrpc"],
                                                        ["bottleneck_pfeiffer"])] == \
        [(2, "not run: the sweep of mrpc__bottleneck_pfeiffer learned nothing at any rate"),
         (3, "not run: the sweep of mrpc__bottleneck_pfeiffer learned nothing at any rate")]
    # --list says so, and bench.sh stops counting those runs as left to do (else it would wait on them forever)
    (tmp_path / "data" / "sst2").mkdir(parents=True)
    (tmp_path / "data" / "sst2" / "train.tsv").write_text("")
    run.main(["--list", "--stage", "seeds", "--tasks", "mrpc", "--variants", "bottleneck_pfeiffer",
              "--results", str(tmp_path), "--data-root", str(tmp_path / "data")])
    listed = capsys.readouterr().out.splitlines()
    assert len(listed) == 2 and all(line.endswith("not run: the sweep of mrpc__bottleneck_pfeiffer learned "
                                                  "nothing at any rate") for line in listed)
    rates = run.select_learning_rates(experiments, tmp_path)
    text = report.render(report.load(tmp_path), tmp_path, {"mrpc": majority})
    assert "Learned nothing at any rate of its ladder (every rate scored the same constant; seeds 2-3 not run): " \
           "bottleneck_pfeiffer." in text
    assert "<br>learned nothing at any rate |" in text  # the sweep table's cell says it too
    # and the count of cells says why two of them will never be recorded
    assert "Not run by the protocol: seeds 2-3 of bottleneck_pfeiffer on mrpc, whose sweep learned nothing" in text
    bottleneck = next(d for d in report.default_rates(rates) if "bottleneck_pfeiffer" in d["variants"])
    assert bottleneck["flat"] == [("mrpc", "bottleneck_pfeiffer")] and bottleneck["everywhere"] == []
    # the only complete sweep ranked no rate, so the default is neither failing nor off the ladder
    assert "| bottleneck | bottleneck_pfeiffer, bottleneck_houlsby | 1 of 10 |" in text
    assert "| none | none | none | no complete sweep that learned yet | mrpc/bottleneck_pfeiffer |" in text
    # once a higher rate learns, it is an ordinary sweep again: best on the top edge, so it keeps climbing
    other = _exp(experiments, "cola__bottleneck_pfeiffer")
    for lr in start:
        _record(tmp_path, other, lr, 1, 0.0)
    _record(tmp_path, other, above, 1, 0.2)
    assert run.sweep(other, tmp_path)["todo"] == [ladder[ladder.index(above) + 1]]


def test_where_no_rate_holds_everywhere_the_report_shows_the_rule_by_data_size_and_says_it_is_not_applied():
    # LoRA as its sweep ran: MRPC (312 steps) learns only at 2e-3, the large tasks hold at 5e-4; RTE (213 steps)
    # holds at every rate. No rate holds on all of them; "2e-3 under 400 steps, 5e-4 otherwise" does.
    def choice(scores, se=0.02):
        best = max(scores, key=scores.get)
        return {"scores": {f"{k:g}": v for k, v in scores.items()}, "best_learning_rate": best,
                "standard_error": se, "barred": [], "learned_nothing": False}
    rates = {"sst2": {"lora": choice({5e-4: 0.876, 1e-3: 0.870, 2e-3: 0.840})},
             "cola": {"lora": choice({5e-4: 0.277, 1e-3: 0.240, 2e-3: 0.100}, se=0.032)},
             "mrpc": {"lora": choice({5e-4: 0.812, 1e-3: 0.814, 2e-3: 0.837})},
             "rte": {"lora": choice({5e-4: 0.558, 1e-3: 0.562, 2e-3: 0.562}, se=0.031)}}
    for t in rates:  # full fine-tuning: one rate that holds on every task
        rates[t]["full"] = choice({5e-5: 0.80, 1e-4: 0.81})
    steps = {"sst2": 585, "cola": 723, "mrpc": 312, "rte": 213}
    assert report.size_groups(steps) == {"small": ["mrpc", "rte"], "large": ["sst2", "cola"]}
    lora = next(d for d in report.default_rates(rates, steps) if d["key"] == "lora")
    assert lora["everywhere"] == [] and lora["by_type"]["classification"] == []
    assert lora["by_size"] == {"small": [2e-3], "large": [5e-4]}
    # the budget comes from the records (max_steps), and the sentence names the rule without applying it
    sweep = [{"task": t, "variant": "lora", "max_steps": n, "learning_rate": 5e-4} for t, n in steps.items()]
    assert report.budget_steps(sweep) == steps
    text = "\n".join(report._defaults(sweep, rates))
    assert "under 400 optimizer steps: mrpc 312, rte 213; the rest: sst2 585, cola 723)" in text
    assert "a rule by data size would, on this sweep (seed 1): lora 0.002 under 400 steps, 0.0005 otherwise." in text
    assert "The recipe does not apply it" in text
    # a default that holds everywhere needs no rule: the sentence leaves it out
    assert "| full | full | 4 of 5 | 0.0001 | 5e-05, 0.0001 |" in text
    assert "full" not in text.split("a rule by data size would")[1].split("\n")[0]


def test_one_se_rule_never_chooses_a_run_that_predicted_one_class_and_such_a_rate_never_holds(tmp_path):
    experiments = run.load_experiments(BENCH / "experiments")
    exp = _exp(experiments, "mrpc__full")
    low, mid, high = exp["learning_rates"]["start"]
    ladder = exp["learning_rates"]["ladder"]
    below = ladder[ladder.index(low) - 1]
    one_class = {"validation": {"f1": 0.8065, "predicted_classes": 1.0}}
    # MRPC as it ran: the smallest rate predicted "paraphrase" for everything (F1 0.8065), within one SE of the best
    for lr, score, extra in ((below, 0.8065, one_class), (low, 0.8146, {}), (mid, 0.8081, {}), (high, 0.8105, {})):
        _record(tmp_path, exp, lr, 1, score, **extra)
    state = run.sweep(exp, tmp_path)
    assert state["best_learning_rate"] == low and 0.8146 - state["standard_error"] < 0.8065
    assert state["learning_rate"] == low and state["constant"] == [f"{below:g}"]
    assert report.holds(state, below) is False and report.holds(state, mid) is True
    # older records carry no predicted_classes; the recipe's list of constant evaluations says it too
    _record(tmp_path, exp, below, 1, 0.8065, best_step=52,
            recipe_metrics={"data": ["validation: 367 rows carved from train (0.1, seed 1)"],
                            "constant_predictions": ["validation at step 52", "test"]})
    assert run.sweep(exp, tmp_path)["learning_rate"] == low
    # where every run is constant the sweep is flat, and the rule has nothing else to pick: it stays as it was
    flat = _exp(experiments, "cola__lora")
    for lr in flat["learning_rates"]["ladder"]:
        _record(tmp_path, flat, lr, 1, 0.0, validation={"predicted_classes": 1.0})
    assert run.sweep(flat, tmp_path)["learning_rate"] == flat["learning_rates"]["start"][0]


def test_one_se_rule_prefers_the_smaller_rate_and_uses_the_metric_s_standard_error(tmp_path):
    experiments = run.load_experiments(BENCH / "experiments")
    exp = _exp(experiments, "sst2__full")
    low, mid, high = exp["learning_rates"]["start"]
    for lr, score in ((low, 0.80), (mid, 0.85), (high, 0.86)):  # best inside? no: high is the top edge
        _record(tmp_path, exp, lr, 1, score)
    ladder = exp["learning_rates"]["ladder"]
    above = ladder[ladder.index(high) + 1]
    assert run.sweep(exp, tmp_path)["todo"] == [above]
    _record(tmp_path, exp, above, 1, 0.70)
    state = run.sweep(exp, tmp_path)
    # binomial SE of 0.86 on 575 rows = 0.0145: mid (0.85) is within it, so the smaller rate is chosen
    assert state["learning_rate"] == mid and state["best_learning_rate"] == high
    assert run.standard_error("accuracy", 0.86, 575) == pytest.approx((0.86 * 0.14 / 575) ** 0.5)
    with pytest.raises(run.ConfigError, match="no standard error formula"):
        run.standard_error("perplexity", 3.0, 100)


def test_headline_takes_the_rate_chosen_on_sst2(tmp_path):
    experiments = run.load_experiments(BENCH / "experiments")
    assert all("no rate chosen for sst2" in r["blocked"] for r in run.plan(experiments, tmp_path, "headline")
               if "low_rate" not in r["id"])
    exp = _exp(experiments, "sst2__lora")
    for lr, score in zip(exp["learning_rates"]["start"], (0.80, 0.86, 0.82)):
        _record(tmp_path, exp, lr, 1, score)
    runs = run.plan(experiments, tmp_path, "headline")
    lora = [r for r in runs if r["experiment"]["variant"] == "lora"]
    # the 3-epoch headline at sst2's chosen rate (the longer budget is full fine-tuning's question alone)
    assert [(r["id"], r["learning_rate"], r["blocked"], r["experiment"]["flags"]["epochs"]) for r in lora] == \
        [("sst2_glue__lora__lr0.001__seed1", exp["learning_rates"]["start"][1], None, 3)]
    # full fine-tuning (3 epochs and the longer 6) waits for its sweep, except the run at the fixed lower rate
    full = {r["id"]: r["blocked"] for r in runs if r["experiment"]["variant"] == "full"}
    assert full.pop("sst2_glue__full__low_rate__lr2e-05__seed1") is None
    assert len(full) == 2 and all(full.values())
    assert {r["experiment"]["flags"]["epochs"] for r in runs if r["experiment"]["variant"] == "full"} == {3, 6}


def test_a_fixed_rate_plan_must_be_a_positive_float(tmp_path):
    exp = json.loads((BENCH / "experiments" / "headline" / "sst2_glue__full__low_rate.json").read_text())
    (tmp_path / "headline").mkdir()
    for bad in ({"rate": 0.0}, {"rate": "2e-5"}, {"rate": 2e-5, "from_task": "sst2"}):
        (tmp_path / "headline" / "sst2_glue__full__low_rate.json").write_text(json.dumps({**exp, "learning_rates": bad}))
        with pytest.raises(run.ConfigError, match="learning_rates"):
            run.load_experiments(tmp_path)


def test_evidence_runs_at_the_sweep_s_best_rate_not_the_one_se_choice(tmp_path):
    experiments = run.load_experiments(BENCH / "experiments")
    exp = _exp(experiments, "mrpc__full")
    ladder = exp["learning_rates"]["ladder"]
    scores = {ladder[0]: 0.806, ladder[1]: 0.815, ladder[2]: 0.808, ladder[3]: 0.811}  # level: majority class
    for lr, score in scores.items():
        _record(tmp_path, exp, lr, 1, score)
    state = run.sweep(exp, tmp_path)
    assert state["learning_rate"] == ladder[0] and state["best_learning_rate"] == ladder[1]
    longer = run.plan(experiments, tmp_path, "evidence", ["mrpc"])
    assert [(r["learning_rate"], r["blocked"]) for r in longer] == [(ladder[1], None)]


def test_two_runners_never_take_the_same_run_and_a_dead_runner_s_claim_is_freed(tmp_path):
    first = run.claim(tmp_path, "x")
    assert first is not None and run.claim(tmp_path, "x") is None  # held by this (live) process
    first.write_text(f"{__import__('os').uname().nodename} 999999999\n")  # a pid that cannot be alive
    again = run.claim(tmp_path, "x")
    assert again is not None and again.read_text().split()[1] == str(__import__("os").getpid())


def test_command_renders_flags_options_and_smoke_budget(tmp_path):
    experiments = run.load_experiments(BENCH / "experiments")
    exp = _exp(experiments, "rte__bottleneck_houlsby")
    r = {"experiment": exp, "learning_rate": 1e-3, "seed": 2}
    cmd = run.command(r, Path("/data"), tmp_path, "python", Path("classify.py"), smoke=False)
    text = " ".join(cmd)
    assert "--data /data/rte/train.tsv --test-file /data/rte/dev.tsv --strategy bottleneck" in text
    assert '--option variant="houlsby"' in text and "--group-by-length" in text and "--epochs 3" in text
    assert "--patience 2" in text and f"--eval-every {-(-71 // 2)}" in text  # ceil(0.9 * 2490 / 32) = 71 steps
    assert "--learning-rate 0.001 --seed 2" in text
    smoke = " ".join(run.command(r, Path("/data"), tmp_path, "python", Path("classify.py"), smoke=True))
    assert "--max-steps 10" in smoke and "--max-train-samples 320" in smoke


def test_step_times_come_from_the_recipe_log(tmp_path):
    log = tmp_path / "log.jsonl"
    lines = [{"step": 1, "loss": 0.7, "train_seconds": 0.5}, {"step": 2, "loss": 0.6, "train_seconds": 0.9},
             {"step": 2, "validation": {"accuracy": 0.5}}, {"step": 4, "loss": 0.5, "train_seconds": 1.9}]
    log.write_text("\n".join(json.dumps(x) for x in lines))
    assert run.step_times(log) == pytest.approx([0.4, 0.5])


def _cell(results, experiments, name, lr, seeds_scores, val=0.8, **extra):
    exp = _exp(experiments, name)
    for seed, score in seeds_scores:
        _record(results, exp, lr, seed, val if seed == 1 else None, score, **extra)


def _sweep_around(results, experiments, name, chosen_score=0.85):
    """A complete sweep whose middle start rate wins clearly; returns that rate."""
    exp = _exp(experiments, name)
    low, mid, high = exp["learning_rates"]["start"]
    for lr, val in ((low, chosen_score - 0.2), (mid, chosen_score), (high, chosen_score - 0.2)):
        _record(results, exp, lr, 1, val, 0.5)
    return mid


def test_report_prints_cells_retention_learned_tasks_headline_and_defaults(tmp_path):
    experiments = run.load_experiments(BENCH / "experiments")
    for name in ("sst2__full", "sst2__lora", "stsb__full", "stsb__lora"):
        _sweep_around(tmp_path, experiments, name)
    run.select_learning_rates(experiments, tmp_path)
    rate = lambda n: _exp(experiments, n)["learning_rates"]["start"][1]  # noqa: E731
    _cell(tmp_path, experiments, "sst2__full", rate("sst2__full"), ((1, 0.90), (2, 0.92), (3, 0.91)))
    _cell(tmp_path, experiments, "sst2__lora", rate("sst2__lora"), ((1, 0.89), (2, 0.90), (3, 0.95)))
    _cell(tmp_path, experiments, "stsb__full", rate("stsb__full"), ((1, 0.85), (2, 0.86), (3, 0.84)))
    _cell(tmp_path, experiments, "stsb__lora", rate("stsb__lora"), ((1, None), (2, 0.10), (3, 0.12)))
    head = _exp(experiments, "sst2_glue__full")
    _record(tmp_path, head, rate("sst2__full"), 1, 0.93, 0.895, epochs=3.0)
    _record(tmp_path, _exp(experiments, "sst2_glue__full__long"), rate("sst2__full"), 1, 0.95, 0.905, epochs=4.5)
    _record(tmp_path, _exp(experiments, "sst2_glue__full__low_rate"), 2e-5, 1, 0.94, 0.901, epochs=3.0)
    _record(tmp_path, _exp(experiments, "mrpc__full__long"), 2e-5, 1, 0.81, 0.83, epochs=7.5, stopped_early=True)
    data = report.load(tmp_path)
    assert len(data["evidence"]) == 1 and len(data["grid"]) == 12 and len(data["headline"]) == 3 and len(data["sweep"]) == 12
    text = report.render(data, tmp_path, {"sst2": 0.509})
    assert "| full | 0.910 [0.900–0.920] (n=3) | 0.850 [0.840–0.860] (n=3) |" in text
    # a constant prediction (NaN) is shown and ranks as the worst seed, not dropped
    assert "| lora | 0.900 [0.890–0.950] (n=3) | 0.100 [0.100–0.120] (n=3; 1 constant) |" in text
    assert "| lora | ≥ 1.00 | 0.989 | 0.118 | 0.553 | 0 of 2 |" in text  # 0.90/0.91; 0.10/0.85
    assert "Full fine-tuning learned: sst2, stsb." in text
    # no baseline given for mrpc here; no dev accuracy in the record; the published accuracy beside it
    assert "| mrpc | 2e-05 | f1 0.830 | 0.050 | – | 0.866 | 0.810 | 7.5 | yes |" in text
    assert "microsoft/xtremedistil-l6-h384-uncased" in text
    # the 3-epoch headline and the longer one, each with its own verdict against the goal
    full_rate = f"{rate('sst2__full'):g}"
    assert f"Full fine-tuning on sst2_glue, at most 3 epochs at {full_rate}: 0.895 (goal ≥ 0.90" in text
    assert "misses the goal" in text
    assert f"Full fine-tuning on sst2_glue, at most 6 epochs at {full_rate}: 0.905 (goal ≥ 0.90" in text
    assert "meets the goal" in text
    assert f"| full | 6 | {full_rate} (chosen on sst2) | 0.905 | 0.950 | 4.50 |" in text
    # the fixed-rate run says so, and follows the chosen-rate run of its budget
    assert text.index(f"| full | 3 | {full_rate} (chosen on sst2) |") < text.index("| full | 3 | 2e-05 (fixed) | 0.901 |")
    assert "headline runs: 3 of 4." in text
    assert "Learned (almost) nothing at its chosen rate: lora." in text  # STS-B paragraph
    assert "some seeds learned (almost) nothing" not in text  # said once, as the median's verdict
    assert "**sst2** (accuracy on dev" in text and "**stsb** (combined on dev" in text
    # defaults: the sweep's chosen rates against DEFAULT_LR, per task type
    assert "## The recipe's default learning rates against the sweep" in text
    lora_row = next(line for line in text.splitlines() if line.startswith("| lora | lora |"))
    assert f"| {rate('sst2__lora'):g} |" in lora_row
    made = report.plots(data["grid"], tmp_path, {"sst2": 0.509})
    assert [p.name for p in made] == ["pareto.png"] and made[0].stat().st_size > 1000
    points = {p["variant"]: p for p in report.pareto_points(data["grid"], {"sst2": 0.509})}
    assert points["full"]["retention"] == 1.0 and points["full"]["pareto"] and points["lora"]["pareto"]


def test_majority_class_row_uses_train_majority_on_dev(tmp_path):
    for task, train, dev in (("cola", "1 1 0", "1 0 0 0"), ("mrpc", "1 1 0", "1 0 0 1")):
        (tmp_path / task).mkdir()
        for name, labels in (("train", train), ("dev", dev)):
            rows = [f'he said "hi\t{y}' for y in labels.split()]  # a stray quote must not swallow rows
            (tmp_path / task / f"{name}.tsv").write_text("sentence\tlabel\n" + "\n".join(rows) + "\n")
    base = report.majority_baselines(tmp_path, ["cola", "mrpc", "stsb"])
    assert base == {"cola": 0.0, "mrpc": pytest.approx(2 * 0.5 / 1.5)}  # all "1": precision 0.5, recall 1
    assert report.learned_bar("cola", base) == 0.25 and report.learned_bar("mrpc", base) == pytest.approx(0.7167, 1e-3)


def test_a_task_full_fine_tuning_did_not_learn_names_the_evidence_run_and_the_published_figure():
    grid = [{"task": "mrpc", "metric": "f1", "variant": "full", "seed": 1, "trainable_parameters": 10**6,
             "steps": 100, "train_seconds": 100.0, "test_primary": 0.812}]
    evidence = [{"task": "mrpc", "test_primary": 0.841, "test": {"accuracy": 0.762, "f1": 0.841}}]
    words = " ".join(report.paragraphs({("full", "mrpc"): [0.812]}, ["mrpc"], ["full"], {"mrpc": 0.812}, set(), grid,
                                       {}, evidence))
    assert "under the 0.86 that counts as learned" in words
    assert ("With up to 10 epochs (the evidence run below) it reaches 0.841, still under that bar; MiniLM-L6-H384 as "
            "published reaches accuracy 0.866 (this run: 0.762).") in words


def test_a_seed_that_collapsed_is_named_even_when_the_median_learned():
    grid = [{"task": "stsb", "metric": "combined", "variant": v, "seed": 1, "trainable_parameters": n,
             "steps": 100, "train_seconds": 100.0, "test_primary": 0.85} for v, n in (("full", 10**6), ("lora", 10**4))]
    scores = {("full", "stsb"): [0.85, 0.86, 0.84], ("lora", "stsb"): [0.85, 0.05, 0.84]}
    words = " ".join(report.paragraphs(scores, ["stsb"], ["full", "lora"], {}, {"stsb"}, grid, {}))
    assert "The best median is full's 0.850." in words
    assert "At the same rate, some seeds learned (almost) nothing: lora (1 of 3)." in words
    assert "at its chosen rate: lora" not in words


def test_a_task_is_provisional_until_its_seeds_land_but_a_sweep_that_learned_nothing_does_not_keep_it_open():
    grid = [{"task": "cola", "metric": "matthews_correlation", "variant": v, "seed": 1, "trainable_parameters": n,
             "steps": 100, "train_seconds": 100.0, "test_primary": 0.2}
            for v, n in (("full", 10**6), ("prefix", 10**4))]
    flat = {"cola": {"prefix": {"learned_nothing": True}}}

    def opening(full_seeds, rates):
        scores = {("full", "cola"): [0.27] * full_seeds, ("prefix", "cola"): [0.0]}
        return report.paragraphs(scores, ["cola"], ["full", "prefix"], {"cola": 0.0}, {"cola"}, grid, rates)[0]

    complete = "(matthews_correlation on dev; 3 seeds per cell, 1 where the sweep learned nothing; 2 of 7"
    assert complete in opening(3, flat)
    assert "provisional" not in opening(3, flat)
    assert "2 of 3 seeds per cell so far, so read it as provisional" in opening(2, flat)
    # a one-seed cell whose sweep did learn is still missing two seeds
    assert "1-3 of 3 seeds per cell so far, so read it as provisional" in opening(3, {})


def test_ratio_runs_name_their_cpu_since_a_ratio_moves_with_the_host(tmp_path):
    row = {"name": "throughput lora / full (e2e step)", "measured": "1.274x (95% CI 1.203–1.297, n=25)",
           "goal": "≥ 1.4x", "meets": False}
    latest = {"benchmark": "strategies", "rows": [row], "conditions": "1 threads, 1-min load 0.1 at start, 1.0 at end",
              "machine": {"cpu": "AMD EPYC"}}
    older = {"benchmark": "strategies", "conditions": "1 threads, 1-min load 1.5 at start, 3.0 at end",
             "cpu": "Intel(R) Xeon(R) Processor", "rows": [dict(row, measured="1.428x (95% CI 1.351–1.679, n=25)")]}
    history = tmp_path / "history.jsonl"
    history.write_text("".join(json.dumps(e) + "\n" for e in (older, dict(latest, cpu="AMD EPYC"))))
    text = "\n".join(report._ratios([latest], history))
    assert "| ≥ 1.4x | no | AMD EPYC, 1 threads, 1-min load 0.1 at start, 1.0 at end |" in text
    assert ("| 1.428x (Intel(R) Xeon(R) Processor, 1 threads, 1-min load 1.5 at start, 3.0 at end); "
            "1.274x (AMD EPYC, 1 threads, 1-min load 0.1 at start, 1.0 at end) | ≥ 1.4x |") in text


def test_a_damaged_record_is_named_with_the_fix_by_the_runner_and_the_report(tmp_path):
    experiments = run.load_experiments(BENCH / "experiments")
    exp = _exp(experiments, "rte__lora")
    _record(tmp_path, exp, exp["learning_rates"]["start"][0], 1, 0.6)
    damaged = tmp_path / run.RUNS / f"{run.run_id(exp, exp['learning_rates']['start'][1], 1)}.json"
    damaged.write_text('{"run_id": "rte__lora", "validation_primary": 0.6')  # cut short, as by a hand edit
    for read in (lambda: run.sweep(exp, tmp_path), lambda: report.load(tmp_path)):
        with pytest.raises(run.ConfigError) as err:
            read()
        message = str(err.value)
        assert str(damaged) in message and "is not valid JSON" in message and "line 1" in message
        assert f"git checkout -- {damaged}" in message
    assert damaged.read_text().startswith('{"run_id"')  # named, never deleted


# ---- the learning curve and the recommend validation ------------------------------------------------------------
import learning_curve  # noqa: E402
import validate_recommend  # noqa: E402


def test_learning_curve_runs_the_smallest_size_first_then_the_cheapest_strategy_at_the_sweep_s_rate():
    runs = learning_curve.plan([4000, 250, 67349], [1, 2], learning_curve.VARIANTS)
    assert [r["train_examples"] for r in runs] == [250] * 10 + [4000] * 10 + [67349] * 10
    assert [r["experiment"]["variant"] for r in runs[:5]] == ["linear_probe", "prefix", "bottleneck_pfeiffer", "lora",
                                                               "full"]
    chosen = json.loads((BENCH / "results" / "learning_rates.json").read_text())["selected"]["sst2"]
    first, big = runs[0], runs[-1]
    assert first["learning_rate"] == chosen["linear_probe"]["learning_rate"]
    assert first["experiment"]["flags"]["max_train_samples"] == 250 and first["experiment"]["flags"]["max_steps"] == 60
    assert first["experiment"]["flags"]["feature_cache"] == "eval" and first["experiment"]["train_file"] == "sst2/train.tsv"
    assert "max_train_samples" not in big["experiment"]["flags"] and big["experiment"]["train_file"] == "sst2_glue/train.tsv"
    assert len({r["id"] for r in runs}) == len(runs)


def test_learning_curve_refuses_to_record_a_run_that_is_not_sane():
    run_ = {"train_examples": 250}
    assert learning_curve.sane({"test_primary": 0.7, "steps": 60, "stopped_early": False}, run_) is None
    assert learning_curve.sane({"test_primary": 0.7, "steps": 30, "stopped_early": True}, run_) is None
    assert learning_curve.sane({"test_primary": float("nan"), "steps": 60}, run_) == "dev score nan"
    assert learning_curve.sane({"test_primary": 0.7, "steps": 30, "stopped_early": False}, run_) == \
        "30 steps, planned 60, not stopped early"


def test_a_learning_curve_run_that_fails_is_logged_and_left_unrecorded(tmp_path, monkeypatch):
    # a refactor landing mid-run (or a venv being upgraded) makes the recipe fail: log it, record nothing
    monkeypatch.setenv("PYTHONPATH", "")  # main() points it at its snapshot; restored after the test
    argv = ["--sizes", "250", "--seeds", "99", "--variants", "linear_probe", "--python", "/bin/false", "--attempts", "1",
            "--retry-wait", "0", "--work", str(tmp_path / "work"), "--snapshot", str(tmp_path / "snap")]
    assert learning_curve.main(argv) == 0
    log = (tmp_path / "work" / "learning_curve.log").read_text()
    assert "FAILED lc_sst2_250__linear_probe__lr0.003__seed99 (attempt 1)" in log and "gave up on" in log
    assert not list((learning_curve.RESULTS / "records").glob("*seed99.json"))


def test_recommend_validation_leaves_a_task_out_whole_and_judges_it_on_its_grid_cells():
    def cell(task, data, n, strategy, where):
        return {"task": task, "data": data, "train_examples": n, "strategy": strategy,
                "records": [f"benchmarks/results/{where}/{task}_{n}_{strategy}.json"]}
    cells = [cell("sst2", "sst2", 6228, "full", "records"), cell("sst2", "sst2", 250, "full", "learning_curve/records"),
             cell("cola", "cola", 7695, "full", "records")]
    sets = {label: (held, rest) for label, held, rest in validate_recommend.held_out_sets(cells)}
    held, rest = sets["sst2"]
    assert held == [cells[0]] and rest == [cells[2]]  # the curve's sst2 cells are left out with sst2, not judged
    held, rest = sets["sst2 curve n=250"]
    assert held == [cells[1]] and rest == [cells[0], cells[2]]


def test_the_kit_line_accounting_places_every_definition(capsys):
    # benchmarks/kit_lines.py backs issue 27's line argument: its table must add up to the kit's `wc -l`, and a
    # definition nobody placed stops it instead of vanishing from the table.
    import kit_lines
    kit_lines.main()
    table = capsys.readouterr().out.splitlines()[2:]  # below the header
    rows = {k.strip(): int(n) for k, n in (line.strip("|").rsplit("|", 1) for line in table)}
    total = sum(len(f.read_text().splitlines()) for f in kit_lines.KIT.glob("*.py"))
    assert rows.pop("total") == total == sum(rows.values())
