"""The learning curve on SST-2: quality by training-set size for full, lora, bottleneck, prefix and linear_probe.

    python benchmarks/learning_curve.py --list             # every planned run and whether it is recorded
    python benchmarks/learning_curve.py --commit           # one 1-thread runner; resumable; start a 2nd on an idle box
    python benchmarks/learning_curve.py --sizes 250 1000 --commit

The protocol (benchmarks/README.md, "Learning curve"): N training examples sampled (seeded) from the training
file after the recipe carves its 10% validation split from the whole file (so validation is the same 692
sentences at every N on sentence-level SST-2), a fixed optimizer-step budget per N (STEPS), the rate the SST-2
sweep chose per strategy (results/learning_rates.json; not re-swept per N), validation every sixth of the
budget, the best evaluation kept, early stopping after 2 evaluations without improvement, dev as the test set.

Pinned: the recipe and adaptkit run from a snapshot of one commit (``git archive`` into --snapshot, on
PYTHONPATH), so the refactors landing in the shared checkout during the runs cannot change them; every record
names that commit. A run that fails (a venv being upgraded under us) is logged to --work/learning_curve.log and
tried again after the others, up to --attempts times; nothing is recorded for it. A record is committed only
when it is sane (a finite dev score, the planned step budget or an early stop), and only its own file.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results" / "learning_curve"
VARIANTS = ("linear_probe", "prefix", "bottleneck_pfeiffer", "lora", "full")  # cheapest first
STRATEGY = {"bottleneck_pfeiffer": ("bottleneck", {"variant": "pfeiffer"})}
# steps per size: about 8, 4, 2.4, 1.2 and 0.6 epochs at batch 32 (the budget grows slower than the data: compute)
STEPS = {250: 60, 1000: 120, 4000: 300, 16000: 600, 67349: 1200}
SOURCE = {250: "sst2", 1000: "sst2", 4000: "sst2", 16000: "sst2_glue", 67349: "sst2_glue"}
SEEDS = (1, 2, 3)
FLAGS = {"batch_size": 32, "max_length": 128, "group_by_length": True, "validation_fraction": 0.1, "patience": 2,
         "checkpoint_every": 0, "log_every": 10, "warmup_ratio": 0.06, "weight_decay": 0.01}


def rates() -> dict[str, float]:
    chosen = json.loads((HERE / "results" / "learning_rates.json").read_text())["selected"]["sst2"]
    return {v: chosen[v]["learning_rate"] for v in VARIANTS}


def plan(sizes, seeds, variants) -> list[dict]:
    """Every run, smallest size first, then seed, then the cheapest strategy."""
    lr, runs = rates(), []
    for n in sorted(sizes):
        for seed in seeds:
            for v in variants:
                strategy, options = STRATEGY.get(v, (v, {}))
                flags = {**FLAGS, "max_steps": STEPS[n], "eval_every": max(STEPS[n] // 6, 1),
                         **({"max_train_samples": n} if n < 67349 else {}),
                         **({"feature_cache": "eval"} if v == "linear_probe" else {})}
                name = f"lc_sst2_{n}__{v}"
                exp = {"name": name, "stage": "learning_curve", "task": f"sst2_{n}", "variant": v,
                       "strategy": strategy, "options": options, "train_file": f"{SOURCE[n]}/train.tsv",
                       "test_file": f"{SOURCE[n]}/dev.tsv", "flags": flags}
                runs.append({"experiment": exp, "learning_rate": lr[v], "seed": seed, "stage": "learning_curve",
                             "id": f"{name}__lr{lr[v]:g}__seed{seed}", "train_examples": n})
    return runs


def snapshot(commit: str, folder: Path) -> Path:
    """adaptkit, recipes and benchmarks exactly as at ``commit`` (made once; reused by a resumed runner)."""
    target = folder / commit[:12]
    if not (target / "recipes" / "classify.py").is_file():
        target.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", commit, "adaptkit", "recipes", "benchmarks"],
                                 capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(target)], input=archive, check=True)
    return target


def sane(record: dict, run: dict) -> str | None:
    """Why a finished run's record is not to be trusted, or None."""
    score = record.get("test_primary")
    if not isinstance(score, (int, float)) or not math.isfinite(score):
        return f"dev score {score!r}"
    if record.get("steps") != STEPS[run["train_examples"]] and not record.get("stopped_early"):
        return f"{record.get('steps')} steps, planned {STEPS[run['train_examples']]}, not stopped early"
    return None


def log(work: Path, text: str) -> None:
    work.mkdir(parents=True, exist_ok=True)
    line = f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} pid {os.getpid()} {text}"
    print(line, flush=True)
    with open(work / "learning_curve.log", "a") as f:
        f.write(line + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", type=int, default=sorted(STEPS), choices=sorted(STEPS))
    p.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--pin", default="HEAD", help="the commit whose adaptkit and recipe run (default: HEAD now)")
    p.add_argument("--snapshot", type=Path, default=Path("/tmp/adaptkit-lc-snapshot"))
    p.add_argument("--work", type=Path, default=HERE / "work")
    p.add_argument("--data-root", type=Path, default=Path(os.environ.get("ADAPTKIT_DATA", ROOT.parent / "shared/data")))
    p.add_argument("--python", default=sys.executable)
    p.add_argument("--attempts", type=int, default=3)
    p.add_argument("--retry-wait", type=float, default=300, help="seconds before a failed run is tried again")
    p.add_argument("--commit", action="store_true")
    p.add_argument("--list", action="store_true")
    args = p.parse_args(argv)
    runs = plan(args.sizes, args.seeds, args.variants)
    recorded = lambda r: (RESULTS / "records" / f"{r['id']}.json").is_file()  # noqa: E731
    if args.list:
        for r in runs:
            print(f"{r['id']:60s} {'recorded' if recorded(r) else 'to run'}")
        return 0
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", args.pin], capture_output=True, text=True,
                            check=True).stdout.strip()
    snap = snapshot(commit, args.snapshot)
    sys.path.insert(0, str(snap / "benchmarks"))
    import run as runner  # the pinned runner: its execute() records exactly as the GLUE grid's records

    os.environ["PYTHONPATH"] = str(snap)  # the recipe's `import adaptkit` finds the snapshot before the editable install
    ns = argparse.Namespace(work=args.work / "lc", data_root=args.data_root, python=args.python,
                            recipe=snap / "recipes" / "classify.py", smoke=False, threads=1, results=RESULTS,
                            commit=False, keep_work=False)
    failures: dict[str, int] = {}
    not_before: dict[str, float] = {}
    while True:
        if (args.work / runner.STOP_FILE).exists():
            log(args.work, "STOP file: exiting")
            return 0
        todo = [r for r in runs if not recorded(r) and failures.get(r["id"], 0) < args.attempts]
        ready = [r for r in todo if not_before.get(r["id"], 0) <= time.time()]
        if not todo:
            log(args.work, f"done: {sum(map(recorded, runs))}/{len(runs)} recorded, gave up on "
                f"{[k for k, v in failures.items() if v >= args.attempts]}")
            return 0
        if not ready:
            time.sleep(30)
            continue
        held = next(((r, c) for r in ready if (c := runner.claim(args.work, r["id"])) is not None), None)
        if held is None:
            time.sleep(30)  # all in another runner's hands
            continue
        r, claim_file = held
        try:
            record = runner.execute(r, ns)
        except Exception as err:  # noqa: BLE001 - any failure: log, try again later, record nothing
            failures[r["id"]] = failures.get(r["id"], 0) + 1
            not_before[r["id"]] = time.time() + args.retry_wait
            log(args.work, f"FAILED {r['id']} (attempt {failures[r['id']]}): {str(err)[-600:]}")
            continue
        finally:
            claim_file.unlink(missing_ok=True)
        path = RESULTS / "records" / f"{r['id']}.json"
        record.update(train_examples=r["train_examples"], step_budget=STEPS[r["train_examples"]],
                      pinned_commit=commit, snapshot=str(snap))
        if (why := sane(record, r)) is not None:
            path.rename(args.work / f"{r['id']}.rejected.json")
            failures[r["id"]] = failures.get(r["id"], 0) + 1
            log(args.work, f"REJECTED {r['id']}: {why}; moved to {args.work}")
            continue
        runner.write_json(path, record)
        if args.commit:
            runner.commit([path], f"bench learning curve: {r['id']}: {record['metric']} {record['test_primary']} "
                          f"on dev, {record['steps']} steps, {record['process_wall_seconds']} s process")
        log(args.work, f"recorded {r['id']}: {record['test_primary']} on dev, {record['steps']} steps, "
            f"{record['process_wall_seconds']} s, load {record['load_average']['end']}")


if __name__ == "__main__":
    sys.exit(main())
