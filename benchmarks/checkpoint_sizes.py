"""Measure the size of a recipe checkpoint and of the saved adapter, per strategy, on the bundled MiniLM.

    ADAPTKIT_DATA=../shared/data python benchmarks/checkpoint_sizes.py     # markdown table on stdout

Each row runs ``recipes/classify.py`` on SST-2 for 3 optimizer steps (batch 8) with a checkpoint at
step 2, then sums the bytes of ``checkpoints/step-*`` (weights, optimizer and scheduler state, RNG,
run state) and of ``adapter/``, the folder the run saves.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STRATEGIES = ["lora", "bottleneck", "prefix", "linear_probe", "full", "ia3"]


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def main() -> None:
    data = Path(os.environ.get("ADAPTKIT_DATA", ROOT.parent / "shared" / "data")) / "sst2"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT)}
    print("| strategy | checkpoint | of which weights | saved adapter |")
    print("|---|---:|---:|---:|")
    for strategy in STRATEGIES:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "run"
            subprocess.run([sys.executable, str(ROOT / "recipes" / "classify.py"), "--data", str(data),
                            "--strategy", strategy, "--output-dir", str(out), "--max-steps", "3",
                            "--checkpoint-every", "2", "--batch-size", "8", "--max-train-samples", "64",
                            "--max-eval-samples", "32"], env=env, check=True, capture_output=True)
            (checkpoint,) = (out / "checkpoints").glob("step-*")
            weights = sum(p.stat().st_size for p in checkpoint.glob("model*.safetensors"))
            print(f"| {strategy} | {folder_bytes(checkpoint) / 1e6:.2f} MB | {weights / 1e6:.2f} MB | "
                  f"{folder_bytes(out / 'adapter') / 1e6:.2f} MB |", flush=True)


if __name__ == "__main__":
    main()
