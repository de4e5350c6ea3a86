"""Turn recorded benchmark runs into benchmarks/results/REPORT.md and two PNG plots.

    python benchmarks/report.py                              # benchmarks/results/ -> REPORT.md + PNGs
    python benchmarks/report.py --results benchmarks/results/smoke

Reads results/grid/*.json (only runs at the selected learning rates, see results/learning_rates.json),
results/lr_sweep/*.json and results/ratios/*.json. Every number printed comes from those files; a
missing run shows as a gap and the header says how many of the planned runs are there. The goals
the results are held against are printed beside them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_experiments import GRID_SEEDS, STEPS, VARIANTS  # noqa: E402

HERE = Path(__file__).resolve().parent
# Accuracy retention relative to full fine-tuning (median over seeds); held per task and over tasks.
RETENTION_GOALS = {"lora": 1.00, "bottleneck_pfeiffer": 1.00, "bottleneck_houlsby": 1.00, "prefix": 0.97,
                   "linear_probe": 0.93, "linear_probe_mean": 0.93}
FULL_SST2_GOAL, FULL_SST2_PUBLISHED = 0.90, 0.915  # published all-MiniLM-L6 full fine-tuning on SST-2 dev: 91.5


def load(results: Path) -> tuple[list[dict], dict, list[dict]]:
    rates = json.loads((results / "learning_rates.json").read_text()).get("selected", {}) \
        if (results / "learning_rates.json").is_file() else {}
    grid = [json.loads(p.read_text()) for p in sorted((results / "grid").glob("*.json"))]
    # smoke runs have no sweep behind them; real ones count only at the selected rate
    grid = [r for r in grid if r.get("smoke") or r["learning_rate"] == rates.get(r["variant"], {}).get("learning_rate")]
    ratios = [json.loads(p.read_text()) for p in sorted((results / "ratios").glob("*.json"))]
    global HISTORY
    HISTORY = results / "ratios" / "history.jsonl"
    return grid, rates, ratios


def median_range(values: list[float]) -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.3f} (n=1)"
    return f"{statistics.median(values):.3f} [{min(values):.3f}–{max(values):.3f}] (n={len(values)})"


def _mb(x: float | None) -> str:
    return "–" if x is None else f"{x / 1e6:,.1f}"


def quality(grid: list[dict]) -> tuple[dict, list[str], list[str]]:
    scores = defaultdict(list)
    for r in grid:
        if r.get("test_primary") is not None:
            scores[(r["variant"], r["task"])].append(r["test_primary"])
    tasks = [t for t in STEPS if any(k[1] == t for k in scores)]
    variants = [v for v in VARIANTS if any(k[0] == v for k in scores)]
    return scores, tasks, variants


def retention(scores: dict, variant: str, task: str) -> float | None:
    mine, full = scores.get((variant, task)), scores.get(("full", task))
    if not mine or not full or statistics.median(full) == 0:
        return None
    return statistics.median(mine) / statistics.median(full)


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
        metric = metrics.metric_for_task(task, num_labels=train.num_labels)
        metric.add_batch(predictions=[majority] * len(dev), references=dev.labels)
        out[task] = float(metric.compute()[metrics.primary_metric(task)[0]])
    return out


def render(grid: list[dict], rates: dict, ratios: list[dict], results: Path,
           baselines: dict[str, float] | None = None) -> str:
    scores, tasks, variants = quality(grid)
    metric = {r["task"]: r["metric"] for r in grid}
    smoke = any(r.get("smoke") for r in grid)
    lines = ["# Strategy benchmark: all-MiniLM-L6-v2 on five GLUE tasks", ""]
    if smoke:
        lines += ["**SMOKE RUN: a 10-step budget on a few hundred examples. These numbers check the pipeline; they "
                  "say nothing about the strategies.**", ""]
    lines += _conditions(grid, ratios)
    planned = len(STEPS) * len(VARIANTS) * len(GRID_SEEDS)
    lines += [f"Runs recorded: {len(grid)} of {planned} planned ({len(STEPS)} tasks x {len(VARIANTS)} variants x "
              f"{len(GRID_SEEDS)} seeds). Missing cells show as –.", ""]
    if grid:
        lines += ["## Quality on dev (the test set here): median [range] over seeds", "",
                  "| variant | " + " | ".join(f"{t} ({metric[t]})" for t in tasks) + " |",
                  "|---|" + "---:|" * len(tasks)]
        lines += [f"| {v} | " + " | ".join(median_range(scores.get((v, t), [])) for t in tasks) + " |" for v in variants]
        if baselines:
            lines += ["| *majority class of train, predicted for every dev example* | "
                      + " | ".join("–" if baselines.get(t) is None else f"*{baselines[t]:.3f}*" for t in tasks) + " |",
                      "", "A cell near the majority-class row learned (almost) nothing at this budget: the model "
                      "predicts one class. STS-B has no such row (a constant prediction has no correlation)."]
        # retention against a full fine-tuning run that predicts one class measures nothing: those tasks are
        # shown in parentheses and left out of the median over tasks
        floor = {t: (baselines or {}).get(t, 0.0) for t in tasks}
        learned = {t for t in tasks if scores.get(("full", t)) and statistics.median(scores[("full", t)]) > floor[t] + 0.01}
        lines += ["", "## Retention relative to full fine-tuning (median over seeds), against the goals", "",
                  "Tasks where full fine-tuning's median is not at least 0.01 above the majority-class row (0 for "
                  "STS-B) are in parentheses and left out of the median over tasks: full fine-tuning learned nothing "
                  "there, so a ratio to it says nothing. "
                  f"Counted: {', '.join(t for t in tasks if t in learned) or 'none yet'}.", "",
                  "| variant | goal | " + " | ".join(tasks) + " | median over tasks | counted tasks meeting the goal |",
                  "|---|---:|" + "---:|" * (len(tasks) + 2)]
        for v in variants:
            if v == "full":
                continue
            per_task = [retention(scores, v, t) for t in tasks]
            known = [x for x, t in zip(per_task, tasks) if x is not None and t in learned]
            med = statistics.median(known) if known else None
            goal = RETENTION_GOALS.get(v)
            # per counted task, not the median over tasks: a median hides one task where a strategy collapsed
            verdict = "–" if goal is None or not known else f"{sum(x >= goal for x in known)} of {len(known)}"
            lines.append(f"| {v} | {'≥ %.2f' % goal if goal else '(none)'} | "
                         + " | ".join("–" if x is None else f"{x:.3f}" if t in learned else f"({x:.3f})"
                                      for x, t in zip(per_task, tasks))
                         + f" | {'–' if med is None else f'{med:.3f}'} | {verdict} |")
        full_sst2 = scores.get(("full", "sst2"), [])
        if full_sst2:
            m = statistics.median(full_sst2)
            lines += ["", f"Full fine-tuning on SST-2: {m:.3f} (goal ≥ {FULL_SST2_GOAL:.2f}; published all-MiniLM-L6 "
                      f"full fine-tuning {FULL_SST2_PUBLISHED * 100:.1f}): {'meets' if m >= FULL_SST2_GOAL else 'misses'} "
                      "the goal."]
        lines += ["", "![metric vs trainable parameters](quality_vs_params.png)", ""] + _cost(grid, variants)
    lines += _rates(rates) + _ratios(ratios)
    return "\n".join(lines) + "\n"


def _conditions(grid: list[dict], ratios: list[dict]) -> list[str]:
    recs = grid + ratios
    if not recs:
        return ["No results recorded yet: run `python benchmarks/run.py` (README).", ""]
    first = recs[0]
    shas = sorted({(r.get("git") or {}).get("sha") or "?" for r in recs})
    dirty = sum(bool((r.get("git") or {}).get("dirty_files")) for r in recs)
    loads = [x for r in recs for x in (r.get("load_average", {}).get("start") or [])[:1]]
    m = first.get("machine", {})
    steps = {r["task"]: (r.get("recipe_metrics") or {}).get("max_steps") for r in grid}
    evals = sorted({-(-rm["max_steps"] // rm["config"]["eval_every"]) for r in grid
                    if (rm := r.get("recipe_metrics") or {}).get("config", {}).get("eval_every")}) or [4]
    threads = defaultdict(set)  # OpenMP threads per run, and which tasks ran that way
    for r in grid:
        threads[r.get("threads_env") or "?"].add(r["task"])
    budget = ", ".join(f"{t} {steps.get(t) or s}" for t, s in STEPS.items() if t in steps or not grid)
    return [f"Machine: {m.get('cpu')}, {m.get('usable_cores')} usable cores, "
            f"{(m.get('memory_bytes') or 0) / 2**30:.0f} GiB, {m.get('accelerator')}; versions "
            + ", ".join(f"{k} {v}" for k, v in first.get("versions", {}).items()) + ".",
            f"Commits: {', '.join(s[:10] for s in shas)}{f' ({dirty} records from a tree with uncommitted changes)' if dirty else ''}. "
            f"1-minute load average when runs started: {min(loads, default=0):.1f}–{max(loads, default=0):.1f} "
            "(the machine was shared with other work; times are noisy, ratios measured interleaved are not).",
            "Threads per run: " + "; ".join(f"{n} ({', '.join(t for t in STEPS if t in tasks)})"
                                            for n, tasks in sorted(threads.items())) + "."
            + (" 1-thread runs went two side by side, one per core; 2-thread runs had both cores. Compare times "
               "within a task, as ratios." if len(threads) > 1 else "") if threads else "",
            f"Budget per task, the same for every strategy: optimizer steps {budget or '(no grid runs)'}; batch 32, at most 128 tokens, "
            f"length-grouped dynamic padding, AdamW, linear warm-up 6% then decay, {'/'.join(map(str, evals))} "
            "evaluations on the validation "
            "split carved from train (10%, stratified), the best one tested on dev.", ""]


def _cost(grid: list[dict], variants: list[str]) -> list[str]:
    by_variant = defaultdict(list)
    for r in grid:
        by_variant[r["variant"]].append(r)
    lines = ["## Cost per variant", "",
             "Parameters and adapter size from the runs; peak RSS is the whole recipe process (model, data, "
             "evaluation, the reloaded test model), median over runs; step time and throughput on SST-2; train seconds "
             "include building the linear probe's feature cache. SST-2 runs kept from the first grid had two threads, the "
             "re-run ones one (the threads column): compare speed across strategies with the interleaved ratio "
             "benchmarks below, not this table.", "",
             "| variant | trainable params | % of total | adapter on disk (MB) | peak RSS (MB) | SST-2 median step (ms) "
             "| SST-2 samples/s | SST-2 threads | train s, one seed of all tasks |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for v in variants:
        runs = by_variant[v]
        med = lambda key, rs=runs: statistics.median(x[key] for x in rs if x.get(key) is not None) \
            if any(x.get(key) is not None for x in rs) else None  # noqa: E731
        sst2 = [r for r in runs if r["task"] == "sst2"]
        step = med("median_step_seconds", sst2)
        sps = med("samples_per_second", sst2)
        threads = "/".join(sorted({str(r.get("threads_env") or "?") for r in sst2}))
        per_task = [statistics.median(_train_cost(r) for r in runs if r["task"] == t)
                    for t in STEPS if any(r["task"] == t for r in runs)]
        total = f"{sum(per_task):,.0f}" + ("" if len(per_task) == len(STEPS) else f" ({len(per_task)} tasks)")
        r0 = runs[0]
        lines.append(f"| {v} | {r0['trainable_parameters']:,} | {100 * r0['trainable_parameters'] / r0['total_parameters']:.2f} "
                     f"| {_mb(med('adapter_bytes_on_disk'))} | {_mb(med('peak_rss_bytes'))} "
                     f"| {'–' if step is None else f'{step * 1e3:,.1f}'} | {'–' if sps is None else f'{sps:,.1f}'} "
                     f"| {threads} | {total} |")
    return lines + ["", "![memory and time per strategy](cost.png)", ""]


def _train_cost(r: dict) -> float:
    """Training seconds, plus building the feature cache where the linear probe used one (it is training work)."""
    cache = r.get("feature_cache") or {}
    return r["train_seconds"] + (cache.get("cache_seconds") or 0.0 if cache.get("used", True) else 0.0)


def _rates(rates: dict) -> list[str]:
    if not rates:
        return ["## Learning rates", "", "Not selected yet (the lr_sweep stage has not finished).", ""]
    lines = ["## Learning rates (chosen on the validation split carved from SST-2 train, never on dev)", "",
             "| variant | selected | validation score per candidate |", "|---|---:|---|"]
    for v, info in rates.items():
        lines.append(f"| {v} | {info['learning_rate']:g} | "
                     + ", ".join(f"{lr}: {s:.3f}" for lr, s in info["scores"].items()) + " |")
    return lines + [""]


HISTORY: Path | None = None  # set by main/load: results/ratios/history.jsonl


def results_history() -> list[dict]:
    if HISTORY is None or not HISTORY.is_file():
        return []
    return [json.loads(line) for line in HISTORY.read_text().splitlines() if line.strip()]


def _ratios(ratios: list[dict]) -> list[str]:
    if not ratios:
        return ["## Ratio benchmarks", "", "Not run yet: `python benchmarks/ratios.py all`.", ""]
    lines = ["## Ratio benchmarks (both sides measured in one run, interleaved)", "",
             "| benchmark | measured | goal | meets | conditions |", "|---|---|---|---|---|"]
    for rec in ratios:
        for row in rec["rows"]:
            lines.append(f"| {row['name']} | {row['measured']} | {row.get('goal') or '–'} | "
                         f"{ {True: 'yes', False: 'no', None: '–'}[row.get('meets')] } | {rec['conditions']} |")
    lines += ["", "Details (every sample, commands): `results/ratios/*.json`.", ""]
    history = results_history()
    if len(history) > len(ratios):
        lines += ["Every run so far of the rows that have a goal (`results/ratios/history.jsonl`; the table above is the "
                  "latest run of each benchmark):", "", "| benchmark | measured, run by run | goal |", "|---|---|---|"]
        seen: dict[str, list[str]] = defaultdict(list)
        goals = {}
        for entry in history:
            for row in entry["rows"]:
                if row.get("goal"):
                    seen[row["name"]].append(f"{row['measured'].split(' (')[0]} ({entry['conditions']})")
                    goals[row["name"]] = row["goal"]
        lines += [f"| {name} | {'; '.join(vals)} | {goals[name]} |" for name, vals in seen.items()] + [""]
    return lines


def plots(grid: list[dict], out: Path) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scores, tasks, variants = quality(grid)
    if not tasks:
        return []
    params = {r["variant"]: r["trainable_parameters"] for r in grid}
    colors = {v: plt.cm.tab10(i) for i, v in enumerate(VARIANTS)}
    fig, axes = plt.subplots(1, len(tasks), figsize=(3.6 * len(tasks), 3.4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for v in variants:
            vals = scores.get((v, task))
            if vals:
                med = statistics.median(vals)
                ax.errorbar(params[v], med, yerr=[[med - min(vals)], [max(vals) - med]], fmt="o", color=colors[v],
                            label=v, capsize=3)
        ax.set_xscale("log")
        ax.set_title(f"{task} ({grid[[r['task'] for r in grid].index(task)]['metric']})")
        ax.set_xlabel("trainable parameters")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    first = out / "quality_vs_params.png"
    fig.savefig(first, dpi=110)
    plt.close(fig)

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    rss = [statistics.median(r["peak_rss_bytes"] for r in grid if r["variant"] == v) / 1e6 for v in variants]
    step = [statistics.median([r["median_step_seconds"] for r in grid if r["variant"] == v and r["task"] == "sst2"
                               and r.get("median_step_seconds") is not None] or [float("nan")]) * 1e3 for v in variants]
    a.bar(variants, rss, color=[colors[v] for v in variants])
    a.set_ylabel("peak RSS of the run (MB)")
    b.bar(variants, step, color=[colors[v] for v in variants])
    b.set_ylabel("median step on SST-2 (ms)")
    for ax in (a, b):
        ax.tick_params(axis="x", rotation=45, labelsize=8)
    fig.tight_layout()
    second = out / "cost.png"
    fig.savefig(second, dpi=110)
    plt.close(fig)
    return [first, second]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=HERE / "results")
    parser.add_argument("--data-root", type=Path, default=Path(os.environ.get("ADAPTKIT_DATA", HERE.parent.parent /
                                                                              "shared" / "data")),
                        help="the GLUE folders, for the majority-class row (left out when absent)")
    args = parser.parse_args(argv)
    grid, rates, ratios = load(args.results)
    args.results.mkdir(parents=True, exist_ok=True)
    baselines = majority_baselines(args.data_root, sorted({r["task"] for r in grid}))
    (args.results / "REPORT.md").write_text(render(grid, rates, ratios, args.results, baselines))
    made = plots(grid, args.results)
    print(f"wrote {args.results / 'REPORT.md'}" + "".join(f", {p.name}" for p in made))
    return 0


if __name__ == "__main__":
    sys.exit(main())
