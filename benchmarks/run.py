"""Run the strategy benchmark: every run a fresh process of recipes/classify.py, one JSON result per run.

    python benchmarks/run.py --list                       # every planned run: recorded, to run, blocked (why)
    python benchmarks/run.py --stage sweep --tasks mrpc rte --threads 1 --commit   # one of two side-by-side runners
    python benchmarks/run.py --stage headline --threads 1 --commit
    python benchmarks/run.py --stage seeds --tasks sst2 cola --threads 1 --commit
    python benchmarks/run.py                              # sweep, headline, seeds: everything, resumable
    python benchmarks/run.py --smoke                      # 2 tasks x 2 variants x 10 steps -> results/smoke/

Experiments are the JSON files in benchmarks/experiments/{grid,headline}/ (one per task x strategy variant;
make_experiments.py writes them from one table). A run is recorded as benchmarks/results/records/<run id>.json
once its process finished; recorded runs are skipped, so an interrupted benchmark continues where it
stopped (kill it at any time: at most the run in progress is lost). A failed run records nothing (it
runs again next time); its log stays in benchmarks/work/. ``--commit`` commits each record as it lands.

Stages (benchmarks/README.md, "Protocol"):
  sweep     per task and variant, seed 1 at the ladder's start rates; while the best validation score is on an
            edge of the rates run so far, the next rate beyond it (so the plan grows as results come in). When
            every rate scores exactly the same (nothing learned), the next rate above, up to the ladder's top.
            The chosen rate: the smallest within one standard error of the best on validation. Dev is the
            test set and is never read for a choice.
  seeds     seeds 2 and 3 at the chosen rate (the sweep's run at that rate is seed 1).
  evidence  one 10-epoch full fine-tuning run where the 3-epoch sweep stayed at the majority class (MRPC, RTE).
  headline  full fine-tuning and LoRA on the 67k-row GLUE SST-2 at the rates chosen on sentence-level SST-2.

To stop gracefully: `touch benchmarks/work/STOP`; each runner finishes its run in flight, then exits.
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
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import ROOT, load_average, peak_rss_now, stamp, write_json  # noqa: E402

HERE = Path(__file__).resolve().parent
STAGES = ("sweep", "evidence", "headline", "seeds")
STOP_FILE = "STOP"  # in --work: runners finish the run in flight, then exit (bench.sh too)
RUNS, RATES_FILE = "records", "learning_rates.json"
NOT_RUN = "not run: "  # a blocked run whose reason starts so never runs (--list shows it; bench.sh stops counting it)
SMOKE = {"tasks": ["sst2", "rte"], "variants": ["lora", "linear_probe"], "seeds": [1],
         "flags": {"epochs": 1, "max_steps": 10, "eval_every": 5, "max_train_samples": 320, "max_eval_samples": 96}}


class ConfigError(ValueError):
    """A bad experiment file or flag, worded like adaptkit's errors. Not imported from adaptkit on purpose:
    importing it loads torch, and a child process inherits its parent's peak RSS (see provenance.peak_rss_now)."""

    def __init__(self, *, field: str, value, problem: str, fix: str):
        super().__init__(f"{field}={value!r}: {problem}. Fix: {fix}")


_KEYS = {"name": str, "stage": str, "task": str, "variant": str, "strategy": str, "options": dict,
         "learning_rates": dict, "sweep_seed": (int, type(None)), "seeds": list, "train_file": str,
         "test_file": str, "flags": dict}
_FOLDERS = {"grid": "grid", "headline": "headline", "evidence": "evidence"}


# ---- experiments -------------------------------------------------------------------------------------
def load_experiments(folder: Path) -> list[dict]:
    """Every experiment JSON under ``folder``/{grid,headline}/, checked: a typo must not silently change a run."""
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
        if data["stage"] not in _FOLDERS or path.parent.name != data["stage"]:
            raise ConfigError(field=f"{path}:stage", value=data["stage"], problem=f"must be one of {sorted(_FOLDERS)} "
                              "and match the folder", fix="move the file or fix its stage")
        rates = data["learning_rates"]
        if data["stage"] == "grid":
            ladder, start = rates.get("ladder"), rates.get("start")
            ok = set(rates) == {"ladder", "start"} and isinstance(ladder, list) and ladder == sorted(set(ladder)) \
                and all(isinstance(r, float) and r > 0 for r in ladder) and isinstance(start, list) and start \
                and set(start) <= set(ladder) and data["sweep_seed"] in data["seeds"]
            fix = "give {'ladder': [increasing rates], 'start': [some of them]} and a sweep_seed among the seeds"
        else:
            ok = (set(rates) == {"from_task"} and isinstance(rates["from_task"], str)) or \
                (set(rates) == {"rate"} and isinstance(rates["rate"], float) and rates["rate"] > 0)
            fix = "give {'from_task': <the task whose chosen rate the run uses>} or {'rate': <a fixed rate > 0>}"
        if not ok:
            raise ConfigError(field=f"{path}:learning_rates", value=rates, problem="is not a valid rate plan", fix=fix)
        out.append(data)
    return out


def run_id(exp: dict, lr: float, seed: int) -> str:
    return f"{exp['name']}__lr{lr:g}__seed{seed}"


def read_json(path: Path) -> Any:
    """A committed result file, or a ConfigError that names it (json's own error names only a line and column)."""
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(field=str(path), value=f"{e.msg} at line {e.lineno}, column {e.colno}",
                          problem="is not valid JSON (a hand edit, or a file damaged outside the runner: the "
                                  "runner writes each file whole, through a temporary name)",
                          fix=f"restore it with `git checkout -- {path}`, or delete it to run that run again") from None


def _read(path: Path) -> dict | None:
    return read_json(path) if path.is_file() else None


def _score(record: dict) -> float:
    """The run's validation score; NaN (a constant prediction has no correlation) counts as the worst."""
    value = record.get("validation_primary")
    return value if isinstance(value, (int, float)) and math.isfinite(value) else -math.inf


def _constant(record: dict) -> bool:
    """Did the evaluation the run kept predict one class for every validation example? (The recipe says so since
    it reports ``predicted_classes``; earlier records say nothing and count as not constant.)"""
    kept = f"validation at step {record.get('best_step')}"
    return (record.get("validation") or {}).get("predicted_classes") == 1 or \
        kept in ((record.get("recipe_metrics") or {}).get("constant_predictions") or [])


# ---- the learning-rate sweep -------------------------------------------------------------------------
PROTOCOL = ("per task and variant, seed 1 at the ladder's start rates, extended one rung at a time beyond an edge "
            "while the best validation score is on that edge, and upward to the ladder's top while every rate scores the "
            "same (a flat sweep: learned nothing, no seeds 2-3); chosen: the smallest rate whose validation score is "
            "within one standard error of the best (the one-standard-error rule), never a rate whose run predicted "
            "one class while the best did not; validation is carved from train; "
            "dev is never read")


def standard_error(metric: str, value: float, n: int) -> float:
    """One standard error of a validation score over n examples.

    Accuracy and F1: binomial, sqrt(p (1 - p) / n) (for F1 an approximation: its denominator is not n).
    Correlations (Matthews, Pearson/Spearman and their mean): (1 - r^2) / sqrt(n - 1), the large-sample SE of
    a correlation coefficient. A worst-possible score (-inf) has no SE: 0.
    """
    if not math.isfinite(value):
        return 0.0
    if metric in ("accuracy", "f1", "macro_f1"):
        return math.sqrt(max(value * (1 - value), 0.0) / n)
    if metric in ("matthews_correlation", "combined", "pearson", "spearmanr"):
        return (1 - value ** 2) / math.sqrt(n - 1)
    raise ConfigError(field="metric", value=metric, problem="has no standard error formula here",
                      fix="add one to benchmarks/run.py:standard_error")


def validation_rows(record: dict) -> int:
    """How many validation rows the recipe carved from train (it says so in metrics.json's data notes)."""
    lines = [x for x in (record.get("recipe_metrics") or {}).get("data", []) if x.startswith("validation: ")]
    if not lines or not lines[0].split()[1].isdigit():
        raise ConfigError(field="recipe_metrics.data", value=lines, problem="does not say how many validation rows "
                          "were carved from train", fix="record sweep runs with benchmarks/run.py")
    return int(lines[0].split()[1])


def sweep(exp: dict, results: Path) -> dict:
    """Where the sweep of one experiment stands: the rates to run next, or the choice and every score behind it."""
    ladder, seed = exp["learning_rates"]["ladder"], exp["sweep_seed"]
    records = {lr: _read(results / RUNS / f"{run_id(exp, lr, seed)}.json") for lr in ladder}
    ran = sorted(set(exp["learning_rates"]["start"]))
    while True:
        todo = [lr for lr in ran if records[lr] is None]
        if todo:
            return {"complete": False, "todo": todo}
        scores = {lr: _score(records[lr]) for lr in ran}
        best = max(ran, key=lambda lr: scores[lr])  # max keeps the first (smallest) rate on ties
        i = ladder.index(best)
        flat = len(ran) > 1 and len({scores[lr] for lr in ran}) == 1
        if flat:
            # Every rate scores exactly the same: the model still predicts what it did untrained (the majority
            # class, a constant). The tie-break would call the smallest rate best and walk the ladder down, to
            # steps smaller still; a flat sweep climbs instead, and is complete (learned nothing) at the top.
            top = ladder.index(ran[-1])
            if top + 1 < len(ladder):
                ran = [*ran, ladder[top + 1]]
                continue
            break
        if best == ran[0] and i > 0 and ladder[i - 1] not in ran:
            ran = [ladder[i - 1], *ran]
        elif best == ran[-1] and i + 1 < len(ladder) and ladder[i + 1] not in ran:
            ran = [*ran, ladder[i + 1]]
        else:
            break
    metric = records[best]["metric"]
    se = standard_error(metric, scores[best], validation_rows(records[best]))
    # A rate whose run predicted one class can sit within one SE of the best (MRPC's majority F1 is 0.807), but
    # a constant is no model, not a simpler one: it is never chosen while the best run predicted more than that.
    constant = [lr for lr in ran if _constant(records[lr])]
    barred = constant if best not in constant else []
    pick = min(lr for lr in ran if scores[lr] >= scores[best] - se and lr not in barred)
    return {"complete": True, "todo": [], "learning_rate": pick, "best_learning_rate": best, "standard_error": se,
            "metric": f"validation {metric} (split carved from train)", "seed": seed,
            "on_ladder_edge": best in (ladder[0], ladder[-1]) and not flat, "learned_nothing": flat,
            "scores": {f"{lr:g}": (scores[lr] if math.isfinite(scores[lr]) else None) for lr in ran},
            "constant": [f"{lr:g}" for lr in constant], "barred": [f"{lr:g}" for lr in barred]}


def select_learning_rates(experiments: list[dict], results: Path) -> dict:
    """{task: {variant: choice}} for every complete sweep; written to results/learning_rates.json."""
    chosen: dict[str, dict] = {}
    for exp in (e for e in experiments if e["stage"] == "grid"):
        state = sweep(exp, results)
        if state["complete"]:
            chosen.setdefault(exp["task"], {})[exp["variant"]] = {k: v for k, v in state.items()
                                                                  if k not in ("complete", "todo")}
    if chosen:
        old = _read(results / RATES_FILE)
        new = {"protocol": PROTOCOL, "selected": chosen}
        if old != new:
            write_json(results / RATES_FILE, new)
    return chosen


# ---- the plan ----------------------------------------------------------------------------------------
def plan(experiments: list[dict], results: Path, stage: str, tasks=None, variants=None, seeds=None,
         smoke: bool = False, order=None) -> list[dict]:
    """The runs of one stage, in the order they run; those that wait on the sweep are 'blocked'.

    The sweep goes variant by variant in ``order`` (default: make_experiments' order), then task and rate;
    seeds and the headline go seed by seed, then task and variant.
    """
    if order is None:
        from make_experiments import VARIANTS
        order = list(VARIANTS)
    order = {v: i for i, v in enumerate(order)}
    rates = {} if smoke else select_learning_rates(experiments, results)
    runs = []
    for exp in experiments:
        if (tasks and exp["task"] not in tasks) or (variants and exp["variant"] not in variants):
            continue
        wanted = []  # (lr, seed, blocked)
        if smoke:  # no sweep behind a smoke run: the middle start rate, declared in its record
            if exp["stage"] == "grid" and stage == "seeds":
                start = exp["learning_rates"]["start"]
                wanted = [(start[len(start) // 2], s, None) for s in (seeds or exp["seeds"])]
        elif exp["stage"] == "grid" and stage == "sweep":
            wanted = [(lr, exp["sweep_seed"], None) for lr in sweep(exp, results)["todo"]]
        elif exp["stage"] == "grid" and stage == "seeds":
            choice = rates.get(exp["task"], {}).get(exp["variant"])
            for s in (seeds or exp["seeds"]):
                if s == exp["sweep_seed"]:
                    continue  # the sweep's run at the chosen rate
                if choice and choice["learned_nothing"]:  # another seed would score the same constant again
                    wanted.append((math.nan, s, f"{NOT_RUN}the sweep of {exp['name']} learned nothing at any rate"))
                else:
                    wanted.append((choice["learning_rate"], s, None) if choice else
                                  (math.nan, s, f"the sweep of {exp['name']} is not complete"))
        elif exp["stage"] == stage and "rate" in exp["learning_rates"]:  # fixed: no sweep to wait for
            wanted = [(exp["learning_rates"]["rate"], s, None) for s in (seeds or exp["seeds"])]
        elif exp["stage"] == stage and stage in ("headline", "evidence"):
            source = exp["learning_rates"]["from_task"]
            choice = rates.get(source, {}).get(exp["variant"])
            # evidence asks whether the task can be learned at all: the sweep's best rate, not the one-SE choice (when
            # every rate scores level, as at the majority class, the one-SE rule picks the ladder's smallest)
            key = "best_learning_rate" if stage == "evidence" else "learning_rate"
            for s in (seeds or exp["seeds"]):
                wanted.append((choice[key], s, None) if choice else
                              (math.nan, s, f"no rate chosen for {source} x {exp['variant']} yet (its sweep)"))
        for lr, seed, blocked in wanted:
            runs.append({"experiment": exp, "learning_rate": lr, "seed": seed, "blocked": blocked, "stage": stage,
                         "id": run_id(exp, lr, seed) if not blocked else f"{exp['name']}__lr?__seed{seed}"})
    rank = (lambda r: (order.get(r["experiment"]["variant"], len(order)), r["experiment"]["task"],
                       r["experiment"]["variant"], r["learning_rate"])) if stage == "sweep" else \
        (lambda r: (r["seed"], r["experiment"]["task"], order.get(r["experiment"]["variant"], len(order)),
                    r["experiment"]["variant"]))
    return sorted(runs, key=rank)


# ---- one run -------------------------------------------------------------------------------------------
def command(run: dict, data_root: Path, out_dir: Path, python: str, recipe: Path, smoke: bool) -> list[str]:
    exp = run["experiment"]
    flags = {**exp["flags"], **(SMOKE["flags"] if smoke else {})}
    # a linear probe on cached features: the classify recipe run through benchmarks/feature_cache.py
    script = [str(ROOT / "benchmarks" / "feature_cache.py"), "--recipe"] if "feature_cache" in flags else []
    # the protocol: select on a validation split carved from train, score dev as the test set
    cmd = [python, *script, str(recipe), "--select-on-train-carve", "--data", str(data_root / exp["train_file"]),
           "--test-file", str(data_root / exp["test_file"]), "--strategy", exp["strategy"],
           "--learning-rate", f"{run['learning_rate']:g}", "--seed", str(run["seed"]),
           "--output-dir", str(out_dir), "--overwrite"]
    for key, value in exp["options"].items():
        cmd += ["--option", f"{key}={json.dumps(value)}"]
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


def claim(work: Path, rid: str) -> Path | None:
    """Take run ``rid`` for this process (two runners may share one plan); None when a live process holds it.

    The claim is a file created exclusively, holding host and pid; one left by a dead process is taken over."""
    work.mkdir(parents=True, exist_ok=True)
    path = work / f"{rid}.claim"
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            if holder_alive(path):
                return None
            path.unlink(missing_ok=True)  # its process died (kill -9, a session's end): the run is free again
            continue
        with os.fdopen(fd, "w") as f:
            f.write(f"{os.uname().nodename} {os.getpid()}\n")
        return path
    return None


def holder_alive(path: Path) -> bool:
    try:
        host, pid = path.read_text().split()
    except (OSError, ValueError):
        return True  # being written this instant: treat as held
    if host != os.uname().nodename:
        return True  # another machine's process: cannot tell, so leave it
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def execute(run: dict, args: argparse.Namespace) -> dict:
    exp = run["experiment"]
    out_dir = args.work / run["id"]
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
        "run_id": run["id"], "stage": run["stage"], "experiment": exp["name"], "task": exp["task"],
        "variant": exp["variant"], "strategy": exp["strategy"], "options": exp["options"], "seed": run["seed"],
        "learning_rate": run["learning_rate"], "smoke": args.smoke, "metric": metric,
        "test": metrics.get("test", {}), "test_primary": metrics.get("test", {}).get(metric),
        "validation": metrics.get("validation", {}), "validation_primary": metrics.get("validation", {}).get(metric),
        "best_step": metrics.get("best_step"), "steps": metrics.get("steps"), "epochs": metrics.get("epochs"),
        "max_steps": metrics.get("max_steps"), "stopped_early": metrics.get("stopped_early"),
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
    path = args.results / RUNS / f"{run['id']}.json"
    write_json(path, record)
    if args.commit:
        commit([path, args.results / RATES_FILE], f"bench: {run['id']}: {metric} {record['test_primary']} on dev "
               f"(validation {record['validation_primary']}), {record['train_seconds']} s train")
    if not args.keep_work:
        shutil.rmtree(out_dir, ignore_errors=True)
    return record


def commit(paths: list[Path], message: str) -> None:
    """Commit just these files (another runner, or a person, may be committing beside us: retry on the lock)."""
    paths = [p for p in paths if p.is_file()]
    repo = paths[0].parent
    for attempt in range(30):
        add = subprocess.run(["git", "-C", str(repo), "add", "--", *map(str, paths)], capture_output=True, text=True)
        if add.returncode == 0:
            done = subprocess.run(["git", "-C", str(repo), "commit", "-q", "-m", message, "--", *map(str, paths)],
                                  capture_output=True, text=True)
            if done.returncode == 0 or "nothing to commit" in done.stdout + done.stderr:
                return
        time.sleep(1 + attempt % 5)
    print(f"warning: could not commit {paths}: {add.stderr or done.stderr}", file=sys.stderr, flush=True)


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
    p.add_argument("--tasks", nargs="+"), p.add_argument("--variants", nargs="+", help="also the order they run in")
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
    p.add_argument("--commit", action="store_true", help="git-commit each record (and the chosen rates) as it lands")
    p.add_argument("--fail-fast", action="store_true", help="stop at the first failed run")
    args = p.parse_args(argv)
    if args.smoke:
        args.stage = "seeds"
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
    failed: list[str] = []
    for stage in (STAGES if args.stage == "all" else (args.stage,)):
        def current() -> list[dict]:
            return plan(experiments, args.results, stage, args.tasks, args.variants, args.seeds, args.smoke,
                        order=args.variants)
        runs = current()
        done = {r["id"] for r in runs if (args.results / RUNS / f"{r['id']}.json").is_file()}
        if args.list:
            for r in runs:
                blocked = r["blocked"] or ""
                status = "recorded" if r["id"] in done else (blocked if blocked.startswith(NOT_RUN) else
                                                             f"blocked: {blocked}" if blocked else
                                                             "running" if (args.work / f"{r['id']}.claim").is_file()
                                                             and holder_alive(args.work / f"{r['id']}.claim")
                                                             else "to run")
                print(f"{stage:8s} {r['id']:60s} {status}")
            continue
        missing = missing_flags([r for r in runs if not r["blocked"]], args)
        for name, flags in missing.items():
            print(f"skipping {name}: {args.recipe.name} has no {', '.join(flags)}", file=sys.stderr)
        print(f"{stage}: {len(done)} recorded, {sum(not r['blocked'] and r['id'] not in done for r in runs)} to run now, "
              f"{sum(bool(r['blocked']) for r in runs)} blocked (the sweep adds rates as results come in)", flush=True)
        count = 0
        while True:  # re-plan after every run: the sweep's next rate depends on the last result
            if (args.work / STOP_FILE).exists():
                print(f"{args.work / STOP_FILE} exists: stopping before the next run", flush=True)
                return 1 if failed else 0
            todo = [r for r in current() if not r["blocked"] and r["id"] not in failed and
                    r["experiment"]["name"] not in missing and not (args.results / RUNS / f"{r['id']}.json").is_file()]
            if not todo:
                break
            held = None
            for r in todo:
                if (held := claim(args.work, r["id"])) is not None:
                    break
            if held is None:
                break  # every runnable run is in another runner's hands
            count += 1
            try:
                if (args.results / RUNS / f"{r['id']}.json").is_file():
                    continue  # recorded by another runner between our plan and our claim
                rec = execute(r, args)
            except RuntimeError as err:
                failed.append(r["id"])
                print(err, file=sys.stderr, flush=True)
                if args.fail_fast:
                    return 1
                continue
            finally:
                held.unlink(missing_ok=True)
            print(f"[{stage} {count}] {r['id']}: {rec['metric']} {rec['test_primary']} on dev (validation "
                  f"{rec['validation_primary']}), {rec['steps']} steps{' (stopped early)' if rec['stopped_early'] else ''}, "
                  f"{rec['train_seconds']} s train, {rec['process_wall_seconds']} s process, "
                  f"load {rec['load_average']['end']}", flush=True)
        failed += [f"{name} (recipe lacks {', '.join(flags)})" for name, flags in missing.items()]
    if failed:
        print(f"{len(failed)} run(s) failed or skipped: {failed}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
