"""Fine-tune a decoder (GPT-2, Llama, ...) on text, prompt/response pairs, instructions or chats with any strategy.

The same file runs on CPU, one GPU and N GPUs:

    python recipes/causal_lm.py --model gpt2 --data notes.txt --block-size 512         # plain text, packed, LoRA
    python recipes/causal_lm.py --model ./my-llama --data chats/ --strategy full       # chat messages jsonl
    python recipes/causal_lm.py --model ./my-llama --dataset-name tatsu-lab/alpaca      # instructions, the hub
    accelerate launch recipes/causal_lm.py --model ./my-llama --data qa/ --quantization 4bit

Data, read by ``datasets`` (``adaptkit.recipes.sources``: files, folders, ``save_to_disk``, ``--dataset-name``),
one format per split, found from its columns:

* ``text`` (``.txt`` lines, or records): the loss is on every token;
* ``prompt`` + ``response``, alpaca's ``instruction`` (+ ``input``) + ``output`` (in Alpaca's prompt), or
  chat ``messages`` (rendered by the tokenizer's chat template) or ShareGPT ``conversations``
  (``from``/``value``): the loss is on the response / the assistant's turns only; the rest is labelled -100.
  Past ``--max-length`` the prompt is cut first (from its start); the notes say how many were cut.

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
from adaptkit import lengths
from adaptkit.recipes import batching, checkpoints, guards, metrics, runs, sources, training
from adaptkit.distributed import check_sharded_model
from adaptkit.errors import ConfigError, DataError


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, training.RunArgs]:
    parser = training.run_parser(__doc__, batch_size=8)  # RunArgs' flags: --model, --strategy, --max-steps, ...
    sources.add_data_args(parser)
    parser.add_argument("--max-length", type=int, default=None,
                        help="tokens per example (longer ones are cut); default 256, or what the model has room for")
    parser.add_argument("--block-size", type=int, default=0, help="pack examples into blocks of N tokens (0: no packing)")
    parser.add_argument("--num-samples", type=int, default=3, help="greedy generations printed at the end")
    parser.add_argument("--max-new-tokens", type=int, default=40)
    args = parser.parse_args(argv)
    return args, training.RunArgs.parse(args, "causal_lm")


def sample_generations(model, tokenizer, examples, args) -> list[dict]:
    samples = []
    for example in examples.select(range(min(args.num_samples, len(examples)))):
        ids = torch.tensor([batching.prompt_ids(example, tokenizer)], device=next(model.parameters()).device)
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
    args, run = parse_args(argv)
    accelerator = training.make_accelerator(run)
    splits = sources.splits_from_args(args, prepare=batching.lm_rows, label_column=None)  # rows checked as in the files
    notes = splits.notes
    guards.require_examples(len(splits.train), notes[0].partition(": ")[2] or "--data")
    formats = {split: batching.lm_format(ds) for split, ds in splits.items()}
    if len(set(formats.values())) > 1:
        raise DataError(field="splits", value=formats, problem="differ in format", fix="use one format in every split")
    fmt = formats["train"]
    tokenizer = AutoTokenizer.from_pretrained(training.preprocessor_name(run), trust_remote_code=False)
    if tokenizer.eos_token_id is None:
        raise ConfigError(field="tokenizer.eos_token", value=None, problem="the tokenizer has no end-of-sequence "
                          "token, so the model cannot learn where an answer ends",
                          fix="use a decoder tokenizer with an eos token, or set tokenizer.eos_token and save it")
    if tokenizer.pad_token is None:  # safe here: padding is masked by position, not by token id (see above)
        tokenizer.pad_token = tokenizer.eos_token
    load = lambda: training.load_base(run, "causal_lm")  # --model, its weights in --config-name, or a config alone
    model = adaptkit.adapt(load(), run.strategy, **run.options)
    batching.check_vocab(model, tokenizer)  # a token id past the embeddings would be an IndexError mid-run
    check_sharded_model(accelerator, model)  # FSDP: prefix, 8-bit, integer-stored 4-bit refused with the fix
    summary, strategy = adaptkit.summary(model), adaptkit.strategy_of(model).to_dict()
    if args.block_size:  # packed blocks are the sequences the model reads
        lengths.check_length(model, args.block_size, field="--block-size")
    run.max_length = guards.fit_max_length(model, run.max_length, 256, notes)
    if args.num_samples:
        guards.prompt_room(model, args.max_new_tokens)
    accelerator.print(summary, *notes, sep="\n")

    features = {split: batching.encode_split(ds, tokenizer, 0 if args.block_size else run.max_length, notes, split)
                for split, ds in splits.items()}
    if args.block_size:
        features = {split: batching.pack(f, args.block_size, notes) for split, f in features.items()}
    train_loader = batching.causal_lm_loader(features["train"], run.batch_size, tokenizer, True, run.seed)
    val_loader = batching.causal_lm_loader(features["validation"], run.batch_size, tokenizer, False)
    optimizer = training.make_optimizer(model, run)
    model, optimizer, train_loader, val_loader = accelerator.prepare(model, optimizer, train_loader, val_loader)
    max_steps = training.plan_steps(run, len(train_loader))
    scheduler = accelerator.prepare(training.make_scheduler(optimizer, run, max_steps, accelerator.num_processes))

    # The loop: evaluate every --eval-every steps (0: each epoch) and at the end, keep the adapter that is best
    # on validation, stop after --patience evaluations without improvement, checkpoint every --checkpoint-every.
    lock = runs.claim_output_dir(accelerator, run)  # one run per folder; --overwrite deletes what the last run wrote
    checkpoints.adapter_only(accelerator)  # save_state / load_state: the trained tensors, not the whole model
    progress = runs.Progress(run, accelerator, max_steps, len(train_loader),
                             metric=metrics.primary_metric("language_model"))
    checkpoints.resume(accelerator, run, progress)  # --resume: exactly where it stopped; refuses changed flags
    log = runs.Log(accelerator, run, progress)  # log.jsonl and the --report-to trackers
    model.train()
    while not progress.done:
        for batch in progress.epoch_batches(train_loader):  # skips the batches a resumed run already saw
            with accelerator.accumulate(model):
                loss = model(**batch).loss
                accelerator.backward(loss)
                if accelerator.sync_gradients and run.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(model.parameters(), run.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            if not progress.optimizer_step(loss):  # still accumulating gradients
                continue
            log.step(optimizer)  # the bar; a loss line every --log-every steps
            if progress.due(run.eval_every):
                with progress.paused():
                    scores = training.evaluate_perplexity(model, val_loader, accelerator)
                    if best := progress.improved(scores):
                        runs.save_adapter(accelerator, model, run, progress.step)
                    log.evaluation(scores, best)
                model.train()
                if progress.should_stop:
                    accelerator.set_trigger()
                progress.stopped_early = accelerator.check_trigger()  # on any process: all stop together
            if run.checkpoint_every and (progress.step % run.checkpoint_every == 0 or progress.done):
                checkpoints.checkpoint(accelerator, run, progress)  # and one at the end: a finished run can be extended
            if progress.done:
                break

    runs.keep_adapter(accelerator, model, run, progress)  # none kept (NaN at every evaluation): the last weights
    # Score and sample what users get: the saved adapter, reloaded onto a freshly loaded base model.
    best = adaptkit.load(run.output_dir / training.ADAPTER_DIR, load()).eval()
    if not adaptkit.is_quantized(best):
        best.to(accelerator.device)
    results = {"task": "language_model", "model": run.model, "strategy": strategy, "quantization": run.quantization,
               "data": notes, "format": fmt, "block_size": args.block_size}
    if "test" in features:
        test_loader = batching.causal_lm_loader(features["test"], run.batch_size, tokenizer, False)
        test_loader = accelerator.prepare_data_loader(test_loader)
        results["test"] = training.evaluate_perplexity(best, test_loader, accelerator)
    if accelerator.is_main_process and args.num_samples:
        results["samples"] = sample_generations(best, tokenizer, splits.test or splits.validation, args)
    return runs.finish(log, results, summary, lock)


if __name__ == "__main__":
    main()
