"""Memory and step time at a realistic size: a ~0.5B-parameter Llama built from a config, against `adaptkit estimate`.

    OMP_NUM_THREADS=1 python benchmarks/big_model.py                       # 5 configurations, seq 512, batch 1
    python benchmarks/big_model.py --configs lora,lora_4bit --steps 3       # a subset
    python benchmarks/big_model.py --size tiny --out /tmp/tiny.json        # seconds: what CI runs

The model is ``LlamaForCausalLM`` with random weights (time and memory do not depend on the values):
hidden 1024, 32 layers, 16 heads, MLP 2816, vocabulary 32,000, untied embeddings: 477M parameters.
It is written once (bf16 safetensors) to ``--cache`` and loaded from there with
``adaptkit.load_model``, so the 8-bit and 4-bit rows go through bitsandbytes as users' runs do.

Configurations: ``full`` (fp32 weights, AdamW), ``lora`` (r=8 on every linear layer, fp32 base),
``lora_gc`` (the same with non-reentrant gradient checkpointing), ``lora_8bit`` (int8 base, the rest
fp32) and ``lora_4bit`` (QLoRA as its paper runs it: nf4, double quantization, bf16 compute, the
unquantized rest - embeddings, norms, ``lm_head`` - in bf16). Each runs in its own process, one at a time, so its
peak is its own: the process first runs two steps of a tiny Llama (imports, kernels, thread pools) and
records its resident memory as the baseline; it then loads and adapts the model, reads every weight
once, resets the kernel's peak counter (``/proc/self/clear_refs``), trains ``--steps`` AdamW steps on
random tokens and reads ``VmHWM``. ``measured = VmHWM - baseline`` is what the training took; on
CUDA it is ``torch.cuda.max_memory_allocated``. Step time is the median of the steps after the first
(the first creates AdamW's states). Workers run with ``MALLOC_MMAP_THRESHOLD_=65536`` (freed buffers go
back to the OS; glibc's default keeps them and inflates RSS, see estimate_vs_measured.py).

Before a worker starts, ``adaptkit.estimate``'s peak for it (+25%) must fit in ``MemAvailable`` and
under ``--max-gb``; otherwise it waits for the machine (up to ``--wait`` seconds), then skips the row
and says why. Writes ``--out`` as JSON with the command, versions and machine load.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

SIZES = {  # LlamaConfig fields
    "0.5b": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=32, num_attention_heads=16,
                 num_key_value_heads=16, vocab_size=32000, max_position_embeddings=2048, tie_word_embeddings=False),
    "tiny": dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4, vocab_size=512, max_position_embeddings=256, tie_word_embeddings=False),
}
CONFIGS = {  # name -> (strategy, quantization, gradient checkpointing)
    "full": ("full", None, False),
    "lora": ("lora", None, False),
    "lora_gc": ("lora", None, True),
    "lora_8bit": ("lora", "8bit", False),
    "lora_4bit": ("lora", "4bit", False),
    "lora_bf16": ("lora", None, False),  # bf16 base (gpu_check.py)
    "full_bf16": ("full", None, False),  # pure bf16 full fine-tuning (gpu_check.py)
}
DEFAULT_CONFIGS = ("full", "lora", "lora_gc", "lora_8bit", "lora_4bit")
REST_DTYPE = {"lora_4bit": "bfloat16", "lora_bf16": "bfloat16", "full_bf16": "bfloat16"}  # where not --dtype
GOALS = {"lora": 0.35, "lora_4bit": 0.20}  # peak memory / full fine-tuning's (issue 13)
ESTIMATE_GOAL = 0.15


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {key}")


def mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def model_folder(size: str, cache: Path) -> Path:
    """The random-weight Llama of ``size``, written once as bf16 safetensors (half the disk of fp32)."""
    import torch
    import transformers
    folder = cache / f"llama-{size}"
    if (folder / "config.json").is_file():
        return folder
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**SIZES[size], pad_token_id=0)
    model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    tmp = cache / f".llama-{size}.tmp-{os.getpid()}"
    model.save_pretrained(tmp)
    del model
    gc.collect()
    os.replace(tmp, folder)
    return folder


def _steps(model, batch: int, seq: int, steps: int, vocab: int, device: str) -> list[float]:
    import torch
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    generator = torch.Generator().manual_seed(0)
    model.train()
    times = []
    for _ in range(steps):
        ids = torch.randint(5, vocab, (batch, seq), generator=generator).to(device)
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


def worker(name: str, folder: Path, batch: int, seq: int, steps: int, device: str, dtype: str) -> dict:
    """Runs in its own process: peak memory and step time of ``steps`` training steps of one configuration."""
    import torch
    import transformers

    import adaptkit
    from adaptkit.quantization import enable_checkpointing, load_model
    strategy, quantization, checkpointing = CONFIGS[name]
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    transformers.logging.set_verbosity_error()
    warm = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SIZES["tiny"], pad_token_id=0))
    _steps(adaptkit.adapt(warm.to(device), strategy), 1, 16, 2, 512, device)
    del warm
    gc.collect()
    baseline = _status("VmRSS")
    if device == "cuda":
        torch.cuda.empty_cache()
        base_gpu = torch.cuda.memory_allocated()
    started = time.perf_counter()
    model = load_model(str(folder), "causal_lm", quantization, dtype=getattr(torch, REST_DTYPE.get(name, dtype)))
    if checkpointing:
        enable_checkpointing(model)
    model = adaptkit.adapt(model, strategy)
    if device == "cuda" and not quantization:
        model.to("cuda")
    with torch.no_grad():  # read every weight once (memory-mapped weights count only once read)
        for p in model.parameters():
            p.float().sum() if p.is_floating_point() else p.sum()
    gc.collect()
    load_seconds = time.perf_counter() - started
    loaded = _status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM from here on: the steps alone
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = _steps(model, batch, seq, steps, model.config.vocab_size, device)
    summary = adaptkit.summary(model)
    out = {"config": name, "strategy": strategy, "quantization": quantization, "gradient_checkpointing": checkpointing,
           "baseline_rss": baseline, "after_load_rss": loaded, "peak_rss": _status("VmHWM"),
           "measured": _status("VmHWM") - baseline, "step_seconds": sorted(times[1:] or times)[len(times[1:] or times) // 2],
           "step_times": times, "load_seconds": load_seconds, "trainable": summary.trainable, "total": summary.total,
           "footprint_bytes": summary.footprint_bytes}
    if device == "cuda":
        out["measured"] = torch.cuda.max_memory_allocated() - base_gpu
        out["peak_gpu_bytes"] = torch.cuda.max_memory_allocated()
    return out


def estimate_rows(folder: Path, names: list[str], batch: int, seq: int, dtype: str, device: str) -> dict[str, dict]:
    from adaptkit.estimate import estimate
    rows = {}
    for name in names:
        strategy, quantization, checkpointing = CONFIGS[name]
        if checkpointing:  # estimate has no checkpointing mode: say so rather than print a wrong number
            rows[name] = {"peak": None, "method": "not modelled: adaptkit estimate has no gradient-checkpointing mode"}
            continue
        est = estimate(str(folder), [strategy], batch_size=batch, seq_len=seq, dtype=REST_DTYPE.get(name, dtype),
                       quantization=quantization, device=device)
        row = est.row(strategy)
        rows[name] = {"peak": row.peak, "weights": row.weights, "gradients": row.gradients,
                      "optimizer": row.optimizer, "activations": row.activations, "method": row.method,
                      "step_cost": row.step_cost}
    return rows


def run_worker(name: str, folder: Path, args) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MALLOC_MMAP_THRESHOLD_": "65536"}
    command = [sys.executable, __file__, "--worker", name, "--folder", str(folder), "--batch-size",
               str(args.batch_size), "--seq-len", str(args.seq_len), "--steps", str(args.steps), "--device",
               args.device, "--dtype", args.dtype]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=3600)
    if done.returncode != 0:
        return {"config": name, "error": done.stderr[-2000:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def wait_for_memory(needed: int, args) -> str | None:
    """None when ``needed`` bytes fit now (or within ``--wait`` seconds); else why not."""
    if needed > args.max_gb * 2**30:
        return f"needs ~{needed / 2**30:.1f} GiB by the estimate (+25%), over --max-gb {args.max_gb}"
    deadline = time.time() + args.wait
    while mem_available() < needed + 2 * 2**30:
        if time.time() > deadline:
            return f"MemAvailable {mem_available() / 2**30:.1f} GiB < {needed / 2**30:.1f} GiB + 2 GiB margin"
        print(f"  waiting: MemAvailable {mem_available() / 2**30:.1f} GiB", flush=True)
        time.sleep(20)
    return None


def report(rows: list[dict], estimates: dict[str, dict]) -> list[str]:
    full = next((r for r in rows if r["config"] == "full" and "measured" in r), None)
    lines = [f"{'config':>10}  {'measured MB':>11}  {'estimate MB':>11}  {'meas/est':>8}  {'vs full':>7}  "
             f"{'goal':>6}  {'step s':>7}  {'vs full':>7}  {'trainable':>11}"]
    for r in rows:
        if "measured" not in r:
            lines.append(f"{r['config']:>10}  not run: {r.get('skipped') or r.get('error', '')[-300:]}")
            continue
        est = estimates.get(r["config"], {}).get("peak")
        r["estimate_ratio"] = r["measured"] / est if est else None
        r["memory_vs_full"] = r["measured"] / full["measured"] if full else None
        r["time_vs_full"] = r["step_seconds"] / full["step_seconds"] if full else None
        goal = GOALS.get(r["config"])
        lines.append(f"{r['config']:>10}  {r['measured'] / 1e6:11.0f}  {(est or 0) / 1e6:11.0f}  "
                     f"{r['estimate_ratio'] or float('nan'):8.2f}  {r['memory_vs_full'] or float('nan'):7.3f}  "
                     f"{f'<={goal}' if goal else '':>6}  {r['step_seconds']:7.2f}  {r['time_vs_full'] or float('nan'):7.3f}  "
                     f"{r['trainable']:11,}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="0.5b")
    parser.add_argument("--configs", default=",".join(DEFAULT_CONFIGS))
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", default="float32", help="dtype of the unquantized weights")
    parser.add_argument("--max-gb", type=float, default=12.0, help="skip a configuration estimated above this")
    parser.add_argument("--wait", type=int, default=600, help="seconds to wait for free memory before skipping")
    parser.add_argument("--cache", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "adaptkit-bench")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "big_model.json")
    parser.add_argument("--update", action="store_true", help="replace only these configurations' rows in --out")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.folder, args.batch_size, args.seq_len, args.steps, args.device,
                                args.dtype)))
        return

    from provenance import load_average, stamp
    names = [n for n in args.configs.split(",") if n]
    unknown = sorted(set(names) - set(CONFIGS))
    if unknown:
        parser.error(f"--configs {unknown}: choose from {sorted(CONFIGS)}")
    args.cache.mkdir(parents=True, exist_ok=True)
    folder = model_folder(args.size, args.cache)
    load_before = load_average()
    estimates = estimate_rows(folder, names, args.batch_size, args.seq_len, args.dtype, args.device)
    rows = []
    for name in names:
        known = estimates[name]["peak"] or max(e["peak"] or 0 for e in estimates.values())  # lora_gc: lora's
        why = wait_for_memory(int(1.25 * known), args) if args.device == "cpu" else None
        if why:
            rows.append({"config": name, "skipped": why})
            print(f"{name}: skipped, {why}", flush=True)
            continue
        row = run_worker(name, folder, args)
        rows.append(row)
        print(f"{name}: {row.get('measured', 0) / 1e6:.0f} MB, step {row.get('step_seconds', float('nan')):.2f} s"
              if "measured" in row else f"{name}: FAILED {row['error'][-500:]}", flush=True)
    if args.update and args.out.is_file():  # keep the other configurations' rows from the earlier run
        earlier = json.loads(args.out.read_text())
        rows = [r for r in earlier["rows"] if r["config"] not in names] + rows
        rows.sort(key=lambda r: list(CONFIGS).index(r["config"]))
        estimates = {**earlier["estimates"], **estimates}
        args.updated_from = earlier.get("command")
    lines = report(rows, estimates)
    print("\n".join(lines))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "earlier_rows_from": getattr(args, "updated_from", None), "size": args.size, "model": SIZES[args.size],
        "batch_size": args.batch_size, "seq_len": args.seq_len, "steps": args.steps, "device": args.device,
        "dtype": args.dtype, "allocator": "MALLOC_MMAP_THRESHOLD_=65536", "goals_vs_full": GOALS,
        "estimate_goal_within": ESTIMATE_GOAL, "estimates": estimates, "rows": rows, "table": lines,
        "load_average_before": load_before, "load_average_after": load_average(), **stamp(args.threads),
    }, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
