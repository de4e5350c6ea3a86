"""Fine-tune a decoder (GPT-2, Llama, ...) on plain text or prompt/response pairs with any strategy.

The same file runs on CPU, one GPU and N GPUs:

    python recipes/causal_lm.py --model gpt2 --data notes.txt                       # plain text, LoRA
    python recipes/causal_lm.py --model ./my-llama --data qa/ --strategy full       # prompt/response jsonl
    accelerate launch recipes/causal_lm.py --model ./my-llama --data qa/ --quantization 4bit

Data (``--data``): a file, or a folder with ``train`` and optionally ``validation``/``val``/``dev``
and ``test`` files (without a validation file, ``--validation-fraction`` of train is held out):

* ``.txt``: every non-empty line is one example;
* ``.jsonl``: ``{"text": ...}`` records, or ``{"prompt": ..., "response": ...}`` records. With a
  response the loss is on the response only: the prompt's tokens are labelled -100.

Every example ends with the end-of-sequence token, and that token is always trained on. A tokenizer
without a padding token gets ``pad = eos``; the usual collator then turns every label equal to the pad
id into -100 and the model never learns to stop. Here labels are built per example before padding,
so only the padding is masked. Reports perplexity on validation (each epoch, or --eval-every) and on
test, and prints a few greedy generations from the saved adapter.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from transformers import AutoTokenizer

import adaptkit
from adaptkit.recipes import batching, metrics, runs, training
from adaptkit.errors import ConfigError, DataError

SPLITS = {"train": ("train",), "validation": ("validation", "valid", "val", "dev"), "test": ("test",)}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="model folder or hub id of a decoder")
    parser.add_argument("--data", required=True, help=".txt/.jsonl file, or a folder with train/validation/test files")
    parser.add_argument("--validation-fraction", type=float, default=0.1)
    parser.add_argument("--max-length", type=int, default=256, help="tokens per example (longer ones are cut)")
    parser.add_argument("--max-train-samples", type=int)
    parser.add_argument("--max-eval-samples", type=int)
    parser.add_argument("--num-samples", type=int, default=3, help="greedy generations printed at the end")
    parser.add_argument("--max-new-tokens", type=int, default=40)
    training.add_run_args(parser, epochs=3, batch_size=8)
    args = parser.parse_args(argv)
    training.check_args(args, "causal_lm")
    if not 0 < args.validation_fraction < 1:
        raise ConfigError(field="--validation-fraction", value=args.validation_fraction, problem="must be in (0, 1)",
                          fix="use 0.1")
    return args


def read_examples(path: Path) -> list[dict]:
    """Records with ``text``, or with ``prompt`` + ``response``; one format per file."""
    if path.suffix == ".txt":
        return [{"text": line} for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if path.suffix != ".jsonl":
        raise DataError(field="--data", value=str(path), problem="is neither .txt nor .jsonl",
                        fix="write one example per line (.txt) or one JSON object per line (.jsonl)")
    records = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(field=f"{path}, line {n}", value=line[:80], problem=f"is not JSON ({err.msg})",
                                fix="write one JSON object per line") from None
            keys = {"prompt", "response"} if isinstance(record, dict) and "response" in record else {"text"}
            if not isinstance(record, dict) or not keys <= set(record) or not all(
                    isinstance(record[k], str) for k in keys):
                raise DataError(field=f"{path}, line {n}", value=line[:80], problem="is not a text or a "
                                "prompt/response record", fix='write {"text": "..."} or {"prompt": "...", "response": "..."}')
            records.append({k: record[k] for k in keys})
    if len({"response" in r for r in records}) > 1:
        raise DataError(field=str(path), value="text and prompt/response records", problem="mixes two formats",
                        fix="use one format per file")
    return records


def load_splits(args: argparse.Namespace) -> tuple[dict[str, list[dict]], list[str]]:
    source = Path(args.data)
    files = {"train": source} if source.is_file() else {
        role: hits[0] for role, stems in SPLITS.items()
        if (hits := sorted(p for p in source.glob("*") if p.stem in stems and p.suffix in (".txt", ".jsonl")))}
    if "train" not in files:
        raise DataError(field="--data", value=str(source), problem="no train file (train.txt or train.jsonl) there",
                        fix="pass a .txt/.jsonl file or a folder holding train.txt / train.jsonl")
    splits = {role: read_examples(path) for role, path in files.items()}
    notes = [f"{role}: {files[role]} ({len(rows)} examples)" for role, rows in splits.items()]
    if "validation" not in splits:  # carve it from train, seeded, so a resumed run gets the same split
        order = torch.randperm(len(splits["train"]), generator=torch.Generator().manual_seed(args.seed)).tolist()
        held = max(1, int(len(order) * args.validation_fraction))
        splits["validation"] = [splits["train"][i] for i in sorted(order[:held])]
        splits["train"] = [splits["train"][i] for i in sorted(order[held:])]
        notes.append(f"validation: {held} examples carved from train ({args.validation_fraction:g}, seed {args.seed})")
    for role, limit in (("train", args.max_train_samples), ("validation", args.max_eval_samples),
                        ("test", args.max_eval_samples)):
        if limit and role in splits:
            splits[role] = splits[role][:limit]
    return splits, notes


def encode(example: dict, tokenizer, max_length: int) -> dict:
    """Token ids and labels for one example; the eos is appended and labelled, the prompt is masked."""
    if "response" in example:
        prompt = tokenizer(example["prompt"])["input_ids"]
        answer = tokenizer(example["response"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids, labels = prompt + answer, [-100] * len(prompt) + answer
    else:
        ids = tokenizer(example["text"])["input_ids"] + [tokenizer.eos_token_id]
        labels = list(ids)
    ids, labels = ids[:max_length], labels[:max_length]
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}


def collate(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad; padding gets attention 0 and label -100 (never the real eos, even when pad == eos)."""
    width = max(len(e["input_ids"]) for e in examples)
    pad = lambda key, value: torch.tensor([e[key] + [value] * (width - len(e[key])) for e in examples])
    return {"input_ids": pad("input_ids", pad_id), "attention_mask": pad("attention_mask", 0), "labels": pad("labels", -100)}


def make_loader(features: list[dict], args, pad_id: int, shuffle: bool):
    sampler = batching.LengthGroupedBatchSampler([len(f["input_ids"]) for f in features], args.batch_size,
                                             shuffle=shuffle, seed=args.seed)
    return torch.utils.data.DataLoader(features, batch_sampler=sampler, collate_fn=lambda b: collate(b, pad_id))


@torch.no_grad()
def evaluate(model, loader, accelerator) -> dict[str, float]:
    """Perplexity over every labelled token: per-sequence NLL sums, so padding and batch sizes do not weigh in."""
    model.eval()
    metric = metrics.metric_for_task("language_model")
    for batch in loader:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        labels = batch["labels"][:, 1:]
        nll = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), labels, ignore_index=-100,
                                                reduction="none").sum(-1)
        nll, tokens = accelerator.gather_for_metrics((nll, labels.ne(-100).sum(-1)))
        metric.add_batch(nll=nll.cpu().numpy(), num_tokens=tokens.cpu().numpy())
    return {k: float(v) for k, v in metric.compute().items()}


def sample_generations(model, tokenizer, examples: list[dict], args) -> list[dict]:
    samples = []
    for example in examples[: args.num_samples]:
        if "prompt" in example:
            prompt_ids = tokenizer(example["prompt"], return_tensors="pt")["input_ids"]
        else:  # continue the first half of a text
            ids = tokenizer(example["text"], return_tensors="pt")["input_ids"]
            prompt_ids = ids[:, : max(1, ids.shape[1] // 2)]
        prompt_ids = prompt_ids.to(next(model.parameters()).device)
        output = model.generate(input_ids=prompt_ids, attention_mask=torch.ones_like(prompt_ids), do_sample=False,
                                max_new_tokens=args.max_new_tokens, pad_token_id=tokenizer.pad_token_id)
        new = output[0, prompt_ids.shape[1]:]
        samples.append({"prompt": tokenizer.decode(prompt_ids[0], skip_special_tokens=True),
                        "generated": tokenizer.decode(new, skip_special_tokens=True),
                        "stopped": bool(new.eq(tokenizer.eos_token_id).any())})
    return samples


def main(argv: list[str] | None = None) -> dict:
    from adaptkit.quantization import load_model

    args = parse_args(argv)
    accelerator = training.make_accelerator(args)
    splits, notes = load_splits(args)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    if tokenizer.eos_token_id is None:
        raise ConfigError(field="tokenizer.eos_token", value=None, problem="the tokenizer has no end-of-sequence "
                          "token, so the model cannot learn where an answer ends",
                          fix="use a decoder tokenizer with an eos token, or set tokenizer.eos_token and save it")
    if tokenizer.pad_token is None:  # safe here: padding is masked by position, not by token id (see above)
        tokenizer.pad_token = tokenizer.eos_token
    quantization = None if args.quantization == "none" else args.quantization
    load = lambda: load_model(args.model, "causal_lm", quantization=quantization)
    model = adaptkit.adapt(load(), args.strategy, **training.parse_options(args.option))
    summary, strategy = adaptkit.summary(model), adaptkit.strategy_of(model).to_dict()
    accelerator.print(summary, *notes, sep="\n")

    features = {role: [encode(e, tokenizer, args.max_length) for e in rows] for role, rows in splits.items()}
    train_loader = make_loader(features["train"], args, tokenizer.pad_token_id, shuffle=True)
    val_loader = make_loader(features["validation"], args, tokenizer.pad_token_id, shuffle=False)
    optimizer = training.make_optimizer(model, args)
    model, optimizer, train_loader, val_loader = accelerator.prepare(model, optimizer, train_loader, val_loader)
    max_steps = training.plan_steps(args, len(train_loader))
    scheduler = accelerator.prepare(training.make_scheduler(optimizer, args, max_steps, accelerator.num_processes))

    run = runs.Run(accelerator, args, model, optimizer, train_loader, max_steps=max_steps,
                   evaluate=lambda: evaluate(model, val_loader, accelerator),
                   metric=metrics.primary_metric("language_model"))
    run.resume(args.resume)
    model.train()
    for batch in run.batches(train_loader):
        with accelerator.accumulate(model):
            loss = model(**batch).loss
            accelerator.backward(loss)
            if accelerator.sync_gradients and args.max_grad_norm > 0:
                accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
        run.step_done(loss)

    # Score and sample what users get: the saved adapter, reloaded onto a freshly loaded base model.
    best = adaptkit.load(run.adapter_dir, load()).eval()
    if not adaptkit.is_quantized(best):
        best.to(accelerator.device)
    results = {"task": "language_model", "model": args.model, "strategy": strategy, "quantization": args.quantization,
               "data": notes, "format": "prompt_response" if "prompt" in splits["train"][0] else "text"}
    if "test" in features:
        test_loader = accelerator.prepare_data_loader(make_loader(features["test"], args, tokenizer.pad_token_id, False))
        results["test"] = evaluate(best, test_loader, accelerator)
    if accelerator.is_main_process and args.num_samples:
        results["samples"] = sample_generations(best, tokenizer, splits.get("test", splits["validation"]), args)
        for s in results["samples"]:
            accelerator.print(f"--- {s['prompt']!r}\n  → {s['generated']!r}{'' if s['stopped'] else ' (no eos)'}")
    return run.finish(results, summary)


if __name__ == "__main__":
    main()
