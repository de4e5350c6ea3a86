"""Compare the five strategies: adapt the bundled all-MiniLM-L6-v2 to SST-2 with each, same budget, one table.

This is ``make run``. Each strategy runs ``recipes/classify.py`` in its own process (so peak memory
and time are its own), for the same number of optimizer steps on the same batches; then the table
reads each run's ``metrics.json``:

    python recipes/compare.py                          # all five, ~12 minutes on 2 CPU cores
    python recipes/compare.py --strategies lora full --steps 400

Data: ``$ADAPTKIT_DATA/sst2`` when ADAPTKIT_DATA is set (train.tsv for training, dev.tsv as the test
set, as GLUE does), else the hub's ``glue`` ``sst2`` (needs a network). A validation split is carved
from train for picking each run's best adapter; "dev accuracy" is that adapter, reloaded, on dev.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from adaptkit.errors import DataError

STRATEGIES = ["linear_probe", "prefix", "bottleneck", "lora", "full"]
CLASSIFY = Path(__file__).resolve().parent / "classify.py"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--strategies", nargs="+", default=STRATEGIES)
    parser.add_argument("--steps", type=int, default=150, help="optimizer steps per strategy (batch 32)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=64, help="SST-2 sentences average ~25 tokens")
    parser.add_argument("--model", help="default: the bundled all-MiniLM-L6-v2")
    parser.add_argument("--output-dir", type=Path, default=Path("outputs/compare"))
    parser.add_argument("--data", help="a folder holding train.tsv and dev.tsv (default: $ADAPTKIT_DATA/sst2, "
                                       "else the hub's glue/sst2)")
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                        help="everything after --extra goes to every classify.py run")
    return parser.parse_args(argv)


def data_args(folder: str | None) -> list[str]:
    folder = folder or (str(Path(os.environ["ADAPTKIT_DATA"]) / "sst2") if os.environ.get("ADAPTKIT_DATA") else None)
    if folder is None:
        # GLUE's test labels are hidden: select on a carve from train, score its validation split as the test set
        return ["--dataset-name", "nyu-mll/glue", "--dataset-config", "sst2", "--metrics", "sst2", "--select-on-train-carve"]
    train, dev = Path(folder) / "train.tsv", Path(folder) / "dev.tsv"
    if not (train.is_file() and dev.is_file()):
        raise DataError(field="--data", value=folder, problem="needs train.tsv and dev.tsv",
                        fix="point ADAPTKIT_DATA at a folder holding sst2/train.tsv and sst2/dev.tsv, or unset it "
                            "to use the hub's glue/sst2")
    # dev is the test set (GLUE convention); validation is carved from train
    return ["--train-file", str(train), "--test-file", str(dev), "--metrics", "sst2"]


def run_one(strategy: str, args: argparse.Namespace, data: list[str]) -> tuple[dict | None, float, Path]:
    out = args.output_dir / strategy
    out.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, str(CLASSIFY), *data, "--strategy", strategy, "--output-dir", str(out),
               "--overwrite", "--max-steps", str(args.steps), "--batch-size", str(args.batch_size),
               "--max-length", str(args.max_length), "--eval-every", str(max(1, args.steps // 2)),
               "--patience", "0", "--checkpoint-every", "0", *(["--model", args.model] if args.model else []),
               *args.extra]
    log = out / "output.log"
    start = time.perf_counter()
    with open(log, "w") as handle:
        code = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT).returncode
    seconds = time.perf_counter() - start
    metrics = json.loads((out / "metrics.json").read_text()) if code == 0 else None
    return metrics, seconds, log


def table(rows: list[dict]) -> str:
    head = ["strategy", "dev accuracy", "trainable", "trainable %", "adapter MB", "train time", "peak memory"]
    lines = [head]
    for m in rows:
        lines.append([m["strategy"]["strategy"], f"{m['test']['accuracy']:.3f}", f"{m['trainable_parameters']:,}",
                      f"{m['trainable_percent']:.2f}%", f"{m['adapter_bytes'] / 1e6:.2f}",
                      f"{m['train_seconds']:.0f} s", f"{m['peak_rss_bytes'] / 2**30:.2f} GiB"])
    widths = [max(len(row[i]) for row in lines) for i in range(len(head))]
    fmt = lambda row: "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
    return "\n".join([fmt(lines[0]), "  ".join("-" * w for w in widths), *map(fmt, lines[1:])])


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    data = data_args(args.data)
    print(f"Adapting MiniLM to SST-2 with {len(args.strategies)} strategies, {args.steps} steps x batch "
          f"{args.batch_size} each ({' '.join(data)}). Logs: {args.output_dir}/<strategy>/output.log", flush=True)
    rows, failed, start = [], [], time.perf_counter()
    for i, strategy in enumerate(args.strategies, 1):
        print(f"[{i}/{len(args.strategies)}] {strategy} ...", end=" ", flush=True)
        metrics, seconds, log = run_one(strategy, args, data)
        if metrics is None:
            failed.append(strategy)
            tail = log.read_text().strip().splitlines()[-15:]
            print(f"FAILED after {seconds:.0f} s; last lines of {log}:", *tail, sep="\n    ", flush=True)
            continue
        rows.append(metrics)
        print(f"dev accuracy {metrics['test']['accuracy']:.3f} ({seconds:.0f} s)", flush=True)
    print()
    if rows:
        print(table(rows))
        (args.output_dir / "comparison.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(f"\ntotal {time.perf_counter() - start:.0f} s; train time excludes evaluation and start-up; peak memory "
          "is each run's peak resident set size")
    if failed:
        sys.exit(f"failed: {', '.join(failed)} (see their output.log)")
    return rows


if __name__ == "__main__":
    main()
