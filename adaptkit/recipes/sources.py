"""Where the recipes' data comes from (a folder of split files, one file, a ``{split: file}`` mapping, a
``save_to_disk`` folder, image class folders or a ``--dataset-name``) and how it becomes train/validation/test by one
convention (``arrange``; docs/recipes.md, "Data"). Each split is read and checked by ``adaptkit.recipes.data``."""

from __future__ import annotations

import dataclasses
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import datasets
from datasets.data_files import DataFilesDict, EmptyDatasetError, get_data_patterns
from PIL import Image

from adaptkit.errors import ConfigError, DataError
from adaptkit.recipes.data import FORMATS, Table, quiet, check_options, from_dataset, read_file

SPLITS = ("train", "validation", "test")


@dataclass
class Splits:
    train: Table | datasets.Dataset  # Tables for labelled text; Datasets for language-model rows and images
    validation: Table | datasets.Dataset
    test: Table | datasets.Dataset | None  # None when the source has no labelled test split
    notes: list[str] = field(default_factory=list)  # how each split was obtained

    def items(self) -> list[tuple[str, Table | datasets.Dataset]]:
        return [(split, rows) for split in SPLITS if (rows := getattr(self, split)) is not None]


def load_raw(source=None, *, dataset_name: str | None = None, dataset_config: str | None = None):
    """``{split: Dataset}`` and ``{split: where from}``: a hub name, a ``save_to_disk`` folder, a folder of split files
    or of image class folders, one file (train), a ``{split: path}`` mapping, or a ``DatasetDict``."""
    quiet()
    if dataset_name is not None:
        name = f"{dataset_name}{'/' + dataset_config if dataset_config else ''}"
        try:
            loaded = dict(datasets.load_dataset(dataset_name, dataset_config))
        except datasets.exceptions.DatasetGenerationError as err:  # files whose columns or types differ
            files = sorted(p.name for p in Path(dataset_name).iterdir()) if Path(dataset_name).is_dir() else []
            cause = " ".join(str(err.__cause__ or err).split())[:160]
            raise DataError("--dataset-name", name, f"its files do not share one set of columns and types {files} "
                            f"({cause})", "keep one format per folder, or name the files: --train-file ... "
                            "--validation-file ...") from None
        except (OSError, ValueError) as err:  # ConnectionError, DatasetNotFoundError, bad config name
            raise DataError("--dataset-name", f"{dataset_name} {dataset_config or ''}".strip(), f"the Hugging Face hub "
                            f"(or its cache) failed ({type(err).__name__}: {str(err)[:160]})",
                            "pass a local folder or file as --data; the hub is unreachable offline") from None
        return loaded, {split: f"{name}[{split}]" for split in loaded}
    if isinstance(source, datasets.DatasetDict):
        return dict(source), {split: f"DatasetDict[{split}]" for split in source}
    if isinstance(source, Mapping):
        if set(source) - set(SPLITS) or "train" not in source:
            raise ConfigError("source", sorted(source), "keys must be 'train', 'validation', 'test'", "include 'train'")
        return {split: read_file(f) for split, f in source.items()}, {split: str(f) for split, f in source.items()}
    path = Path(source)
    if path.is_file():
        return {"train": read_file(path)}, {"train": str(path)}
    if not path.is_dir():
        raise DataError("source", str(source), "no such file or folder", "pass a folder, a file, or --dataset-name")
    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        loaded = datasets.load_from_disk(str(path))
        loaded = dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {"train": loaded}
        return loaded, {split: f"{path}[{split}]" for split in loaded}
    if "train" in (files := _split_files(path)):
        return {split: read_file(f) for split, f in files.items()}, {split: str(f) for split, f in files.items()}
    if not files and any(d.is_dir() for d in path.iterdir()):  # class folders, maybe under train/ validation/ test/
        loaded = dict(datasets.load_dataset("imagefolder", data_dir=str(path)))
        return loaded, {split: f"{path}[{split}]" for split in loaded}
    raise DataError(str(path), sorted(p.name for p in path.iterdir()), "the folder has no train file", f"add train.tsv "
                    f"(or another of {list(FORMATS)}), image class folders, or pass files: --train-file ...")


def _split_files(folder: Path) -> dict[str, Path]:
    try:
        patterns = get_data_patterns(str(folder))
    except EmptyDatasetError:  # an empty folder: no split files (the caller says what is missing)
        return {}
    found = {str(split): sorted(f for f in map(Path, hits) if f.suffix.lower() in FORMATS and f.parent == folder.resolve())
             for split, hits in DataFilesDict.from_patterns(patterns, base_path=str(folder)).items()}
    files = {split: hits for split, hits in found.items() if hits and patterns[split] != ["**"]}  # "**": no split named
    for split, hits in files.items():
        if len(hits) > 1:
            raise DataError(str(folder), [h.name for h in hits], f"several {split} files", "keep one per split")
    return {split: hits[0] for split, hits in files.items()}


def labelled(ds, label_column: str) -> bool:
    """False for a split without labels: no label column, or all -1 / None (GLUE's hidden test set)."""
    return label_column in ds.column_names and any(v not in (-1, None) for v in set(ds.unique(label_column)))


def check_images(ds, where: str):
    """Decode every image before training: a corrupt or over-large one is a DataError naming it, not a crash mid-run."""
    for column in [c for c, f in ds.features.items() if isinstance(f, datasets.Image)]:
        for i, item in enumerate(ds.cast_column(column, datasets.Image(decode=False))[column]):
            name = item.get("path") or f"{where}, row {i + 1}"
            try:
                with Image.open(item["path"] if item.get("bytes") is None else io.BytesIO(item["bytes"])) as im:
                    im.load()  # decodes it: truncated and corrupt data fail here (verify() skips JPEG data)
            except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
                raise DataError(f"{where}, image", name, f"cannot be used: {type(err).__name__}: {str(err)[:120]}",
                                "replace or remove the file (PIL refuses images over Image.MAX_IMAGE_PIXELS)") from None
    return ds


def arrange(splits: dict, *, fraction: float, seed: int, stratify: str | None = None, carve_from_train: bool = False,
            max_train: int | None = None, max_eval: int | None = None, name: str = "train") -> tuple[dict, list[str]]:
    splits, notes = dict(splits), [f"{split}: {len(rows)} rows" for split, rows in splits.items()]
    if carve_from_train and "validation" in splits:
        if "test" in splits:
            raise ConfigError("--select-on-train-carve", sorted(splits), "validation split would go unused", "drop it")
        splits["test"] = splits.pop("validation")
        notes.append("--select-on-train-carve: the validation split is scored as the test set")
    if "validation" not in splits:
        try:
            parts = splits["train"].train_test_split(test_size=fraction, seed=seed, stratify_by_column=stratify)
        except ValueError as err:  # too few rows, or a class with a single example
            raise DataError(f"{name} validation split", fraction, f"cannot carve it: {err}",
                            "add examples, or pass a validation file") from None
        splits["train"], splits["validation"] = parts["train"].flatten_indices(), parts["test"].flatten_indices()
        notes.append(f"validation: {len(splits['validation'])} rows carved from train ({fraction:g}, seed {seed}"
                     f"{', stratified' if stratify else ''}); train keeps {len(splits['train'])}")
    for split, limit in (("train", max_train), ("validation", max_eval), ("test", max_eval)):
        if split in splits and limit and limit < len(splits[split]):
            splits[split] = splits[split].shuffle(seed=seed).select(range(limit)).flatten_indices()
            notes.append(f"{split}: {limit} rows sampled (seed {seed})")
    return splits, notes


def load_splits(source=None, *, dataset_name: str | None = None, dataset_config: str | None = None,
                validation_fraction: float = 0.1, seed: int = 0, max_train: int | None = None,
                max_eval: int | None = None, select_on_train_carve: bool = False, prepare: Callable | None = None,
                label_column: str | None = "label", text_columns=None, task: str | None = None,
                num_labels: int | None = None) -> Splits:
    """The splits of ``source`` (see ``load_raw``) by the one convention. Labelled text becomes Tables; with
    ``prepare(ds, where)`` (language-model rows, images) they stay Datasets, each checked by it as read (rows counted
    as in the file). Validation and test splits without labels in ``label_column`` are dropped."""
    if not 0 < validation_fraction < 1:
        raise ConfigError("validation_fraction", validation_fraction, "must be in (0, 1)", "e.g. 0.1 holds out 10%")
    check_options(text_columns, task, num_labels)
    raw, where = load_raw(source, dataset_name=dataset_name, dataset_config=dataset_config)
    if "train" not in raw:
        raise DataError("source", f"splits {list(raw)}", "no train split", "use a dataset with a 'train' split")
    if prepare is not None and label_column is not None and not labelled(raw["train"], label_column):
        raise DataError(where["train"], raw["train"].column_names, f"the train split has no labels in column "
                        f"{label_column!r}", "pass --label-column; an image folder needs 2+ class sub-folders")
    raw = {s: raw[s] for s in SPLITS  # other splits (imdb's unsupervised) go; so do validation or test without labels
           if s == "train" or s in raw and (not label_column or labelled(raw[s], label_column))}
    if prepare is None:  # the train split fixes columns, task and label set so the others cannot drift from it
        train = from_dataset(raw["train"], where["train"], text_columns, label_column, task, num_labels, None)
        same = dict(text_columns=list(train.text_columns), label_column=label_column, task=train.task,
                    num_labels=train.num_labels if train.task == "classification" else None,
                    label_names=train.label_names)
        read = {s: train if s == "train" else from_dataset(ds, where[s], **same) for s, ds in raw.items()}
    else:
        read = {s: prepare(ds, where[s]) for s, ds in raw.items()}
    rows = {s: t.data if isinstance(t, Table) else t for s, t in read.items()}
    labels = "labels" if prepare is None else label_column
    stratify = labels if isinstance(rows["train"].features.get(labels), datasets.ClassLabel) else None
    arranged, notes = arrange(rows, fraction=validation_fraction, seed=seed, stratify=stratify, max_train=max_train,
                              max_eval=max_eval, carve_from_train=select_on_train_carve, name=where["train"])
    if prepare is None:
        arranged = {s: dataclasses.replace(read.get(s, read["train"]), data=ds) for s, ds in arranged.items()}
    notes = [f"{s}: {where[s]}" for s in read] + (read["train"].notes if prepare is None else []) + notes
    return Splits(arranged["train"], arranged["validation"], arranged.get("test"), notes)


def add_data_args(parser, *, what: str = "data files") -> None:
    g = parser.add_argument_group("data")
    g.add_argument("--data", help=f"a folder ({what} named train/validation(dev)/test, or a save_to_disk folder), "
                                  "or one file used as train")
    g.add_argument("--dataset-name", help="a datasets name (hub or its cache) or a local dataset folder")
    g.add_argument("--dataset-config", help="the dataset's configuration, e.g. --dataset-name glue --dataset-config sst2")
    g.add_argument("--train-file")
    g.add_argument("--validation-file", help="evaluated during training; picks the adapter kept")
    g.add_argument("--test-file", help="the final adapter is scored on it")
    g.add_argument("--validation-fraction", type=float, default=0.1,
                   help="share of train carved off (seeded, stratified) when there is no validation split")
    g.add_argument("--select-on-train-carve", action="store_true", help="the benchmark's protocol: select on a "
                   "carve from train, and score the validation split as the test set")
    g.add_argument("--max-train-samples", type=int, help="a seeded random N of train")
    g.add_argument("--max-eval-samples", type=int, help="a seeded random N of validation and of test")


def splits_from_args(args, **options) -> Splits:
    """``load_splits`` of the data flags (``add_data_args``); ``options`` go to it."""
    files = {split: getattr(args, f"{split}_file") for split in SPLITS if getattr(args, f"{split}_file")}
    if files and files.setdefault("train", args.data) is None:
        raise ConfigError("--train-file", None, "--validation-file/--test-file need a train file", "pass it")
    if not files and args.data is None and args.dataset_name is None:
        raise ConfigError("--data", None, "no data given", "pass --data PATH, --train-file FILE, or --dataset-name")
    return load_splits(files or args.data, dataset_name=args.dataset_name, dataset_config=args.dataset_config,
                       validation_fraction=args.validation_fraction, seed=args.seed, max_train=args.max_train_samples,
                       max_eval=args.max_eval_samples, select_on_train_carve=args.select_on_train_carve, **options)
