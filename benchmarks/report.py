"""Turn recorded benchmark runs into benchmarks/results/REPORT.md and its Pareto plot (pareto.png).

    python benchmarks/report.py                              # benchmarks/results/ -> REPORT.md + pareto.png
    python benchmarks/report.py --results benchmarks/results/smoke

Reads results/records/*.json (the runs; a cell counts the runs at the rate its sweep chose, see
results/learning_rates.json) and results/ratios/*.json. Every number printed comes from those files, and
so do the words of the per-task paragraphs; a missing run shows as a gap and the header says how many of
the planned runs are there. The goals the results are held against are printed beside them.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_experiments import EPOCHS, EVIDENCE, HEADLINE, SEEDS, VARIANTS, all_experiments  # noqa: E402
from run import RATES_FILE, RUNS, read_json  # noqa: E402

HERE = Path(__file__).resolve().parent
TASKS = list(EPOCHS)
# Accuracy retention relative to full fine-tuning (median over seeds); held per task and over tasks.
RETENTION_GOALS = {"lora": 1.00, "bottleneck_pfeiffer": 1.00, "bottleneck_houlsby": 1.00, "prefix": 0.97,
                   "linear_probe": 0.93}
FULL_SST2_GOAL, FULL_SST2_PUBLISHED = 0.90, 0.915  # published all-MiniLM-L6 full fine-tuning on SST-2 dev: 91.5
# GLUE dev accuracy of MiniLM-L6-H384-uncased (the distilled model all-MiniLM-L6-v2 was trained from), fine-tuned per
# task, as its authors publish it: the table "results on GLUE dev set" of the model card of
# microsoft/xtremedistil-l6-h384-uncased (row "MiniLM | 22 | 5.3x"). MRPC is reported there as accuracy.
PUBLISHED_ACCURACY = {"rte": 0.689, "mrpc": 0.866, "sst2": 0.913}
PUBLISHED_SOURCE = "https://huggingface.co/microsoft/xtremedistil-l6-h384-uncased (GLUE dev table, row MiniLM 22M)"
# "Learned": full fine-tuning beats the majority class by this much (classification), or reaches these bars
LEARNED_MARGIN, LEARNED_BARS = 0.05, {"cola": 0.25, "stsb": 0.80}
REGRESSION_FLOOR = 0.2  # a correlation below this on STS-B is (near-)constant output, not a weak model
# A rule by data size, asked of the defaults where one rate does not hold on every task: the tasks whose budget is
# under this many optimizer steps against the rest (at batch 32 and 3 epochs: RTE 213, MRPC 312, STS-B 486,
# SST-2 585, CoLA 723; any bar between 312 and 486 splits them alike). Steps, not examples, because a step is
# what moves the weights: a small task gives a rate fewer steps to get anywhere.
SMALL_BUDGET_STEPS = 400
# Which recipe default (adaptkit/recipes/training.py:DEFAULT_LR) each variant runs under
DEFAULT_KEY = {"full": "full", "lora": "lora", "bottleneck_pfeiffer": "bottleneck", "bottleneck_houlsby": "bottleneck",
               "prefix": "prefix", "linear_probe": "linear_probe", "ia3": "ia3"}


# ---- loading -----------------------------------------------------------------------------------------
def load(results: Path) -> dict:
    """Records split into the grid's cells (runs at the chosen rate), the sweep, and the headline."""
    rates = read_json(results / RATES_FILE).get("selected", {}) if (results / RATES_FILE).is_file() else {}
    records = [read_json(p) for p in sorted((results / RUNS).glob("*.json"))]
    smoke = any(r.get("smoke") for r in records)
    chosen = lambda r: rates.get(r["task"], {}).get(r["variant"], {}).get("learning_rate")  # noqa: E731
    grid = [r for r in records if r.get("stage") in ("sweep", "seeds") and (smoke or r["learning_rate"] == chosen(r))]
    sweep = [r for r in records if r.get("stage") == "sweep"]
    headline = [r for r in records if r.get("stage") == "headline"]
    evidence = [r for r in records if r.get("stage") == "evidence"]
    ratios = [read_json(p) for p in sorted((results / "ratios").glob("*.json"))]
    return {"grid": grid, "sweep": sweep, "headline": headline, "evidence": evidence, "rates": rates, "ratios": ratios,
            "history": results / "ratios" / "history.jsonl", "smoke": smoke}


def median_range(values: list[float]) -> str:
    """Median [range] (n): a NaN seed (constant prediction) counts as the worst in the median and is named."""
    if not values:
        return "–"
    finite = [v for v in values if not math.isnan(v)]
    constant = f"; {len(values) - len(finite)} constant" if len(finite) < len(values) else ""
    if not finite:
        return f"NaN (n={len(values)}{constant})"
    if len(values) == 1:
        return f"{values[0]:.3f} (n=1)"
    return f"{_median(values):.3f} [{min(finite):.3f}–{max(finite):.3f}] (n={len(values)}{constant})"


def _f(x: float | None, spec: str = ".3f") -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def _num(x) -> float:
    """A dev score; NaN (a constant prediction has no correlation) stays NaN so it is visible, not dropped."""
    return float("nan") if x is None else float(x)


def quality(grid: list[dict]) -> tuple[dict, list[str], list[str]]:
    scores = defaultdict(list)
    for r in grid:
        scores[(r["variant"], r["task"])].append(_num(r.get("test_primary")))
    tasks = [t for t in TASKS if any(k[1] == t for k in scores)]
    variants = [v for v in VARIANTS if any(k[0] == v for k in scores)]
    return scores, tasks, variants


def _median(values: list[float] | None) -> float | None:
    """Median over seeds, a NaN seed (constant output) ranking as the worst score; NaN when every seed is."""
    if not values:
        return None
    if all(math.isnan(v) for v in values):
        return float("nan")
    return statistics.median([-1.0 if math.isnan(v) else v for v in values])


def retention(scores: dict, variant: str, task: str) -> float | None:
    mine, full = _median(scores.get((variant, task))), _median(scores.get(("full", task)))
    if mine is None or full is None or not full or math.isnan(full) or math.isnan(mine):
        return None
    return mine / full


def majority_baselines(data_root: Path | None, tasks) -> dict[str, float]:
    """Each classification task's primary metric on dev when every example gets train's majority label,
    read and scored by the same adaptkit code the recipe runs used."""
    from adaptkit.recipes import data, metrics
    out = {}
    for task in tasks:
        files = [data_root / task / f"{split}.tsv" for split in ("train", "dev")] if data_root else []
        if not files or not all(f.is_file() for f in files):
            continue
        train = data.read_table(files[0])
        if train.task != "classification":  # a constant prediction has no correlation
            continue
        dev = data.read_table(files[1], num_labels=train.num_labels, label_names=train.label_names)
        majority = max(sorted(set(train.labels)), key=train.labels.count)
        scores = metrics.metric_for_task(task, num_labels=train.num_labels)(predictions=[majority] * len(dev),
                                                                           references=dev.labels)
        out[task] = float(scores[metrics.primary_metric(task)[0]])
    return out


def learned_bar(task: str, baselines: dict[str, float]) -> float:
    """What full fine-tuning must reach on ``task`` to count as having learned it."""
    if task in LEARNED_BARS:
        return LEARNED_BARS[task]
    return baselines.get(task, 0.0) + LEARNED_MARGIN


# ---- the sweep and the defaults ----------------------------------------------------------------------
def sweep_table(sweep: list[dict]) -> dict[tuple[str, str], dict[float, dict]]:
    """(task, variant) -> {rate: record} over the seed-1 sweep runs."""
    out: dict = defaultdict(dict)
    for r in sweep:
        out[(r["task"], r["variant"])][r["learning_rate"]] = r
    return out


def holds(choice: dict, rate: float) -> bool | None:
    """Is ``rate`` within one SE of the best validation score of a complete sweep? ``choice`` is what run.sweep
    wrote to learning_rates.json for it (every score, the best rate, the SE). None: the rate was not run there."""
    scores = choice["scores"]
    if f"{rate:g}" not in scores:
        return None
    best, mine = scores[f"{choice['best_learning_rate']:g}"], scores[f"{rate:g}"]
    if f"{rate:g}" in choice.get("barred", []):
        return False  # predicted one class while the best did not: never a default that holds (run.sweep)
    return best is not None and mine is not None and mine >= best - choice["standard_error"]


def budget_steps(sweep: list[dict]) -> dict[str, int]:
    """Per task, the optimizer steps its budget allows (the sweep records' ``max_steps``; the same for every
    variant, as batch and epochs are)."""
    out: dict[str, int] = {}
    for r in sweep:
        if r.get("max_steps"):
            out[r["task"]] = max(out.get(r["task"], 0), int(r["max_steps"]))
    return out


def size_groups(steps: dict[str, int]) -> dict[str, list[str]]:
    """The tasks under SMALL_BUDGET_STEPS optimizer steps, and the rest (tasks with no record yet in neither)."""
    return {"small": [t for t in TASKS if t in steps and steps[t] < SMALL_BUDGET_STEPS],
            "large": [t for t in TASKS if t in steps and steps[t] >= SMALL_BUDGET_STEPS]}


def default_rates(rates: dict, steps: dict[str, int] | None = None) -> list[dict]:
    """Per recipe default (DEFAULT_LR key): the rates within one SE of the best on every task and variant
    it covers (complete sweeps only); failing one, a rate per task type (classification, regression) and per
    data size (``steps``: each task's budget in optimizer steps; see SMALL_BUDGET_STEPS)."""
    groups = defaultdict(list)
    for v in VARIANTS:
        groups[DEFAULT_KEY[v]].append(v)
    out = []
    for key, variants in groups.items():
        done = {(t, v): rates[t][v] for t in TASKS for v in variants if v in rates.get(t, {})}
        # a flat sweep (every rate scored the same constant) says nothing about which rate is best: left out
        flat = [c for c, choice in done.items() if choice.get("learned_nothing")]
        complete = {c: choice for c, choice in done.items() if c not in flat}
        ladder = sorted({float(lr) for choice in complete.values() for lr in choice["scores"]})
        verdicts = {lr: {c: holds(choice, lr) for c, choice in complete.items()} for lr in ladder}
        everywhere = [lr for lr in ladder if complete and all(verdicts[lr].values())]
        def hold_on(tasks: list[str]) -> list[float]:  # the rates that hold on every complete sweep of these tasks
            sub = [c for c in complete if c[0] in tasks]
            return [lr for lr in ladder if sub and all(verdicts[lr][c] for c in sub)]
        by_type = {"classification": hold_on([t for t in TASKS if t != "stsb"]), "regression": hold_on(["stsb"])}
        by_size = {kind: hold_on(tasks) for kind, tasks in size_groups(steps or {}).items()}
        out.append({"key": key, "variants": variants, "complete": len(done), "flat": flat,
                    "planned": len(TASKS) * len(variants), "everywhere": everywhere, "by_type": by_type,
                    "by_size": by_size, "verdicts": verdicts})
    return out


def _default_fails(d: dict, now: float) -> str:
    """The report's "where the current default fails" cell for one default_rates entry."""
    if not d["complete"]:
        return "no complete sweep yet"
    if not d["verdicts"]:  # every complete sweep learned nothing: no rate was ranked, the default included
        return "no complete sweep that learned yet"
    if now not in d["verdicts"]:
        return "not on the ladder"
    return ", ".join(f"{t}/{v}" for (t, v), ok in d["verdicts"][now].items() if ok is False) or "none"


def current_defaults() -> tuple[dict[str, float], float]:
    """The recipe's DEFAULT_LR, and OTHER_LR: the rate of every PEFT method without its own entry."""
    from adaptkit.recipes import training
    return dict(training.DEFAULT_LR), training.OTHER_LR


# ---- rendering ---------------------------------------------------------------------------------------
def render(data: dict, results: Path, baselines: dict[str, float] | None = None) -> str:
    grid, rates, ratios = data["grid"], data["rates"], data["ratios"]
    baselines = baselines or {}
    scores, tasks, variants = quality(grid)
    metric = {r["task"]: r["metric"] for r in grid + data["sweep"]}
    lines = ["# Strategy benchmark: all-MiniLM-L6-v2 on five GLUE tasks", ""]
    if data["smoke"]:
        lines += ["**SMOKE RUN: a 10-step budget on a few hundred examples. These numbers check the pipeline; they "
                  "say nothing about the strategies.**", ""]
    lines += _conditions(data)
    planned = len(TASKS) * len(VARIANTS) * len(SEEDS)
    flat = [f"{v} on {t}" for t in TASKS for v in VARIANTS if _flat_sweep(rates, t, v)]
    headline_runs = sum(len(e["seeds"]) for e in all_experiments().values() if e["stage"] == "headline")
    lines += [f"Cells: {len(grid)} of {planned} runs recorded ({len(TASKS)} tasks x {len(VARIANTS)} variants x "
              f"{len(SEEDS)} seeds, at the rate each cell's sweep chose); sweep runs recorded: {len(data['sweep'])}; "
              f"headline runs: {len(data['headline'])} of {headline_runs}. "
              + (f"Not run by the protocol: seeds 2-3 of {', '.join(flat)}, whose sweep learned nothing at any rate. "
                 if flat else "")
              + "Missing cells show as –. Protocol: `benchmarks/README.md`.", ""]
    learned = {t for t in tasks if (m := _median(scores.get(("full", t)))) is not None and not math.isnan(m)
               and m >= learned_bar(t, baselines)}
    if grid:
        lines += ["## Which should I pick?", ""] + paragraphs(scores, tasks, variants, baselines, learned, grid, rates,
                                                              data.get("evidence", []))
        lines += ["## Quality on dev (the test set here): median [range] over seeds", "",
                  "| variant | " + " | ".join(f"{t} ({metric[t]})" for t in tasks) + " |",
                  "|---|" + "---:|" * len(tasks)]
        lines += [f"| {v} | " + " | ".join(median_range(scores.get((v, t), [])) for t in tasks) + " |"
                  for v in variants]
        lines += ["| *majority class of train, predicted for every dev example* | "
                  + " | ".join("–" if baselines.get(t) is None else f"*{baselines[t]:.3f}*" for t in tasks) + " |",
                  "| *full fine-tuning counts as learned at* | "
                  + " | ".join(f"*{learned_bar(t, baselines):.3f}*" for t in tasks) + " |",
                  "", "A NaN is a constant prediction (its correlation is undefined); it ranks as the worst score. "
                  f"Full fine-tuning learned: {', '.join(t for t in tasks if t in learned) or 'none yet'}"
                  + (f"; not (yet): {', '.join(t for t in tasks if t not in learned)}" if set(tasks) - learned else "")
                  + ".", ""]
        lines += _retention(scores, tasks, variants, learned)
        lines += _evidence(data.get("evidence", []), baselines)
        lines += _headline(data["headline"], rates)
        lines += ["![quality against trainable memory and training time](pareto.png)", ""]
        lines += _cost(grid, variants)
    lines += _rates(data["sweep"], rates, tasks)
    lines += _defaults(data["sweep"], rates)
    lines += _ratios(ratios, data["history"])
    return "\n".join(lines) + "\n"


def _conditions(data: dict) -> list[str]:
    recs = data["grid"] + data["sweep"] + data["headline"] + data["ratios"]
    if not recs:
        return ["No results recorded yet: run `benchmarks/bench.sh` (README).", ""]
    # a cell's seed-1 run is also a sweep run: count each record once
    runs = list({r["run_id"]: r for r in data["grid"] + data["sweep"] + data["headline"] + data.get("evidence", [])
                 }.values())
    first = recs[0]
    shas = sorted({(r.get("git") or {}).get("sha") or "?" for r in runs})
    dirty = sum(bool((r.get("git") or {}).get("dirty_files")) for r in runs)
    loads = [x for r in runs for x in (r.get("load_average", {}).get("start") or [])[:1]]
    m = first.get("machine", {})
    threads = sorted({str(r.get("threads_env") or "?") for r in runs})
    early = sum(bool(r.get("stopped_early")) for r in runs)
    return [f"Machine: {m.get('cpu')}, {m.get('usable_cores')} usable cores, "
            f"{(m.get('memory_bytes') or 0) / 2**30:.0f} GiB, {m.get('accelerator')}; versions "
            + ", ".join(f"{k} {v}" for k, v in first.get("versions", {}).items()) + ".",
            f"Benchmark commits: {', '.join(s[:10] for s in shas) or '–'}"
            f"{f' ({dirty} records from a tree with uncommitted changes)' if dirty else ''}. 1-minute load average "
            f"when runs started: {min(loads, default=0):.1f}–{max(loads, default=0):.1f}. Threads per run: "
            f"{', '.join(threads)} (two 1-thread runs side by side, one per core): compare times as ratios "
            "within a task.",
            "Budget per task, the same for every strategy: at most "
            + ", ".join(f"{t} {e}" for t, e in EPOCHS.items()) + " epochs; batch 32, at most 128 tokens, "
            "length-grouped dynamic padding, AdamW, linear warm-up 6% then decay, validation every half epoch on "
            "the split carved from train (10%, stratified), early stopping after one epoch without improvement, "
            f"the best evaluation's adapter tested on dev. {early} of {len(runs)} runs stopped early.", ""]


def _flat_sweep(rates: dict, task: str, variant: str) -> bool:
    """The cell's sweep learned nothing at any rate, so the protocol runs no seeds 2-3 for it."""
    return bool(rates.get(task, {}).get(variant, {}).get("learned_nothing"))


def paragraphs(scores, tasks, variants, baselines, learned, grid, rates, evidence=()) -> list[str]:
    """One paragraph per task, in words, written from the numbers (nothing here is typed per task)."""
    out = []
    longer = {r["task"]: r for r in evidence}
    cost = _relative_time(grid)
    for t in tasks:
        full = _median(scores.get(("full", t)))
        metric = next(r["metric"] for r in grid if r["task"] == t)
        ranked = sorted(((v, _median(scores.get((v, t)))) for v in variants if scores.get((v, t))),
                        key=lambda x: -(x[1] if x[1] is not None and not math.isnan(x[1]) else -9))
        best_v, best = ranked[0]
        flat = [v for v in variants if _flat_sweep(rates, t, v)]
        # a cell whose sweep learned nothing never gets seeds 2-3 (the protocol), so it does not keep a task open
        counts = [len(scores.get((v, t), [])) for v, _ in ranked if v not in flat]
        if all(n == len(SEEDS) for n in counts):
            seeds = f"{len(SEEDS)} seeds per cell" + (", 1 where the sweep learned nothing" if flat else "")
        else:
            lo, hi = min(counts), max(counts)
            seeds = (f"{lo}" if lo == hi else f"{lo}-{hi}") + \
                f" of {len(SEEDS)} seeds per cell so far, so read it as provisional"
        words = [f"**{t}** ({metric} on dev; {seeds}; {len(ranked)} of {len(VARIANTS)} variants):"]
        if full is None:
            words.append("full fine-tuning has no runs yet, so nothing is compared to it.")
        elif t not in learned:
            words.append(f"full fine-tuning reaches {_f(full)}, under the {learned_bar(t, baselines):.2f} that counts "
                         "as learned, so retention against it means little here.")
            if t in longer:  # the evidence run: a longer budget, and the published figure beside it
                r, bar = longer[t], learned_bar(t, baselines)
                x, published = r.get("test_primary"), PUBLISHED_ACCURACY.get(t)
                words.append(f"With up to {EVIDENCE['epochs']} epochs (the evidence run below) it reaches {_f(x)}, "
                             + ("over" if x is not None and x >= bar else "still under") + " that bar"
                             + (f"; MiniLM-L6-H384 as published reaches accuracy {published:.3f} (this run: "
                                f"{_f((r.get('test') or {}).get('accuracy'))})" if published else "") + ".")
        else:
            words.append(f"full fine-tuning reaches {_f(full)}"
                         + (f" against {baselines[t]:.3f} for always predicting the majority class" if t in baselines
                            else "") + ".")
        words.append(f"The best median is {best_v}'s {_f(best)}.")
        if full and t in learned:
            near = [v for v, s in ranked if v != "full" and s is not None and not math.isnan(s) and s >= full - 0.01]
            if near:
                cheapest = min(near, key=lambda v: _params(grid, v))
                words.append(f"Within one point of full fine-tuning: {', '.join(near)}; the one that trains the fewest "
                             f"parameters is {cheapest} ({_params(grid, cheapest):,})"
                             + (f", at {cost[(cheapest, t)]:.2f}x full fine-tuning's training time"
                                if (cheapest, t) in cost else "") + ".")
            elif len(ranked) > 1:
                words.append("No parameter-efficient variant comes within one point of full fine-tuning.")
            else:
                words.append("No other variant has a cell here yet.")
        if flat:
            words.append(f"Learned nothing at any rate of its ladder (every rate scored the same constant; seeds 2-3 "
                         f"not run): {', '.join(flat)}.")
        def learned_nothing(s):
            return (s is None or math.isnan(s) or (t in baselines and s <= baselines[t] + 0.01)
                    or (t not in baselines and s < REGRESSION_FLOOR))
        collapsed = [v for v, s in ranked if v not in flat and learned_nothing(s)]
        if collapsed:
            words.append(f"Learned (almost) nothing at its chosen rate: {', '.join(collapsed)}.")
        # a median can hide a seed that collapsed at the same rate: a default that holds on average fails that user
        some = [f"{v} ({sum(map(learned_nothing, scores[(v, t)]))} of {len(scores[(v, t)])})" for v, _ in ranked
                if v not in flat and v not in collapsed and any(map(learned_nothing, scores[(v, t)]))]
        if some:
            words.append(f"At the same rate, some seeds learned (almost) nothing: {', '.join(some)}.")
        edge = [v for v in variants if rates.get(t, {}).get(v, {}).get("on_ladder_edge")]
        if edge:
            words.append(f"The sweep's best rate is on the end of the ladder for {', '.join(edge)}: a wider ladder "
                         "might do better.")
        out += [" ".join(words), ""]
    return out


def _params(grid: list[dict], variant: str) -> int:
    return next(r["trainable_parameters"] for r in grid if r["variant"] == variant)


def _relative_time(grid: list[dict]) -> dict[tuple[str, str], float]:
    """(variant, task) -> median training seconds / full fine-tuning's, per optimizer step (early stopping
    makes runs differ in length; the probe's feature cache counts as training)."""
    per = defaultdict(list)
    for r in grid:
        if r.get("steps"):
            per[(r["variant"], r["task"])].append(_step_cost(r))
    out = {}
    for (v, t), xs in per.items():
        if per.get(("full", t)):
            out[(v, t)] = statistics.median(xs) / statistics.median(per[("full", t)])
    return out


def _step_cost(r: dict) -> float:
    """Seconds per optimizer step: the median step from the run's log (robust to evaluation pauses, and to the
    recipe's train_seconds before commit 026c41c, which dropped the end of each epoch), plus the linear probe's
    feature-cache build spread over its steps (building the cache is training work)."""
    cache = r.get("feature_cache") or {}
    build = (cache.get("cache_seconds") or 0.0) if cache.get("used", True) else 0.0
    step = r.get("median_step_seconds")
    return (step if step and step > 0 else r["train_seconds"] / r["steps"]) + build / r["steps"]


def _retention(scores, tasks, variants, learned) -> list[str]:
    lines = ["## Retention relative to full fine-tuning (median over seeds), against the goals", "",
             "Tasks where full fine-tuning did not learn (the row above) are in parentheses and left out of the "
             f"median over tasks. Counted: {', '.join(t for t in tasks if t in learned) or 'none yet'}.", "",
             "| variant | goal | " + " | ".join(tasks) + " | median over counted tasks | counted tasks meeting the goal |",
             "|---|---:|" + "---:|" * (len(tasks) + 2)]
    for v in variants:
        if v == "full":
            continue
        per_task = [retention(scores, v, t) for t in tasks]
        known = [x for x, t in zip(per_task, tasks) if x is not None and t in learned]
        med = statistics.median(known) if known else None
        goal = RETENTION_GOALS.get(v)
        # per counted task, not only the median: a median hides one task where a strategy collapsed
        verdict = "–" if goal is None or not known else f"{sum(x >= goal for x in known)} of {len(known)}"
        lines.append(f"| {v} | {'≥ %.2f' % goal if goal else '(none)'} | "
                     + " | ".join("–" if x is None else f"{x:.3f}" if t in learned else f"({x:.3f})"
                                  for x, t in zip(per_task, tasks))
                     + f" | {_f(med)} | {verdict} |")
    return lines + [""]


def _evidence(evidence: list[dict], baselines: dict[str, float]) -> list[str]:
    lines = ["## Can MiniLM learn it at all? Full fine-tuning with a longer budget (evidence, not a cell)", ""]
    if not evidence:
        return lines + [f"Planned for {', '.join(EVIDENCE['tasks'])} ({EVIDENCE['epochs']} epochs, at the rate with "
                        "the best validation score in the task's sweep); not run yet.", ""]
    lines += ["| task | rate | dev (task metric) | learned bar | dev accuracy | published accuracy, MiniLM-L6-H384 | "
              "validation | epochs run | stopped early |", "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in evidence:
        published = PUBLISHED_ACCURACY.get(r["task"])
        lines.append(f"| {r['task']} | {r['learning_rate']:g} | {r['metric']} {_f(r.get('test_primary'))} | "
                     f"{learned_bar(r['task'], baselines):.3f} | {_f((r.get('test') or {}).get('accuracy'))} | "
                     f"{_f(published)} | {_f(r.get('validation_primary'))} | "
                     f"{_f(r.get('epochs'), '.1f')} | {'yes' if r.get('stopped_early') else 'no'} |")
    lines += ["", "Published: MiniLM-L6-H384-uncased, the distilled model all-MiniLM-L6-v2 was trained from before its "
              "sentence-embedding training, fine-tuned per task by its authors (their budget, not this one); "
              f"{PUBLISHED_SOURCE}. A run here that stays far under it says what this checkpoint does under this "
              "budget, not what the architecture can learn."]
    return lines + [""]


def _budget(record: dict) -> int:
    """The run's epoch ceiling, read from the command that ran it."""
    command = record["command"]
    return int(command[command.index("--epochs") + 1])


def _headline(headline: list[dict], rates: dict) -> list[str]:
    lines = [f"## Headline: {HEADLINE['task']} (GLUE's 67,349-phrase SST-2 train set), dev accuracy", ""]
    if not headline:
        return lines + ["Not run yet (it waits for the SST-2 sweep of full fine-tuning and LoRA).", ""]
    source = HEADLINE["rates_from"]
    chosen = lambda r: (rates.get(source, {}).get(r["variant"]) or {}).get("learning_rate")  # noqa: E731
    lines += [f"The protocol's budget is 3 epochs at the rate chosen on {source}; the longer one (up to 6, stopping "
              "after 3 without improvement) asks whether the budget stands between full fine-tuning and the goal, "
              "and a fixed lower rate (benchmarks/README.md, \"Protocol\") whether the rate does.", "",
              "| variant | epochs at most | rate | dev accuracy | validation | epochs run | train s |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    ordered = sorted(headline, key=lambda r: (list(VARIANTS).index(r["variant"]), _budget(r), -r["learning_rate"]))
    for r in ordered:
        how = f"chosen on {source}" if r["learning_rate"] == chosen(r) else "fixed"
        lines.append(f"| {r['variant']} | {_budget(r)} | {r['learning_rate']:g} ({how}) | {_f(r.get('test_primary'))} | "
                     f"{_f(r.get('validation_primary'))} | {_f(r.get('epochs'), '.2f')} | {_f(r.get('train_seconds'), ',.0f')} |")
    full = [r for r in ordered if r["variant"] == "full" and r.get("test_primary") is not None]
    if full:
        lines.append("")
    for r in full:
        x = r["test_primary"]
        lines.append(f"Full fine-tuning on {HEADLINE['task']}, at most {_budget(r)} epochs at {r['learning_rate']:g}: "
                     f"{x:.3f} (goal ≥ {FULL_SST2_GOAL:.2f}; published all-MiniLM-L6 full fine-tuning "
                     f"{FULL_SST2_PUBLISHED * 100:.1f}): {'meets' if x >= FULL_SST2_GOAL else 'misses'} the goal.")
    return lines + [""]


def _cost(grid: list[dict], variants: list[str]) -> list[str]:
    rel = _relative_time(grid)
    by_variant = defaultdict(list)
    for r in grid:
        by_variant[r["variant"]].append(r)
    lines = ["## Cost per variant", "",
             "Trainable-state memory is what training adds per trainable parameter in fp32 (weight, gradient and "
             "AdamW's two moments: 16 bytes each). Peak RSS is the whole recipe process (libraries, model, data, "
             "evaluation, the reloaded test model), median over runs; on CPU it includes glibc heap fragmentation, "
             "which can put a variant with smaller tensors above full fine-tuning (docs/benchmarks.md, "
             "\"Peak RSS on CPU is partly the allocator's\"). Training time per step relative to full "
             "fine-tuning, median over tasks (runs went two side by side on one thread each; the interleaved ratio "
             "benchmarks below are the precise speed comparison).", "",
             "| variant | trainable params | % of total | trainable-state memory (MB) | adapter on disk (MB) "
             "| peak RSS (MB) | time per step / full |", "|---|---:|---:|---:|---:|---:|---:|"]
    for v in variants:
        runs = by_variant[v]
        rss = [x["peak_rss_bytes"] for x in runs if x.get("peak_rss_bytes")]
        disk = [x["adapter_bytes_on_disk"] for x in runs if x.get("adapter_bytes_on_disk") is not None]
        times = [rel[(v, t)] for t in TASKS if (v, t) in rel]
        r0 = runs[0]
        lines.append(f"| {v} | {r0['trainable_parameters']:,} | "
                     f"{100 * r0['trainable_parameters'] / r0['total_parameters']:.2f} | "
                     f"{16 * r0['trainable_parameters'] / 1e6:,.1f} | {_f(statistics.median(disk) / 1e6 if disk else None, ',.1f')} "
                     f"| {_f(statistics.median(rss) / 1e6 if rss else None, ',.0f')} "
                     f"| {_f(statistics.median(times) if times else None, '.2f')} |")
    return lines + [""]


def _rates(sweep: list[dict], rates: dict, tasks: list[str]) -> list[str]:
    lines = ["## Learning rates: chosen per task and variant on validation (never on dev)", ""]
    if not sweep:
        return lines + ["No sweep run recorded yet.", ""]
    table = sweep_table(sweep)
    lines += ["Chosen: the smallest rate within one standard error of the best validation score (seed 1), never "
              "one whose run predicted a single class (`constant`) while the best did not. "
              "Bold: chosen; `*`: the best score; `edge`: the best sits on the ladder's end.", "",
              "| variant | " + " | ".join(TASKS) + " |", "|---|" + "---|" * len(TASKS)]
    for v in VARIANTS:
        cells = []
        for t in TASKS:
            runs = table.get((t, v), {})
            choice = rates.get(t, {}).get(v, {})
            parts = []
            for lr in sorted(runs):
                s = f"{lr:g}: {_f(runs[lr].get('validation_primary'))}" + \
                    (" `constant`" if f"{lr:g}" in choice.get("constant", []) else "")
                s = f"**{s}**" if lr == choice.get("learning_rate") else s
                parts.append(s + ("`*`" if lr == choice.get("best_learning_rate") else ""))
            status = "" if choice or not runs else " (sweep running)"
            flat = "<br>learned nothing at any rate" if choice.get("learned_nothing") else ""
            cells.append("<br>".join(parts) + (" `edge`" if choice.get("on_ladder_edge") else "") + flat + status
                         or "–")
        lines.append(f"| {v} | " + " | ".join(cells) + " |")
    return lines + [""]


def _defaults(sweep: list[dict], rates: dict) -> list[str]:
    lines = ["## The recipe's default learning rates against the sweep", ""]
    if not sweep:
        return lines + ["No sweep run recorded yet.", ""]
    current, other = current_defaults()
    steps = budget_steps(sweep)
    sizes = size_groups(steps)
    small = ", ".join(f"{t} {steps[t]}" for t in sizes["small"]) or "none"
    large = ", ".join(f"{t} {steps[t]}" for t in sizes["large"]) or "none"
    lines += ["For each default in `adaptkit/recipes/training.py` (`DEFAULT_LR`), the rates that are within one "
              "standard error of the best validation score on every task and variant it covers (only cells whose "
              "sweep is complete count), and failing one rate for all, the rates that hold on each group of tasks "
              "separately: by task type (the classification tasks; the regression task, STS-B) and by data size "
              f"(the tasks whose budget is under {SMALL_BUDGET_STEPS} optimizer steps: {small}; the rest: {large}). "
              "A sweep that learned nothing at any rate (every rate scored the same constant) cannot rank rates "
              "and is left out of those columns: no default helps there.", "",
              "| default | covers | sweeps complete | default now | holds on every task | classification only | "
              f"regression only | under {SMALL_BUDGET_STEPS} steps only | {SMALL_BUDGET_STEPS} steps or more only | "
              "where the current default fails | learned nothing at any rate |",
              "|---|---|---:|---:|---|---|---|---|---|---|---|"]
    rules = []
    rated = lambda xs: ", ".join(f"{x:g}" for x in xs) or "none"  # noqa: E731
    for d in default_rates(rates, steps):
        now = current.get(d["key"])
        lines.append(f"| {d['key']} | {', '.join(d['variants'])} | {d['complete']} of {d['planned']} | {now:g} | "
                     f"{rated(d['everywhere'])} | {rated(d['by_type']['classification'])} | "
                     f"{rated(d['by_type']['regression'])} | {rated(d['by_size']['small'])} | "
                     f"{rated(d['by_size']['large'])} | {_default_fails(d, now)} | "
                     f"{', '.join(f'{t}/{v}' for t, v in d['flat']) or 'none'} |")
        if not d["everywhere"] and d["by_size"]["small"] and d["by_size"]["large"]:
            rules.append(f"{d['key']} {rated(d['by_size']['small'])} under {SMALL_BUDGET_STEPS} steps, "
                         f"{rated(d['by_size']['large'])} otherwise")
    if rules:
        lines += ["", "Where no one rate holds on every task, a rule by data size would, on this sweep (seed 1): "
                  + "; ".join(rules) + ". The recipe does not apply it (benchmarks/README.md, \"A rule by data size\")."]
    return lines + ["", f"Any other PEFT method (loha, lokr, adalora, ...) defaults to {other:g}, LoRA's rate; "
                    "no variant here measures it.", ""]


def _where(run: dict) -> str:
    """A ratio run's conditions with its CPU first: the same ratio moved from 1.43x to 1.27x between two hosts."""
    cpu = run.get("cpu") or (run.get("machine") or {}).get("cpu")
    return f"{cpu}, {run['conditions']}" if cpu else run["conditions"]


def _ratios(ratios: list[dict], history_file: Path) -> list[str]:
    if not ratios:
        return ["## Ratio benchmarks", "", "Not run yet: `python benchmarks/ratios.py all`.", ""]
    lines = ["## Ratio benchmarks (both sides measured in one run, interleaved)", "",
             "| benchmark | measured | goal | meets | conditions |", "|---|---|---|---|---|"]
    for rec in ratios:
        for row in rec["rows"]:
            lines.append(f"| {row['name']} | {row['measured']} | {row.get('goal') or '–'} | "
                         f"{ {True: 'yes', False: 'no', None: '–'}[row.get('meets')] } | {_where(rec)} |")
    lines += ["", "Details (every sample, commands): `results/ratios/*.json`.", ""]
    history = [json.loads(x) for x in history_file.read_text().splitlines() if x.strip()] \
        if history_file.is_file() else []
    if len(history) > len(ratios):
        lines += ["Every run so far of the rows that have a goal (`results/ratios/history.jsonl`; the table above is the "
                  "latest run of each benchmark):", "", "| benchmark | measured, run by run | goal |", "|---|---|---|"]
        seen: dict[str, list[str]] = defaultdict(list)
        goals = {}
        for entry in history:
            for row in entry["rows"]:
                if row.get("goal"):
                    seen[row["name"]].append(f"{row['measured'].split(' (')[0]} ({_where(entry)})")
                    goals[row["name"]] = row["goal"]
        lines += [f"| {name} | {'; '.join(vals)} | {goals[name]} |" for name, vals in seen.items()] + [""]
    return lines


# ---- plots -------------------------------------------------------------------------------------------
def pareto_points(grid: list[dict], baselines: dict[str, float]) -> list[dict]:
    """Per variant: median retention over the tasks full fine-tuning learned, trainable-state memory, and
    training time per step relative to full; ``pareto``: no other variant is at least as good on all three
    and better on one."""
    scores, tasks, variants = quality(grid)
    learned = [t for t in tasks if (m := _median(scores.get(("full", t)))) is not None and not math.isnan(m)
               and m >= learned_bar(t, baselines)]
    rel = _relative_time(grid)
    pts = []
    for v in variants:
        ret = [retention(scores, v, t) for t in learned]
        ret = [x for x in ret if x is not None] if v != "full" else [1.0] * len(learned)
        times = [rel[(v, t)] for t in tasks if (v, t) in rel]
        if ret and times:
            pts.append({"variant": v, "retention": statistics.median(ret), "memory_mb": 16 * _params(grid, v) / 1e6,
                        "time": statistics.median(times), "tasks": len(ret)})
    for p in pts:
        p["pareto"] = not any(q is not p and q["retention"] >= p["retention"] and q["memory_mb"] <= p["memory_mb"]
                              and q["time"] <= p["time"] and (q["retention"], -q["memory_mb"], -q["time"])
                              != (p["retention"], -p["memory_mb"], -p["time"]) for q in pts)
    return pts


def plots(grid: list[dict], out: Path, baselines: dict[str, float] | None = None) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = pareto_points(grid, baselines or {})
    if not pts:
        return []
    colors = {v: plt.cm.tab10(i) for i, v in enumerate(VARIANTS)}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, label, log in ((axes[0], "memory_mb", "trainable-state memory, MB (16 B per trainable parameter)", True),
                                (axes[1], "time", "training time per step / full fine-tuning", False)):
        for p in pts:
            ax.scatter(p[key], p["retention"], s=90 if p["pareto"] else 40, color=colors[p["variant"]],
                       edgecolors="black" if p["pareto"] else "none", zorder=3)
            ax.annotate(f"{p['variant']}{' *' if p['pareto'] else ''} ({p['tasks']} tasks)", (p[key], p["retention"]),
                        fontsize=7,
                        xytext=(4, 3), textcoords="offset points")
        ax.set_xscale("log" if log else "linear")
        ax.set_xlabel(label)
        ax.set_ylabel("quality / full fine-tuning (median over learned tasks)")
        ax.axhline(1.0, color="grey", lw=0.5)
        ax.grid(alpha=0.3)
    fig.suptitle("Which strategy: quality against memory and time (* = Pareto-optimal on all three)", fontsize=10)
    fig.tight_layout()
    path = out / "pareto.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=HERE / "results")
    parser.add_argument("--data-root", type=Path, default=Path(os.environ.get("ADAPTKIT_DATA", HERE.parent.parent /
                                                                              "shared" / "data")),
                        help="the GLUE folders, for the majority-class row (left out when absent)")
    args = parser.parse_args(argv)
    data = load(args.results)
    args.results.mkdir(parents=True, exist_ok=True)
    baselines = majority_baselines(args.data_root, sorted({r["task"] for r in data["grid"]}))
    text = render(data, args.results, baselines)
    tmp = args.results / ".REPORT.md.tmp"
    tmp.write_text(text)
    os.replace(tmp, args.results / "REPORT.md")
    made = plots(data["grid"], args.results, baselines)
    print(f"wrote {args.results / 'REPORT.md'}" + "".join(f", {p.name}" for p in made))
    return 0


if __name__ == "__main__":
    sys.exit(main())
