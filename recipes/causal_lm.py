"""Fine-tune a decoder (GPT-2, Llama, ...) on text, prompt/response pairs, instructions or chats with any strategy.

The same file runs on CPU, one GPU and N GPUs:

    python recipes/causal_lm.py --model gpt2 --data notes.txt --block-size 512         # plain text, packed, LoRA
    python recipes/causal_lm.py --model ./my-llama --data chats/ --strategy full       # chat messages jsonl
    python recipes/causal_lm.py --model ./my-llama --dataset-name tatsu-lab/alpaca      # instructions, the hub
    accelerate launch recipes/causal_lm.py --model ./my-llama --data qa/ --quantization 4bit

Data, read by ``datasets`` (``adaptkit.recipes.data``: files, folders, ``save_to_disk``, ``--dataset-name``),
one format per split, found from its columns:

* ``text`` (``.txt`` lines, or records): the loss is on every token;
* ``prompt`` + ``response``, alpaca's ``instruction`` (+ ``input``) + ``output`` (in Alpaca's prompt), or
  chat ``messages`` (rendered by the tokenizer's chat template): the loss is on the response / the
  assistant's turns only; the rest is labelled -100.

Every example ends with the end-of-sequence token, always trained on: labels are built per example and
padding is masked by position (``pad = eos`` is safe). ``--block-size N`` packs examples end to end into
blocks of N tokens (run_clm.py's ``group_texts``; masks kept). Reports perplexity on validation and
test, and prints a few greedy generations from the saved adapter.
"""

from __future__ import annotations

import argparse

import torch
from transformers import AutoTokenizer

import adaptkit
from adaptkit.recipes import batching, checkpoints, data, guards, metrics, runs, training
from adaptkit.distributed import check_sharded_model
from adaptkit.errors import ConfigError, DataError


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    training.add_model_args(parser, "model folder or hub id of a decoder")
    data.add_data_args(parser)
    parser.add_argument("--max-length", type=int, default=None,
                        help="tokens per example (longer ones are cut); default 256, or what the model has room for")
    parser.add_argument("--block-size", type=int, default=0, help="pack examples into blocks of N tokens (0: no packing)")
    parser.add_argument("--num-samples", type=int, default=3, help="greedy generations printed at the end")
    parser.add_argument("--max-new-tokens", type=int, default=40)
    training.add_run_args(parser, epochs=3, batch_size=8)
    args = parser.parse_args(argv)
    training.check_args(args, "causal_lm")
    return args


FORMATS = {"messages": ("messages",), "alpaca": ("instruction", "output"), "prompt_response": ("prompt", "response"),
           "text": ("text",)}
# Alpaca's own prompt (tatsu-lab/stanford_alpaca), with and without an input
ALPACA = ("Below is an instruction that describes a task{0}. Write a response that appropriately completes the "
          "request.\n\n### Instruction:\n{1}\n\n{2}### Response:\n")


def data_format(ds, name: str) -> str:
    """The first format of FORMATS whose columns the split has; every row must fill them (one format per file)."""
    fmt = next((f for f, cols in FORMATS.items() if set(cols) <= set(ds.column_names)), None)
    if fmt is None:
        raise DataError(field=name, value=ds.column_names, problem="has none of the known formats",
                        fix='write {"text": ...}, {"prompt": ..., "response": ...}, {"instruction": ..., "input": ..., '
                            '"output": ...} or {"messages": [{"role": ..., "content": ...}, ...]} records, or .txt lines')
    for i, row in enumerate(ds.select_columns(list(FORMATS[fmt]))):
        if any(v is None for v in row.values()):
            raise DataError(field=f"{name}, row {i + 1}", value=row, problem=f"mixes two formats (this is {fmt})",
                            fix="use one format per file")
    return fmt


def chat_ids(messages: list[dict], tokenizer) -> tuple[list[int], list[int]]:
    """The chat rendered by the tokenizer's template; only the assistant's turns are labelled."""
    ids, labels = [], []
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = tokenizer.apply_chat_template(messages[:k], add_generation_prompt=True, tokenize=True, return_dict=False)
        full = tokenizer.apply_chat_template(messages[:k + 1], tokenize=True, return_dict=False)
        if full[:len(ids)] != ids or prompt[:len(ids)] != ids or full[:len(prompt)] != prompt:
            raise ConfigError(field="tokenizer.chat_template", value=messages[k]["content"][:40], problem="renders "
                              "a conversation differently from its start, so the assistant's turns cannot be told apart",
                              fix="use a template whose renderings of a longer chat extend those of a shorter one")
        labels += [-100] * (len(prompt) - len(ids)) + full[len(prompt):]
        ids = full
    if not ids:
        raise DataError(field="messages", value=[m["role"] for m in messages], problem="has no assistant turn to "
                        "train on", fix="drop the conversation, or add the assistant's answer")
    if ids[-1] != tokenizer.eos_token_id:  # templates that end turns with their own marker still learn to stop
        ids, labels = ids + [tokenizer.eos_token_id], labels + [tokenizer.eos_token_id]
    return ids, labels


def encode(example: dict, tokenizer, max_length: int) -> dict:
    """Token ids and labels for one example; the eos is appended and labelled; prompts are masked (-100)."""
    if "messages" in example:
        ids, labels = chat_ids(example["messages"], tokenizer)
    else:
        if "instruction" in example:
            extra = example.get("input") or ""
            example = {"prompt": ALPACA.format(", paired with an input that provides further context" if extra else "",
                                               example["instruction"], f"### Input:\n{extra}\n\n" if extra else ""),
                       "response": example["output"]}
        if "response" in example:
            prompt = tokenizer(example["prompt"])["input_ids"]
            answer = tokenizer(example["response"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            ids, labels = prompt + answer, [-100] * len(prompt) + answer
        else:
            ids = tokenizer(example["text"])["input_ids"] + [tokenizer.eos_token_id]
            labels = list(ids)
    if max_length:
        ids, labels = ids[:max_length], labels[:max_length]
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}


def pack(features: list[dict], block_size: int) -> list[dict]:
    """run_clm's group_texts: every example end to end, cut into blocks of block_size (the rest is dropped)."""
    ids = [t for f in features for t in f["input_ids"]]
    labels = [t for f in features for t in f["labels"]]
    if len(ids) < block_size:
        raise DataError(field="--block-size", value=block_size, problem=f"a split holds {len(ids)} tokens, fewer than "
                        "one block", fix="use a smaller --block-size, or more data")
    return [{"input_ids": ids[i:i + block_size], "attention_mask": [1] * block_size, "labels": labels[i:i + block_size]}
            for i in range(0, len(ids) - block_size + 1, block_size)]


def prompt_ids(example: dict, tokenizer) -> list[int]:
    """What the model continues in a sample: the prompt (up to the last assistant turn), or half a text."""
    if "messages" in example:
        last = max(i for i, m in enumerate(example["messages"]) if m["role"] == "assistant")
        return tokenizer.apply_chat_template(example["messages"][:last], add_generation_prompt=True, tokenize=True,
                                             return_dict=False)
    encoded = encode(example, tokenizer, 0)
    if "text" in example:
        return encoded["input_ids"][: max(1, (len(encoded["input_ids"]) - 1) // 2)]
    return encoded["input_ids"][: encoded["labels"].count(-100)]  # the masked prompt


def sample_generations(model, tokenizer, examples, args) -> list[dict]:
    samples = []
    for example in examples.select(range(min(args.num_samples, len(examples)))):
        ids = torch.tensor([prompt_ids(example, tokenizer)], device=next(model.parameters()).device)
        ids = ids[:, -(guards.prompt_room(model, args.max_new_tokens) or ids.shape[1]):]  # the shown prompt is what fits
        output = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                max_new_tokens=args.max_new_tokens, pad_token_id=tokenizer.pad_token_id)
        new = output[0, ids.shape[1]:]
        samples.append({"prompt": tokenizer.decode(ids[0], skip_special_tokens=True),
                        "generated": tokenizer.decode(new, skip_special_tokens=True),
                        "stopped": bool(new.eq(tokenizer.eos_token_id).any())})
        print(f"--- {samples[-1]['prompt']!r}\n  → {samples[-1]['generated']!r}" + ("" if samples[-1]["stopped"] else " (no eos)"))
    return samples


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    training.refuse_remote_code(args)
    accelerator = training.make_accelerator(args)
    blank = lambda ds: ds.filter(lambda row: bool(row["text"].strip())) if ds.column_names == ["text"] else ds
    splits, notes = data.splits_from_args(args, prepare=blank)  # .txt files: blank lines are no examples
    guards.require_examples(len(splits["train"]), notes[0].partition(": ")[2] or "--data")
    formats = {split: data_format(ds, split) for split, ds in splits.items()}
    if len(set(formats.values())) > 1:
        raise DataError(field="splits", value=formats, problem="differ in format", fix="use one format in every split")
    fmt = formats["train"]
    tokenizer = AutoTokenizer.from_pretrained(training.preprocessor_name(args), trust_remote_code=False)
    if tokenizer.eos_token_id is None:
        raise ConfigError(field="tokenizer.eos_token", value=None, problem="the tokenizer has no end-of-sequence "
                          "token, so the model cannot learn where an answer ends",
                          fix="use a decoder tokenizer with an eos token, or set tokenizer.eos_token and save it")
    if tokenizer.pad_token is None:  # safe here: padding is masked by position, not by token id (see above)
        tokenizer.pad_token = tokenizer.eos_token
    load = lambda: training.load_base(args, "causal_lm")  # --model, its weights in --config-name, or a config alone
    model = adaptkit.adapt(load(), args.strategy, **training.parse_options(args.option))
    check_sharded_model(accelerator, model)  # FSDP: prefix, 8-bit, integer-stored 4-bit refused with the fix
    summary, strategy = adaptkit.summary(model), adaptkit.strategy_of(model).to_dict()
    if args.block_size:  # packed blocks are the sequences the model reads
        guards.check_fits(model, args.block_size, "--block-size")
    args.max_length = guards.fit_max_length(model, args.max_length, 256, notes)
    if args.num_samples:
        guards.prompt_room(model, args.max_new_tokens)
    accelerator.print(summary, *notes, sep="\n")

    features = {split: [encode(e, tokenizer, 0 if args.block_size else args.max_length) for e in ds]
                for split, ds in splits.items()}
    if args.block_size:
        features = {split: pack(f, args.block_size) for split, f in features.items()}
    train_loader = batching.causal_lm_loader(features["train"], args.batch_size, tokenizer.pad_token_id, True, args.seed)
    val_loader = batching.causal_lm_loader(features["validation"], args.batch_size, tokenizer.pad_token_id, False)
    optimizer = training.make_optimizer(model, args)
    model, optimizer, train_loader, val_loader = accelerator.prepare(model, optimizer, train_loader, val_loader)
    max_steps = training.plan_steps(args, len(train_loader))
    scheduler = accelerator.prepare(training.make_scheduler(optimizer, args, max_steps, accelerator.num_processes))

    # The loop: evaluate every --eval-every steps (0: each epoch) and at the end, keep the adapter that is best
    # on validation, stop after --patience evaluations without improvement, checkpoint every --checkpoint-every.
    progress = runs.Progress(args, accelerator, max_steps, len(train_loader),
                             metric=metrics.primary_metric("language_model"))
    accelerator.register_for_checkpointing(progress)  # saved and restored with the model, optimizer and RNGs
    checkpoints.resume(accelerator, args, progress)  # --resume: exactly where it stopped; refuses changed flags
    log = runs.Log(accelerator, args, progress, "causal_lm")
    model.train()
    while not progress.done:
        for batch in progress.epoch_batches(train_loader):  # skips the batches a resumed run already saw
            with accelerator.accumulate(model):
                loss = model(**batch).loss
                accelerator.backward(loss)
                if accelerator.sync_gradients and args.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            if not progress.optimizer_step(loss):  # still accumulating gradients
                continue
            log.step(optimizer)  # the bar; a loss line every --log-every steps
            if progress.due(args.eval_every):
                with progress.paused():
                    scores = training.evaluate_perplexity(model, val_loader, accelerator)
                    if best := progress.improved(scores):
                        runs.save_adapter(accelerator, model, args, progress.step)
                    log.evaluation(scores, best)
                model.train()
                if progress.stopper.should_stop:
                    accelerator.set_trigger()
                progress.stopped_early = accelerator.check_trigger()  # on any process: all stop together
            if args.checkpoint_every and progress.step % args.checkpoint_every == 0 and not progress.done:
                checkpoints.checkpoint(accelerator, args, progress)
            if progress.done:
                break

    runs.keep_adapter(accelerator, model, args, progress)  # none kept (NaN at every evaluation): the last weights
    # Score and sample what users get: the saved adapter, reloaded onto a freshly loaded base model.
    best = adaptkit.load(args.output_dir / training.ADAPTER_DIR, load()).eval()
    if not adaptkit.is_quantized(best):
        best.to(accelerator.device)
    results = {"task": "language_model", "model": args.model, "strategy": strategy, "quantization": args.quantization,
               "data": notes, "format": fmt, "block_size": args.block_size}
    if "test" in features:
        test_loader = batching.causal_lm_loader(features["test"], args.batch_size, tokenizer.pad_token_id, False)
        test_loader = accelerator.prepare_data_loader(test_loader)
        results["test"] = training.evaluate_perplexity(best, test_loader, accelerator)
    if accelerator.is_main_process and args.num_samples:
        results["samples"] = sample_generations(best, tokenizer, splits.get("test", splits["validation"]), args)
    return runs.finish(accelerator, args, model, progress, log, results, summary)


if __name__ == "__main__":
    main()
