"""Fine-tune any AutoModelForImageClassification (ViT, ConvNeXt, ResNet, ...) on labelled images with any strategy.

The same file runs on CPU, one GPU and N GPUs:

    python recipes/image_classify.py --model google/vit-base-patch16-224 --data photos/       # LoRA
    python recipes/image_classify.py --model ./my-vit --data beans --strategy bottleneck       # a hub dataset
    accelerate launch recipes/image_classify.py --model ./my-vit --data photos/ --strategy full

Data (``--data``): an image folder, one sub-folder per class (``photos/cat/1.png``), either directly
or under ``train/`` with optional ``validation/``/``val/``/``dev/`` and ``test/`` beside it; or a hub
dataset with an ``image`` (or ``img``) and a ``label`` column (needs a network). Without a
validation split, ``--validation-fraction`` of train is held out, stratified by class. Images are
resized and normalised by the model's own image processor (``preprocessor_config.json`` in the
model folder); no augmentation is applied.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import AutoImageProcessor

import adaptkit
from adaptkit.recipes import metrics, runs, training
from adaptkit.errors import ConfigError, DataError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
SPLITS = {"train": ("train",), "validation": ("validation", "valid", "val", "dev"), "test": ("test",)}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="model folder or hub id (with an image processor)")
    parser.add_argument("--data", required=True, help="image folder (class sub-folders) or hub dataset name")
    parser.add_argument("--validation-fraction", type=float, default=0.1)
    parser.add_argument("--max-train-samples", type=int)
    parser.add_argument("--max-eval-samples", type=int)
    training.add_run_args(parser, epochs=3, batch_size=32)
    args = parser.parse_args(argv)
    training.check_args(args, "image_classify")
    return args


def folder_split(folder: Path, classes: list[str] | None) -> tuple[list[tuple[Path, int]], list[str]]:
    """(image path, class id) pairs from ``folder/<class>/*``; the train split fixes the class list."""
    found = sorted(d.name for d in folder.iterdir() if d.is_dir())
    classes = classes or found
    unknown = sorted(set(found) - set(classes))
    if unknown or len(classes) < 2:
        raise DataError(field=str(folder), value=unknown or found,
                        problem="has class folders the train split lacks" if unknown else "needs 2+ class folders",
                        fix="put each class's images in a sub-folder named after the class, the same in every split")
    items = [(p, i) for i, name in enumerate(classes) if (folder / name).is_dir()
             for p in sorted((folder / name).rglob("*")) if p.suffix.lower() in IMAGE_SUFFIXES]
    if not items:
        raise DataError(field=str(folder), value=classes, problem="no images in the class folders",
                        fix=f"add image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return items, classes


def load_splits(args: argparse.Namespace) -> tuple[dict[str, list], list[str], list[str]]:
    """Splits of (image, label) pairs (images as paths or PIL images), class names, and notes."""
    root = Path(args.data)
    if root.is_dir():
        roles = {role: root / d.name for role, names in SPLITS.items() for d in root.iterdir()
                 if d.is_dir() and d.name.lower() in names}
        roles.setdefault("train", root)  # no split folders: the class folders are right here
        splits, classes = {}, None
        for role in ("train", "validation", "test"):
            if role in roles:
                splits[role], classes = folder_split(roles[role], classes)
    else:
        splits, classes = hub_splits(args.data)
    notes = [f"{role}: {len(items)} images" for role, items in splits.items()]
    if "validation" not in splits:
        from sklearn.model_selection import train_test_split
        train, held = train_test_split(splits["train"], test_size=args.validation_fraction, random_state=args.seed,
                                       stratify=[label for _, label in splits["train"]])
        splits["train"], splits["validation"] = train, held
        notes.append(f"validation: {len(held)} images carved from train ({args.validation_fraction:g}, stratified); "
                     f"train keeps {len(train)}")
    for role, limit in (("train", args.max_train_samples), ("validation", args.max_eval_samples),
                        ("test", args.max_eval_samples)):
        if limit and role in splits and limit < len(splits[role]):  # a seeded random subset: folders are class-sorted
            keep = torch.randperm(len(splits[role]), generator=torch.Generator().manual_seed(args.seed))[:limit]
            splits[role] = [splits[role][i] for i in sorted(keep.tolist())]
            notes.append(f"{role}: {limit} of them used (--max-{'train' if role == 'train' else 'eval'}-samples)")
    return splits, classes, notes


def hub_splits(name: str) -> tuple[dict[str, list], list[str]]:
    import datasets
    try:
        loaded = datasets.load_dataset(name)
    except (OSError, ValueError) as err:
        raise DataError(field="--data", value=name, problem=f"is no local folder and the hub failed ({err})",
                        fix="pass an image folder with one sub-folder per class") from None
    columns = loaded["train"].column_names
    image = next((c for c in ("image", "img") if c in columns), None)
    if image is None or "label" not in columns:
        raise DataError(field="--data", value=columns, problem="needs an image/img and a label column",
                        fix="use an image classification dataset, or an image folder")
    roles = {"train": "train", "validation": "validation", "valid": "validation", "test": "test"}
    splits = {roles[s]: list(zip(ds[image], ds["label"])) for s, ds in loaded.items() if s in roles}
    return splits, list(loaded["train"].features["label"].names)


class Images(torch.utils.data.Dataset):
    """Opens and preprocesses each image when it is used (a folder may not fit in memory)."""

    def __init__(self, items: list, processor, mode: str):
        self.items, self.processor, self.mode = items, processor, mode

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        from PIL import Image
        image, label = self.items[i]
        image = Image.open(image) if isinstance(image, (str, Path)) else image
        pixels = self.processor(image.convert(self.mode), return_tensors="pt")["pixel_values"][0]
        return {"pixel_values": pixels, "labels": label}


def make_loader(items: list, processor, mode: str, args, shuffle: bool):
    return torch.utils.data.DataLoader(Images(items, processor, mode), batch_size=args.batch_size, shuffle=shuffle,
                                       generator=torch.Generator().manual_seed(args.seed) if shuffle else None)


def main(argv: list[str] | None = None) -> dict:
    from adaptkit.quantization import load_model

    args = parse_args(argv)
    accelerator = training.make_accelerator(args)
    splits, classes, notes = load_splits(args)
    try:
        processor = AutoImageProcessor.from_pretrained(args.model)
    except (OSError, ValueError) as err:
        raise ConfigError(field="--model", value=args.model, problem=f"has no image processor ({err})",
                          fix="save one beside the model: AutoImageProcessor...save_pretrained(model_dir)") from None
    labels = {"num_labels": len(classes), "id2label": dict(enumerate(classes)),
              "label2id": {c: i for i, c in enumerate(classes)}}
    quantization = None if args.quantization == "none" else args.quantization
    # a pretrained head for other classes (ImageNet's 1000) is replaced by a fresh one of the right size
    load = lambda: load_model(args.model, "image_cls", quantization=quantization, ignore_mismatched_sizes=True,
                              **labels)
    model = adaptkit.adapt(load(), args.strategy, **training.parse_options(args.option))
    summary, strategy = adaptkit.summary(model), adaptkit.strategy_of(model).to_dict()
    accelerator.print(summary, f"classes: {classes}", *notes, sep="\n")
    mode = "L" if getattr(model.config, "num_channels", 3) == 1 else "RGB"

    train_loader = make_loader(splits["train"], processor, mode, args, shuffle=True)
    val_loader = make_loader(splits["validation"], processor, mode, args, shuffle=False)
    optimizer = training.make_optimizer(model, args)
    model, optimizer, train_loader, val_loader = accelerator.prepare(model, optimizer, train_loader, val_loader)
    max_steps = training.plan_steps(args, len(train_loader))
    scheduler = accelerator.prepare(training.make_scheduler(optimizer, args, max_steps, accelerator.num_processes))

    run = runs.Run(accelerator, args, model, optimizer, train_loader, max_steps=max_steps,
                   evaluate=lambda: training.evaluate_classifier(model, val_loader, accelerator, "classification",
                                                             len(classes)),
                   metric=metrics.primary_metric("classification"))
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

    results = {"task": "classification", "model": args.model, "strategy": strategy, "quantization": args.quantization,
               "classes": classes, "data": notes}
    if "test" in splits:
        # Score what users get: the saved adapter, reloaded onto a freshly loaded base model.
        best = adaptkit.load(run.adapter_dir, load())
        if not adaptkit.is_quantized(best):
            best.to(accelerator.device)
        test_loader = accelerator.prepare_data_loader(make_loader(splits["test"], processor, mode, args, False))
        results["test"] = training.evaluate_classifier(best, test_loader, accelerator, "classification", len(classes))
        accelerator.print("test:", results["test"])
    return run.finish(results, summary)


if __name__ == "__main__":
    main()
