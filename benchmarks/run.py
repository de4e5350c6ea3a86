"""Run the strategy benchmark: every run a fresh process of recipes/classify.py, one JSON result per run.

    python benchmarks/run.py                  # LR sweep, LR selection, then the grid; resumable
    python benchmarks/run.py --stage grid --seeds 1                     # one seed of everything
    python benchmarks/run.py --stage grid --tasks sst2 rte --variants lora full
    python benchmarks/run.py --list           # every planned run: recorded, to run, or blocked (why)
    python benchmarks/run.py --smoke          # 2 tasks x 2 variants x 10 steps -> benchmarks/results/smoke/

Experiments are the JSON files in benchmarks/experiments/{lr_sweep,grid}/ (one per task x strategy
variant). A run is recorded as benchmarks/results/<stage>/<run id>.json once its process finished;
recorded runs are skipped, so an interrupted benchmark continues where it stopped. Runs go seed by
seed, so one seed of everything is complete before the next starts. A failed run records nothing
(it runs again next time); its log stays in benchmarks/work/.

Learning rates: the grid's experiments say "selected"; after the sweep (SST-2, seed 0, every
candidate) each variant's rate is the candidate with the best score on the validation split the
recipe carves from train. Dev (the test set here) is never looked at. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import ROOT, load_average, peak_rss_now, stamp, write_json  # noqa: E402

HERE = Path(__file__).resolve().parent
STAGES = ("lr_sweep", "grid")
RATES_FILE = "learning_rates.json"
SMOKE = {"tasks": ["sst2", "rte"], "variants": ["lora", "linear_probe"], "seeds": [1],
         "flags": {"max_steps": 10, "eval_every": 5, "max_train_samples": 320, "max_eval_samples": 96}}


class ConfigError(ValueError):
    """A bad experiment file or flag, worded like adaptkit's errors. Not imported from adaptkit on purpose:
    importing it loads torch, and a child process inherits its parent's peak RSS (see provenance.peak_rss_now)."""

    def __init__(self, *, field: str, value, problem: str, fix: str):
        super().__init__(f"{field}={value!r}: {problem}. Fix: {fix}")


_KEYS = {"name": str, "stage": str, "task": str, "variant": str, "strategy": str, "options": dict,
         "learning_rates": (list, str), "seeds": list, "train_file": str, "test_file": str, "flags": dict}


# ---- experiments -------------------------------------------------------------------------------------
def load_experiments(folder: Path) -> list[dict]:
    """Every experiment JSON under ``folder``/<stage>/, checked: a typo must not silently change a run."""
    out = []
    for path in sorted(Path(folder).glob("*/*.json")):
        data = json.loads(path.read_text())
        if set(data) != set(_KEYS):
            raise ConfigError(field=str(path), value=sorted(set(data) ^ set(_KEYS)), problem="missing or unknown keys",
                              fix=f"use exactly {sorted(_KEYS)} (benchmarks/make_experiments.py writes them)")
        for key, kind in _KEYS.items():
            if not isinstance(data[key], kind):
                raise ConfigError(field=f"{path}:{key}", value=data[key], problem="has the wrong type",
                                  fix=f"use a {kind}")
        if data["stage"] not in STAGES or path.parent.name != data["stage"]:
            raise ConfigError(field=f"{path}:stage", value=data["stage"], problem=f"must be one of {STAGES} and "
                              "match the folder", fix="move the file or fix its stage")
        rates = data["learning_rates"]
        if (rates == "selected" and data["stage"] != "grid") or (isinstance(rates, str) and rates != "selected") \
                or (isinstance(rates, list) and not (rates and all(isinstance(r, float) and r > 0 for r in rates))):
            raise ConfigError(field=f"{path}:learning_rates", value=data["learning_rates"],
                              problem="must be a list of numbers, or 'selected' in the grid",
                              fix="list the candidates, or use 'selected' to take the sweep's choice")
        out.append(data)
    return out


def run_id(exp: dict, lr: float, seed: int) -> str:
    return f"{exp['name']}__lr{lr:g}__seed{seed}"


def plan(experiments: list[dict], rates: dict, stages, tasks, variants, seeds, smoke: bool) -> list[dict]:
    """Runs in order seed -> task -> variant; a grid run whose rate is not selected yet is 'blocked'."""
    sweep_candidates = {e["variant"]: e["learning_rates"] for e in experiments if e["stage"] == "lr_sweep"}
    runs = []
    for exp in experiments:
        if exp["stage"] not in stages or (tasks and exp["task"] not in tasks) or \
                (variants and exp["variant"] not in variants):
            continue
        if exp["learning_rates"] != "selected":
            lrs, blocked = exp["learning_rates"], None
        elif smoke:  # no sweep behind a smoke run: the middle candidate, declared in its record
            lrs, blocked = [sorted(sweep_candidates[exp["variant"]])[len(sweep_candidates[exp["variant"]]) // 2]], None
        elif exp["variant"] in rates:
            lrs, blocked = [rates[exp["variant"]]["learning_rate"]], None
        else:
            lrs, blocked = [float("nan")], f"no learning rate selected for {exp['variant']} yet (run the lr_sweep stage)"
        for seed in (seeds or exp["seeds"]):
            for lr in lrs:
                runs.append({"experiment": exp, "learning_rate": lr, "seed": seed, "blocked": blocked,
                             "id": run_id(exp, lr, seed) if not blocked else f"{exp['name']}__lr?__seed{seed}"})
    order = {s: i for i, s in enumerate(STAGES)}
    return sorted(runs, key=lambda r: (order[r["experiment"]["stage"]], r["seed"], r["experiment"]["task"],
                                       r["experiment"]["variant"], r["learning_rate"]))


# ---- learning-rate selection -------------------------------------------------------------------------
PROTOCOL = ("the smallest candidate whose median validation accuracy over the sweep seeds is within one standard "
            "error of the best (binomial SE of the best score on the validation split); the validation split is "
            "carved from train; dev is never read")


def select_learning_rates(experiments: list[dict], results: Path) -> dict:
    """Per variant, the smallest sweep rate within one standard error of the best validation score.

    The one-standard-error rule (Hastie, Tibshirani & Friedman, *Elements of Statistical Learning*,
    7.10): on a 692-example validation split one SE is ~1.3 accuracy points, and rates closer than
    that are not told apart by one seed; the smaller of two indistinguishable rates is the safer one
    to carry to the other tasks (benchmarks/README.md says when and why this replaced the argmax).
    Only complete sweeps count (every candidate x seed recorded); the choice and every score behind
    it go to results/learning_rates.json.
    """
    chosen = {}
    for exp in (e for e in experiments if e["stage"] == "lr_sweep"):
        scores = {}
        for lr in exp["learning_rates"]:
            recs = [_read(results / "lr_sweep" / f"{run_id(exp, lr, s)}.json") for s in exp["seeds"]]
            if any(r is None for r in recs):
                break
            scores[lr] = statistics.median(r["validation_primary"] for r in recs)
        else:
            best = max(sorted(scores), key=lambda lr: scores[lr])  # max keeps the first (smallest) on ties
            se = _binomial_se(scores[best], recs[0])
            pick = min(lr for lr in scores if scores[lr] >= scores[best] - se)
            chosen[exp["variant"]] = {"learning_rate": pick, "best_learning_rate": best, "standard_error": se,
                                      "task": exp["task"], "seeds": exp["seeds"],
                                      "metric": f"validation {recs[0]['metric']} (split carved from train)",
                                      "scores": {f"{lr:g}": scores[lr] for lr in sorted(scores)}}
    if chosen:
        write_json(results / RATES_FILE, {"protocol": PROTOCOL, "selected": chosen})
    return chosen


def _binomial_se(accuracy: float, record: dict) -> float:
    """sqrt(p (1 - p) / n), n = the validation rows the recipe reported carving from train."""
    if record.get("metric") != "accuracy":
        raise ConfigError(field="lr_sweep metric", value=record.get("metric"),
                          problem="the one-standard-error rule here uses the binomial SE of an accuracy",
                          fix="sweep on a task whose primary metric is accuracy (SST-2)")
    lines = [x for x in (record.get("recipe_metrics") or {}).get("data", []) if x.startswith("validation: ")]
    if not lines or not lines[0].split()[1].isdigit():
        raise ConfigError(field="recipe_metrics.data", value=lines, problem="does not say how many validation rows "
                          "were carved from train", fix="record sweep runs with benchmarks/run.py")
    return math.sqrt(accuracy * (1 - accuracy) / int(lines[0].split()[1]))


def _read(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


# ---- one run -------------------------------------------------------------------------------------------
def command(run: dict, data_root: Path, out_dir: Path, python: str, recipe: Path, smoke: bool) -> list[str]:
    exp = run["experiment"]
    cmd = [python, str(recipe), "--data", str(data_root / exp["train_file"]),
           "--test-file", str(data_root / exp["test_file"]), "--strategy", exp["strategy"],
           "--learning-rate", f"{run['learning_rate']:g}", "--seed", str(run["seed"]),
           "--output-dir", str(out_dir), "--overwrite"]
    for key, value in exp["options"].items():
        cmd += ["--option", f"{key}={json.dumps(value)}"]
    flags = {**exp["flags"], **(SMOKE["flags"] if smoke else {})}
    for key, value in flags.items():
        flag = "--" + key.replace("_", "-")
        cmd += ([flag] if value else ["--no-" + flag[2:]]) if isinstance(value, bool) else [flag, str(value)]
    return cmd


def step_times(log: Path) -> list[float]:
    """Seconds per optimizer step from the recipe's log.jsonl (train_seconds at every logged step;
    evaluation pauses that clock, so it is not counted)."""
    points = []
    for line in log.read_text().splitlines() if log.is_file() else []:
        rec = json.loads(line)
        if "loss" in rec and "train_seconds" in rec:
            points.append((rec["step"], rec["train_seconds"]))
    return [(t1 - t0) / (s1 - s0) for (s0, t0), (s1, t1) in zip(points, points[1:]) if s1 > s0]


def execute(run: dict, args: argparse.Namespace) -> dict:
    exp = run["experiment"]
    out_dir = args.work / exp["stage"] / run["id"]
    out_dir.mkdir(parents=True, exist_ok=True)
    cmd = command(run, args.data_root, out_dir, args.python, args.recipe, args.smoke)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    parent_rss = peak_rss_now()  # a floor under the recipe's ru_maxrss-based peak (inherited across fork + exec)
    load_start, started = load_average(), time.perf_counter()
    with open(out_dir / "recipe.log", "w") as log:
        code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT).returncode
    wall = time.perf_counter() - started
    metrics = _read(out_dir / "metrics.json")
    if code != 0 or metrics is None:
        tail = (out_dir / "recipe.log").read_text()[-1500:]
        raise RuntimeError(f"{run['id']} failed (exit {code}); log {out_dir / 'recipe.log'}:\n{tail}")
    steps = step_times(out_dir / "log.jsonl")
    adapter = out_dir / metrics.get("adapter_dir", "adapter")
    metric = metrics["metric"]
    record = {
        "run_id": run["id"], "stage": exp["stage"], "experiment": exp["name"], "task": exp["task"],
        "variant": exp["variant"], "strategy": exp["strategy"], "options": exp["options"], "seed": run["seed"],
        "learning_rate": run["learning_rate"], "smoke": args.smoke, "metric": metric,
        "test": metrics.get("test", {}), "test_primary": metrics.get("test", {}).get(metric),
        "validation": metrics.get("validation", {}), "validation_primary": metrics.get("validation", {}).get(metric),
        "best_step": metrics.get("best_step"), "steps": metrics.get("steps"), "epochs": metrics.get("epochs"),
        "trainable_parameters": metrics.get("trainable_parameters"), "total_parameters": metrics.get("total_parameters"),
        "adapter_bytes_on_disk": sum(f.stat().st_size for f in adapter.rglob("*") if f.is_file()),
        "peak_rss_bytes": metrics.get("peak_rss_bytes"), "runner_peak_rss_bytes": parent_rss,
        "train_seconds": metrics.get("train_seconds"),
        "samples_per_second": metrics.get("samples_per_second"),
        "median_step_seconds": statistics.median(steps) if steps else None,
        "mean_step_seconds": metrics["train_seconds"] / metrics["steps"] if metrics.get("steps") else None,
        "feature_cache": metrics.get("feature_cache"), "process_wall_seconds": round(wall, 3),
        "load_average": {"start": load_start, "end": load_average()}, "threads_env": env.get("OMP_NUM_THREADS"),
        "command": [str(c) for c in cmd], **stamp(args.threads or os.cpu_count()),
        "recipe_versions": metrics.get("versions"), "recipe_metrics": metrics,
    }
    write_json(args.results / exp["stage"] / f"{run['id']}.json", record)
    if not args.keep_work:
        shutil.rmtree(out_dir, ignore_errors=True)
    return record


def missing_flags(runs: list[dict], args: argparse.Namespace) -> dict[str, list[str]]:
    """Recipe flags the experiments use that this recipe does not have, per experiment (asks --help once)."""
    wanted = {r["experiment"]["name"]: {c for c in command(r, args.data_root, Path("x"), args.python, args.recipe,
                                                            args.smoke) if c.startswith("--")} for r in runs}
    if not wanted:
        return {}
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    text = subprocess.run([args.python, str(args.recipe), "--help"], capture_output=True, text=True, env=env,
                          cwd=ROOT).stdout
    known = {w.strip("[],") for w in text.split() if w.startswith(("--", "[--"))}
    known |= {"--no-" + k[2:] for k in known}
    return {name: sorted(f for f in flags if f not in known) for name, flags in wanted.items()
            if any(f not in known for f in flags)}


# ---- main ----------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", choices=[*STAGES, "all"], default="all")
    p.add_argument("--tasks", nargs="+"), p.add_argument("--variants", nargs="+")
    p.add_argument("--seeds", nargs="+", type=int, help="default: each experiment's own seeds")
    p.add_argument("--smoke", action="store_true", help=f"tiny budget {SMOKE} into results/smoke/ (not the benchmark)")
    p.add_argument("--list", action="store_true", help="print the plan and exit")
    p.add_argument("--data-root", type=Path, default=Path(os.environ.get("ADAPTKIT_DATA", ROOT.parent / "shared/data")))
    p.add_argument("--experiments", type=Path, default=HERE / "experiments")
    p.add_argument("--results", type=Path, default=None, help="default: benchmarks/results (smoke: results/smoke)")
    p.add_argument("--work", type=Path, default=HERE / "work", help="run folders (logs, adapters); deleted after")
    p.add_argument("--keep-work", action="store_true", help="keep each run's folder (adapters, logs)")
    p.add_argument("--threads", type=int, help="OMP_NUM_THREADS for the runs (default: torch's, all cores)")
    p.add_argument("--python", default=sys.executable)
    p.add_argument("--recipe", type=Path, default=ROOT / "recipes" / "classify.py")
    p.add_argument("--fail-fast", action="store_true", help="stop at the first failed run")
    args = p.parse_args(argv)
    if args.smoke:
        args.stage = "grid"
        args.tasks, args.variants, args.seeds = (args.tasks or SMOKE["tasks"], args.variants or SMOKE["variants"],
                                                 args.seeds or SMOKE["seeds"])
    args.results = args.results or HERE / "results" / ("smoke" if args.smoke else "")
    if not (args.data_root / "sst2" / "train.tsv").is_file():
        raise ConfigError(field="--data-root", value=str(args.data_root), problem="holds no sst2/train.tsv",
                          fix="point it (or ADAPTKIT_DATA) at the folder with sst2, cola, mrpc, rte, stsb")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    experiments = load_experiments(args.experiments)
    failed = []
    for stage in (STAGES if args.stage == "all" else (args.stage,)):
        rates = {} if args.smoke else select_learning_rates(experiments, args.results)
        runs = plan(experiments, rates, (stage,), args.tasks, args.variants, args.seeds, args.smoke)
        done = {r["id"] for r in runs if (args.results / stage / f"{r['id']}.json").is_file()}
        todo = [r for r in runs if r["id"] not in done and not r["blocked"]]
        if args.list:
            for r in runs:
                status = "recorded" if r["id"] in done else (f"blocked: {r['blocked']}" if r["blocked"] else "to run")
                print(f"{stage:8s} {r['id']:60s} {status}")
            continue
        missing = missing_flags(todo, args)
        for name, flags in missing.items():
            print(f"skipping {name}: {args.recipe.name} has no {', '.join(flags)}", file=sys.stderr)
        todo = [r for r in todo if r["experiment"]["name"] not in missing]
        print(f"{stage}: {len(runs)} planned, {len(done)} recorded, {len(todo)} to run, "
              f"{sum(bool(r['blocked']) for r in runs)} blocked", flush=True)
        for i, r in enumerate(todo, 1):
            try:
                rec = execute(r, args)
            except RuntimeError as err:
                failed.append(r["id"])
                print(err, file=sys.stderr, flush=True)
                if args.fail_fast:
                    return 1
                continue
            print(f"[{i}/{len(todo)}] {r['id']}: {rec['metric']} {rec['test_primary']} (validation "
                  f"{rec['validation_primary']}), {rec['train_seconds']} s train, {rec['process_wall_seconds']} s "
                  f"process, load {rec['load_average']['end']}", flush=True)
        failed += [f"{name} (recipe lacks {', '.join(flags)})" for name, flags in missing.items()]
    if failed:
        print(f"{len(failed)} run(s) failed or skipped: {failed}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
