"""Fine-tune any AutoModelForImageClassification (ViT, ConvNeXt, ResNet, ...) on labelled images with any strategy.

The same file runs on CPU, one GPU and N GPUs:

    python recipes/image_classify.py --model google/vit-base-patch16-224 --data photos/       # LoRA
    python recipes/image_classify.py --model ./my-vit --dataset-name beans --strategy bottleneck   # the hub
    accelerate launch recipes/image_classify.py --model ./my-vit --data photos/ --strategy full

Data, read by ``datasets``: ``--data`` an image folder (``imagefolder``: one sub-folder per class,
``photos/cat/1.png``, directly or under ``train/`` with optional ``validation/`` and ``test/``) or a
``save_to_disk`` folder; or ``--dataset-name`` (+ ``--dataset-config``) with an ``image`` (or ``img``)
and a ``label`` column (``--image-column``/``--label-column``). Splits follow the recipes' one
convention (``adaptkit.recipes.sources``). Images are resized and normalised by the model's own image
processor (``preprocessor_config.json`` in the model folder); no augmentation is applied.
"""

from __future__ import annotations

import argparse

import torch
from transformers import AutoImageProcessor

import adaptkit
from adaptkit.recipes import checkpoints, metrics, runs, sources, training
from adaptkit.errors import ConfigError, DataError



def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, training.RunArgs]:
    parser = training.run_parser(__doc__)  # RunArgs' flags: --model, --strategy, --max-steps, ...
    sources.add_data_args(parser, what="class folders")
    parser.add_argument("--image-column", help="default: image or img")
    parser.add_argument("--label-column", default="label")
    args = parser.parse_args(argv)
    return args, training.RunArgs.parse(args, "image_classify")


def load_splits(args: argparse.Namespace):
    """Splits of (image, label) rows as ``datasets`` reads them (``imagefolder``, the hub, ``save_to_disk``),
    arranged by the recipes' one split convention; class names come from the train split's ClassLabel."""
    splits = sources.splits_from_args(args, prepare=sources.check_images, label_column=args.label_column)
    train = splits.train
    image = args.image_column or next((c for c in ("image", "img") if c in train.column_names), None)
    missing = [c for c in (image, args.label_column) if c not in train.column_names]
    if image is None or missing:
        raise DataError(field="--image-column/--label-column", value=missing or None,
                        problem=f"not among the columns {train.column_names}",
                        fix="name them with --image-column/--label-column, or use one sub-folder per class")
    feature = train.features[args.label_column]
    classes = list(feature.names) if hasattr(feature, "names") else [str(c) for c in sorted(set(train[args.label_column]))]
    if len(classes) < 2:
        raise DataError(field=str(args.data or args.dataset_name), value=classes, problem="needs 2+ class folders "
                        "(classes)", fix="put each class's images in a sub-folder named after the class")
    rows = {split: ds.select_columns([image, args.label_column]) for split, ds in splits.items()}
    return rows, classes, splits.notes


class Images(torch.utils.data.Dataset):
    """Decodes and preprocesses each image when it is used (a folder may not fit in memory)."""

    def __init__(self, items, processor, mode: str):
        self.items, self.processor, self.mode = items, processor, mode

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        image, label = self.items[i].values()  # decoded by datasets when the row is read
        pixels = self.processor(image.convert(self.mode), return_tensors="pt")["pixel_values"][0]
        return {"pixel_values": pixels, "labels": label}


def make_loader(items: list, processor, mode: str, args, shuffle: bool):
    return torch.utils.data.DataLoader(Images(items, processor, mode), batch_size=args.batch_size, shuffle=shuffle,
                                       generator=torch.Generator().manual_seed(args.seed) if shuffle else None)


def main(argv: list[str] | None = None) -> dict:
    args, run = parse_args(argv)
    accelerator = training.make_accelerator(run)
    splits, classes, notes = load_splits(args)
    try:
        processor = AutoImageProcessor.from_pretrained(training.preprocessor_name(run), trust_remote_code=False)
    except (OSError, ValueError) as err:
        raise ConfigError(field="--model", value=training.preprocessor_name(run), problem=f"has no image processor ({err})",
                          fix="save one beside the model: AutoImageProcessor...save_pretrained(model_dir)") from None
    labels = {"num_labels": len(classes), "id2label": dict(enumerate(classes)),
              "label2id": {c: i for i, c in enumerate(classes)}}
    # a pretrained head for other classes (ImageNet's 1000) is replaced by a fresh one of the right size
    load = lambda: training.load_base(run, "image_cls", {"ignore_mismatched_sizes": True}, **labels)
    model = adaptkit.adapt(load(), run.strategy, **run.options)
    summary, strategy = adaptkit.summary(model), adaptkit.strategy_of(model).to_dict()
    accelerator.print(summary, f"classes: {classes}", *notes, sep="\n")
    mode = "L" if getattr(model.config, "num_channels", 3) == 1 else "RGB"

    train_loader = make_loader(splits["train"], processor, mode, args, shuffle=True)
    val_loader = make_loader(splits["validation"], processor, mode, args, shuffle=False)
    optimizer = training.make_optimizer(model, run)
    model, optimizer, train_loader, val_loader = accelerator.prepare(model, optimizer, train_loader, val_loader)
    max_steps = training.plan_steps(run, len(train_loader))
    scheduler = accelerator.prepare(training.make_scheduler(optimizer, run, max_steps, accelerator.num_processes))

    # The loop: evaluate every --eval-every steps (0: each epoch) and at the end, keep the adapter that is best
    # on validation, stop after --patience evaluations without improvement, checkpoint every --checkpoint-every.
    lock = runs.claim_output_dir(accelerator, run)  # one run per folder; --overwrite deletes what the last run wrote
    checkpoints.adapter_only(accelerator)  # save_state / load_state: the trained tensors, not the whole model
    progress = runs.Progress(run, accelerator, max_steps, len(train_loader), metric=metrics.primary_metric("classification"))
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
                    scores = training.evaluate_classifier(model, val_loader, accelerator, "classification",
                                                           len(classes))
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
    results = {"task": "classification", "model": run.model, "strategy": strategy, "quantization": run.quantization,
               "classes": classes, "data": notes}
    if "test" in splits:
        # Score what users get: the saved adapter, reloaded onto a freshly loaded base model.
        best = adaptkit.load(run.output_dir / training.ADAPTER_DIR, load())
        if not adaptkit.is_quantized(best):
            best.to(accelerator.device)
        test_loader = accelerator.prepare_data_loader(make_loader(splits["test"], processor, mode, args, False))
        results["test"] = training.evaluate_classifier(best, test_loader, accelerator, "classification", len(classes))
        accelerator.print("test:", results["test"])
    return runs.finish(log, results, summary, lock)


if __name__ == "__main__":
    main()
