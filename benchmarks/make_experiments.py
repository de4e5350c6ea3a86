"""Write benchmarks/experiments/*/*.json from the declared budgets and learning-rate candidates below.

    python benchmarks/make_experiments.py           # (re)write the experiment files
    python benchmarks/make_experiments.py --check   # fail if the committed files differ from this table

The JSON files are the experiments (the runner reads only them); this script exists so that the 42
files cannot drift from one declared table. Why these numbers: benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
EXPERIMENTS = HERE / "experiments"

# Optimizer steps per task, the same for every strategy (batch 32, at most 128 tokens, length-grouped
# batches). Sized so that one seed of the whole grid takes about an hour on 2 CPU cores (README).
STEPS = {"sst2": 250, "cola": 250, "mrpc": 150, "rte": 100, "stsb": 200}
EVALUATIONS = 4  # validation passes per run (on the split carved from train); the best one is tested

# variant -> (strategy, options, learning-rate candidates for the sweep, recipe flags of its own).
# The first sweep had three candidates each and every variant chose its largest, so two larger ones
# were added to each: a best rate on the edge of the range says the range was too narrow.
VARIANTS = {
    "full": ("full", {}, [2e-5, 5e-5, 1e-4, 2e-4, 3e-4, 5e-4], {}),  # 3e-4 won the widened sweep: 5e-4 added
    "lora": ("lora", {}, [2e-4, 5e-4, 1e-3, 2e-3, 5e-3], {}),
    "bottleneck_pfeiffer": ("bottleneck", {"variant": "pfeiffer"}, [3e-4, 1e-3, 3e-3, 1e-2, 3e-2], {}),
    "bottleneck_houlsby": ("bottleneck", {"variant": "houlsby"}, [3e-4, 1e-3, 3e-3, 1e-2, 3e-2], {}),
    "prefix": ("prefix", {}, [3e-3, 1e-2, 3e-2, 1e-1, 3e-1], {}),
    # the frozen encoder runs once per example (adaptkit.recipes.features); eval-mode features: README
    "linear_probe": ("linear_probe", {}, [3e-3, 1e-2, 3e-2, 1e-1, 3e-1], {"feature_cache": "eval"}),
    # the same probe on mean-pooled features, which sentence-transformers checkpoints such as MiniLM are
    # trained to produce (the default reads BERT's first-token pooler, which MiniLM never trained)
    # (its sweep began at 3e-3 like the other probe's and chose that edge, so two smaller candidates were added)
    "linear_probe_mean": ("linear_probe", {"pooling": "mean"}, [3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1],
                          {"feature_cache": "eval"}),
    "ia3": ("ia3", {}, [1e-3, 3e-3, 1e-2, 3e-2, 1e-1], {}),
}

COMMON_FLAGS = {"batch_size": 32, "max_length": 128, "group_by_length": True, "validation_fraction": 0.1,
                "patience": 0, "checkpoint_every": 0, "log_every": 1, "warmup_ratio": 0.06, "weight_decay": 0.01}
GRID_SEEDS = [1, 2, 3]
SWEEP_TASK, SWEEP_SEEDS = "sst2", [0]


def experiment(stage: str, task: str, variant: str) -> dict:
    strategy, options, candidates, own_flags = VARIANTS[variant]
    steps = STEPS[task]
    return {
        "name": f"{task}__{variant}", "stage": stage, "task": task, "variant": variant,
        "strategy": strategy, "options": options,
        "learning_rates": candidates if stage == "lr_sweep" else "selected",
        "seeds": SWEEP_SEEDS if stage == "lr_sweep" else GRID_SEEDS,
        # GLUE ships train + dev: dev is the test set; validation is carved from train by the recipe
        "train_file": f"{task}/train.tsv", "test_file": f"{task}/dev.tsv",
        "flags": {**COMMON_FLAGS, "max_steps": steps, "eval_every": -(-steps // EVALUATIONS), **own_flags},
    }


def all_experiments() -> dict[Path, dict]:
    out = {}
    for variant in VARIANTS:
        out[EXPERIMENTS / "lr_sweep" / f"{SWEEP_TASK}__{variant}.json"] = experiment("lr_sweep", SWEEP_TASK, variant)
        for task in STEPS:
            out[EXPERIMENTS / "grid" / f"{task}__{variant}.json"] = experiment("grid", task, variant)
    return out


def render(data: dict) -> str:
    return json.dumps(data, indent=2) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 when a file differs")
    args = parser.parse_args(argv)
    wanted = all_experiments()
    on_disk = set(EXPERIMENTS.glob("*/*.json")) if EXPERIMENTS.is_dir() else set()
    stale = sorted(on_disk - set(wanted))
    differ = sorted(p for p, d in wanted.items() if not p.is_file() or p.read_text() != render(d))
    if args.check:
        for p in differ + stale:
            print(f"out of date: {p.relative_to(HERE)}")
        return 1 if differ or stale else 0
    for p in stale:
        p.unlink()
    for p in differ:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(render(wanted[p]))
    print(f"{len(wanted)} experiments, {len(differ)} written, {len(stale)} removed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
