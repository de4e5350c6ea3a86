"""Write benchmarks/experiments/*/*.json from the declared protocol below (benchmarks/README.md, "Protocol").

    python benchmarks/make_experiments.py           # (re)write the experiment files
    python benchmarks/make_experiments.py --check   # fail if the committed files differ from this table

The JSON files are the experiments (the runner reads only them); this script exists so that the files
cannot drift from one declared table. Why these numbers: benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
EXPERIMENTS = HERE / "experiments"

# Rows in each task's train.tsv (the shared data README lists them with their sha256); 10% is carved off for
# validation, so an epoch is ceil(0.9 * rows / 32) optimizer steps.
TRAIN_ROWS = {"sst2": 6920, "cola": 8551, "mrpc": 3668, "rte": 2490, "stsb": 5749, "sst2_glue": 67349}
BATCH, VALIDATION_FRACTION = 32, 0.1
# Epochs per task, the same for every strategy: a ceiling, since early stopping ends a run after PATIENCE
# evaluations without improvement on validation. Three epochs is the usual GLUE budget (BERT's paper: 2-4).
EPOCHS = {"sst2": 3, "cola": 3, "mrpc": 3, "rte": 3, "stsb": 3}
EVALS_PER_EPOCH, PATIENCE = 2, 2  # validation every half epoch; stop after one epoch without improvement

# variant -> (strategy, options, learning-rate ladder, the rungs the sweep starts from, recipe flags of its own).
# The sweep runs the start rungs; while the best validation score sits on an edge of what ran, it adds the next
# rung beyond that edge (the ladder bounds it), so every chosen rate has a worse one on either side or is a bound.
VARIANTS = {
    "full": ("full", {}, [1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4], [2e-5, 5e-5, 1e-4], {}),
    "lora": ("lora", {}, [1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3], [5e-4, 1e-3, 2e-3], {}),
    "bottleneck_pfeiffer": ("bottleneck", {"variant": "pfeiffer"}, [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2],
                            [3e-4, 1e-3, 3e-3], {}),
    "bottleneck_houlsby": ("bottleneck", {"variant": "houlsby"}, [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2],
                           [3e-4, 1e-3, 3e-3], {}),
    "prefix": ("prefix", {}, [1e-3, 3e-3, 1e-2, 3e-2, 1e-1], [3e-3, 1e-2, 3e-2], {}),
    # adaptkit's default probe: pooling "auto" follows the checkpoint (mean for all-MiniLM-L6-v2); the frozen
    # encoder runs once per example (benchmarks/feature_cache.py), in eval mode (README). An epoch costs a
    # fraction of a second, so the whole ladder runs.
    "linear_probe": ("linear_probe", {}, [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1],
                     [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1], {"feature_cache": "eval"}),
    "ia3": ("ia3", {}, [1e-3, 3e-3, 1e-2, 3e-2, 1e-1], [3e-3, 1e-2, 3e-2], {}),
}
SEEDS, SWEEP_SEED = [1, 2, 3], 1  # the sweep runs seed 1; its run at the chosen rate is that cell's seed 1
# The headline: full fine-tuning and LoRA on GLUE's 67k-phrase SST-2 train set, at the rates the sweep chose
# on the sentence-level SST-2 (the 67k set is too big to sweep here), one seed.
HEADLINE = {"task": "sst2_glue", "rates_from": "sst2", "variants": ["full", "lora"], "epochs": 3, "seeds": [1]}
# The headline with a longer budget, added 2026-12-01 before its runs (README, "Protocol"): at 3 epochs full
# fine-tuning reached 0.889, under the 0.90 goal, with its best validation score at its last evaluation (still
# improving). The same runs with up to 6 epochs, stopping after 3 epochs without improvement, say whether the
# budget or the model stands between it and the goal. Named "<task>__<variant>__long"; the 3-epoch rows stay.
# Full fine-tuning only since 2026-12-02: LoRA's long run had a frozen pooler, and LoRA's cells run again with it
# trained (README, "Protocol"); the question was full fine-tuning's budget (answered: 0.890 against 0.889), so
# LoRA's 3-epoch headline alone runs again.
HEADLINE_LONG = {"epochs": 6, "patience": 6, "variants": ["full"]}
# The headline at a lower rate, added 2026-12-02 before its run: 6 epochs at sst2's chosen rate (5e-5) gave 0.890,
# the same as 3, so the budget is not what stands between full fine-tuning and the goal. The rate was chosen on
# the 6,920-sentence SST-2 (~650 steps in 3 epochs); the 67k set takes ~6,300, and the usual choice for that many
# steps is lower (BERT's GLUE runs: 2e-5 to 5e-5). One run of full fine-tuning, 3 epochs, at the ladder's rung
# below the chosen one, asks whether the rate is. Named "<task>__full__low_rate"; the rate is fixed, not swept.
HEADLINE_LOW_RATE = {"variant": "full", "rate": 2e-5}

# Evidence, added 2026-12-01 before its runs (README, "Protocol"): where full fine-tuning stayed at the majority
# class through its whole 3-epoch sweep (MRPC, RTE), one longer run at that sweep's best rate shows whether
# MiniLM can learn the task at all: 10 epochs, stopping only after 3 epochs without improvement. Reported
# beside the grid, never in its cells.
EVIDENCE = {"tasks": ["mrpc", "rte"], "variants": ["full"], "epochs": 10, "patience": 6, "seeds": [1]}

COMMON_FLAGS = {"batch_size": BATCH, "max_length": 128, "group_by_length": True,
                "validation_fraction": VALIDATION_FRACTION, "patience": PATIENCE, "checkpoint_every": 0,
                "log_every": 10, "warmup_ratio": 0.06, "weight_decay": 0.01}


def steps_per_epoch(task: str) -> int:
    return math.ceil(TRAIN_ROWS[task] * (1 - VALIDATION_FRACTION) / BATCH)


def _flags(task: str, epochs: int, own: dict) -> dict:
    return {**COMMON_FLAGS, "epochs": epochs, "eval_every": math.ceil(steps_per_epoch(task) / EVALS_PER_EPOCH),
            **own}


def _experiment(stage: str, name: str, task: str, variant: str, epochs: int, learning_rates: dict,
                sweep_seed: int | None, seeds: list[int], **flags) -> dict:
    strategy, options, _, _, own_flags = VARIANTS[variant]
    return {
        "name": name, "stage": stage, "task": task, "variant": variant, "strategy": strategy, "options": options,
        "learning_rates": learning_rates, "sweep_seed": sweep_seed, "seeds": seeds,
        # GLUE ships train + dev: dev is the test set; validation is carved from train by the recipe
        "train_file": f"{task}/train.tsv", "test_file": f"{task}/dev.tsv",
        "flags": {**_flags(task, epochs, own_flags), **flags},
    }


def experiment(task: str, variant: str) -> dict:
    _, _, ladder, start, _ = VARIANTS[variant]
    return _experiment("grid", f"{task}__{variant}", task, variant, EPOCHS[task], {"ladder": ladder, "start": start},
                       SWEEP_SEED, SEEDS)


def headline(variant: str, long: bool = False) -> dict:
    task, flags = HEADLINE["task"], {"patience": HEADLINE_LONG["patience"]} if long else {}
    return _experiment("headline", f"{task}__{variant}" + ("__long" if long else ""), task, variant,
                       HEADLINE_LONG["epochs"] if long else HEADLINE["epochs"], {"from_task": HEADLINE["rates_from"]},
                       None, HEADLINE["seeds"], **flags)


def headline_low_rate() -> dict:
    task = HEADLINE["task"]
    return _experiment("headline", f"{task}__{HEADLINE_LOW_RATE['variant']}__low_rate", task,
                       HEADLINE_LOW_RATE["variant"], HEADLINE["epochs"], {"rate": HEADLINE_LOW_RATE["rate"]}, None,
                       HEADLINE["seeds"])


def evidence(task: str, variant: str) -> dict:
    return _experiment("evidence", f"{task}__{variant}__long", task, variant, EVIDENCE["epochs"], {"from_task": task},
                       None, EVIDENCE["seeds"], patience=EVIDENCE["patience"])


def all_experiments() -> dict[Path, dict]:
    out = {}
    for variant in VARIANTS:
        for task in EPOCHS:
            out[EXPERIMENTS / "grid" / f"{task}__{variant}.json"] = experiment(task, variant)
    for variant in HEADLINE["variants"]:
        out[EXPERIMENTS / "headline" / f"{HEADLINE['task']}__{variant}.json"] = headline(variant)
        if variant in HEADLINE_LONG["variants"]:
            out[EXPERIMENTS / "headline" / f"{HEADLINE['task']}__{variant}__long.json"] = headline(variant, long=True)
    low = headline_low_rate()
    out[EXPERIMENTS / "headline" / f"{low['name']}.json"] = low
    for task in EVIDENCE["tasks"]:
        for variant in EVIDENCE["variants"]:
            out[EXPERIMENTS / "evidence" / f"{task}__{variant}.json"] = evidence(task, variant)
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
