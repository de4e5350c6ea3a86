"""Data for the recipes, read by ``datasets`` and checked before any training starts.

Reading is ``datasets.load_dataset``: csv/tsv, json/jsonl, parquet, arrow and text files, image
folders, ``save_to_disk`` folders (``load_from_disk``) and hub names with a config
(``--dataset-name glue --dataset-config sst2``). What it raises raw (a pandas ParserError, an Arrow
JSON error, a UnicodeDecodeError, a ConnectionError) is re-said as a ``DataError`` naming the file,
the row and the fix. ``.tsv`` is read tab-separated with quoting off (texts may hold literal ``"``;
default CSV quoting would silently merge rows) and every csv/tsv cell stays text until the labels
are typed, so an empty cell or a literal ``nan`` is reported as what it is.

**One split convention for every recipe** (``arrange``):

* splits are named as ``datasets`` names them: ``train``, ``validation`` (files or folders named
  ``validation``, ``valid``, ``val`` or ``dev``), ``test``. A split whose labels are all -1 or
  missing (GLUE's hidden test set) is dropped.
* no labelled test split: the validation split becomes the test set (GLUE keeps its test labels
  private, so its dev set is what results are reported on). Files passed explicitly as
  ``validation`` keep their role.
* no validation split (then): ``validation_fraction`` of train is carved off, seeded, stratified by
  label for classification.
* ``--max-train-samples`` / ``--max-eval-samples`` keep a seeded random subset (in file order),
  the same rule in every recipe.

For text classification, ``read_table`` / ``load_splits`` give checked ``Table`` s
(``adaptkit.recipes.tables``: text columns found, labels typed once), the train split fixing columns,
task and label set for the others.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import numpy as np

from adaptkit.errors import ConfigError, DataError
from adaptkit.recipes import tables
from adaptkit.recipes.tables import TEXT_COLUMN_CANDIDATES, Table  # re-exported: data.Table in the recipes

__all__ = ["Table", "Splits", "read_table", "load_splits", "load_raw", "arrange", "sample", "carve",
           "TEXT_COLUMN_CANDIDATES", "FORMATS", "SPLIT_NAMES"]

# file suffix -> datasets' packaged builder
FORMATS = {".tsv": "csv", ".csv": "csv", ".jsonl": "json", ".json": "json", ".parquet": "parquet",
           ".arrow": "arrow", ".txt": "text"}
EXTENSIONS = tuple(FORMATS)
# datasets' own split keywords (datasets.data_files): a file or folder stem -> the split it is
SPLIT_NAMES = {"train": ("train", "training"), "validation": ("validation", "valid", "val", "dev"),
               "test": ("test", "testing")}


@dataclass
class Splits:
    train: Table
    validation: Table
    test: Table | None  # None when the source has no labelled test split
    notes: list[str] = field(default_factory=list)  # how each split was obtained


# ---------------------------------------------------------------------------------------- reading

def _datasets():
    import datasets

    datasets.logging.set_verbosity_error()  # it logs every parse error before raising it; we re-say them
    datasets.disable_progress_bars()
    return datasets


def _split_of(stem: str) -> str | None:
    return next((split for split, names in SPLIT_NAMES.items() if stem.lower() in names), None)


def read_file(path) -> "datasets.Dataset":
    """One data file through ``datasets.load_dataset``; every failure is a DataError naming the file."""
    p = Path(path)
    if p.is_dir():
        raise DataError(field="path", value=str(p), problem="is a folder, not a file",
                        fix=f"pass a file such as {p / 'train.tsv'}, or the folder as --data")
    if not p.is_file():
        raise DataError(field="path", value=str(p), problem="no such file", fix="check the path (relative to the "
                        "current directory) or set it to an existing data file")
    ext = p.suffix.lower()
    if ext not in FORMATS:
        raise DataError(field="path", value=str(p), problem=f"unknown extension {ext!r}",
                        fix=f"save the data as one of {list(EXTENSIONS)}")
    options = {}
    if FORMATS[ext] == "csv":  # cells stay text (no NaN guessing); .tsv: tabs, quoting off
        # index_col=False: pandas otherwise takes a first data row with one field more than the header as
        # "the first column is the index" and shifts every column of the file by one, silently
        options = dict(keep_default_na=False, na_filter=False, index_col=False,
                       **({"sep": "\t", "quoting": 3} if ext == ".tsv" else {}))
    try:
        from pandas.errors import ParserWarning  # pandas comes with datasets
        with warnings.catch_warnings():  # ... and then only warns that it drops the extra field: an error here
            warnings.simplefilter("error", ParserWarning)
            ds = _datasets().load_dataset(FORMATS[ext], data_files={"train": str(p)}, **options)["train"]
    except Exception as err:  # noqa: BLE001 - re-said below with the file and the fix, or re-raised
        raise _read_error(err, p, ext) from None
    columns = ds.column_names
    if len(columns) == 1 and FORMATS[ext] == "csv" and ("," if ext == ".tsv" else "\t") in columns[0]:
        right = ".tsv (tab-separated, quoting off)" if ext == ".csv" else ".csv (comma-separated)"
        raise DataError(field=str(p), value=columns[0][:80], problem=f"wrong delimiter: the header is one column "
                        f"holding {'tabs' if ext == '.csv' else 'commas'}", fix=f"rename the file to {right}")
    repeated = [c for c in columns if re.fullmatch(r"(.+)\.\d+", c) and c.rsplit(".", 1)[0] in columns]
    if repeated or any(c == "" or c.startswith("Unnamed: ") for c in columns):  # pandas renames both
        raise DataError(field=str(p), value=columns, problem="the header has empty or repeated column names",
                        fix="give every column a unique name on the first line")
    if len(ds) == 0:
        raise DataError(field="path", value=str(p), problem=f"has a header {columns} but no data rows",
                        fix="add data rows below the header")
    return ds


def _read_error(err: Exception, p: Path, ext: str) -> Exception:
    chain, cause = [], err
    while cause is not None and len(chain) < 5:
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    text = " | ".join(f"{type(c).__name__}: {c}" for c in chain)
    if any(isinstance(c, UnicodeDecodeError) for c in chain) or "Invalid UTF8" in text:
        raw = p.read_bytes()
        try:
            raw.decode("utf-8")
            at = 0
        except UnicodeDecodeError as bad:
            at = bad.start
        line = raw.count(b"\n", 0, at) + 1
        return DataError(field=str(p), value=f"byte 0x{raw[at]:02x} at offset {at} (line {line})",
                         problem="is not valid UTF-8",
                         fix=f"re-encode the file as UTF-8, e.g. iconv -f cp1252 -t utf-8 {p} > fixed{ext}")
    if "EmptyDataError" in text or "No columns to parse" in text or (p.stat().st_size == 0):
        return DataError(field="path", value=str(p), problem="the file is empty",
                         fix="write a header line and at least one data row")
    if "corresponds to no data" in text:  # a header line and nothing else
        header = p.read_text(encoding="utf-8", errors="replace").strip().splitlines()[:1] or [""]
        columns = header[0].split("\t" if ext == ".tsv" else ",") if FORMATS[ext] == "csv" else header
        return DataError(field="path", value=str(p), problem=f"has a header {columns} but no data rows",
                         fix="add data rows below the header")
    if "Length of header or names does not match length of data" in text:  # the first data row, one field more
        header = p.read_text(encoding="utf-8", errors="replace").splitlines()[0]
        count = len(header.split("\t" if ext == ".tsv" else ","))
        text = f"Expected {count} fields in line 2, saw {count + 1}"
    if match := re.search(r"Expected (\d+) fields in line (\d+), saw (\d+)", text):
        fix = ("a text holds a tab, or the file is not tab-separated; quoting is off in .tsv, so quotes do not "
               "protect tabs: remove them" if ext == ".tsv" else
               "quote fields that hold commas (standard CSV), or save the data as .tsv")
        return DataError(field=f"{p}, line {match[2]}", value=f"{match[3]} fields",
                         problem=f"has {match[3]} fields but the header has {match[1]} (wrong delimiter or quoting?)",
                         fix=fix)
    if "EOF inside string" in text or "ParserError" in text:
        row = re.search(r"row (\d+)", text)
        return DataError(field=f"{p}, line {int(row[1]) + 1}" if row else str(p), value=text[-120:],
                         problem="malformed CSV", fix="close every quoted field and double quotes inside quoted "
                                                      "fields (\"\")")
    if FORMATS[ext] == "json":
        row = re.search(r"in row (\d+)", text)
        where = f"{p}, record {int(row[1]) + 1}" if row else str(p)
        return DataError(field=where, value=str(chain[-1])[:120], problem="is not valid JSON (or mixes types in a "
                         "column)", fix="write one JSON object per line (JSON lines) with the same keys and value types, "
                                        "or one JSON array of such objects")
    return DataError(field=str(p), value=text[:200], problem="datasets could not read it",
                     fix=f"check that it is a well-formed {ext} file")


def read_table(path, text_columns=None, label_column: str = "label", task: str | None = None,
               num_labels: int | None = None, label_names: list[str] | None = None) -> Table:
    """Read one labelled file into a checked Table (see the module docstring).

    ``num_labels`` / ``label_names`` (e.g. taken from the train split) make out-of-range or unseen
    labels an error instead of silently growing the label set.
    """
    tables.check_options(text_columns, task, num_labels)
    return tables.from_dataset(read_file(path), str(Path(path)), text_columns, label_column, task, num_labels,
                               label_names)


def load_raw(source=None, *, dataset_name: str | None = None, dataset_config: str | None = None):
    """``{split: datasets.Dataset}`` and ``{split: where it came from}`` (for messages), from one of:

    * ``dataset_name`` (+ ``dataset_config``): ``datasets.load_dataset(name, config)``, the hub or its cache;
    * a ``save_to_disk`` folder: ``datasets.load_from_disk``;
    * a folder of split files (``train.tsv``, ``dev.tsv``, ...; stems as in ``SPLIT_NAMES``) or of
      image class folders (``imagefolder``, with optional ``train/``, ``validation/``, ``test/``);
    * one file (the train split), or a mapping ``{"train": path, "validation": path, "test": path}``;
    * a ``datasets.DatasetDict`` already loaded.
    """
    datasets = _datasets()
    if dataset_name is not None:
        try:
            loaded = dict(datasets.load_dataset(dataset_name, dataset_config))
            name = f"{dataset_name}{'/' + dataset_config if dataset_config else ''}"
            return loaded, {split: f"{name}[{split}]" for split in loaded}
        except (OSError, ValueError) as err:  # ConnectionError, DatasetNotFoundError, bad config name
            raise DataError(field="--dataset-name", value=f"{dataset_name} {dataset_config or ''}".strip(),
                            problem=f"the Hugging Face hub (or its cache) failed ({type(err).__name__}: "
                                    f"{str(err)[:160]})", fix="pass a local folder or file as --data; the hub is "
                                                              "unreachable offline (HF_HUB_OFFLINE=1)") from None
    if isinstance(source, datasets.DatasetDict):
        return dict(source), {split: f"DatasetDict[{split}]" for split in source}
    if isinstance(source, Mapping):
        unknown = sorted(set(source) - set(SPLIT_NAMES))
        if unknown or "train" not in source:
            raise ConfigError(field="source", value=sorted(source), problem="keys must be 'train' (required), "
                              "'validation', 'test'", fix="load_splits({'train': 'a.tsv', 'test': 'b.tsv'})")
        return {split: read_file(f) for split, f in source.items()}, {split: str(f) for split, f in source.items()}
    path = Path(source)
    if path.is_file():
        return {"train": read_file(path)}, {"train": str(path)}
    if not path.is_dir():
        raise DataError(field="source", value=str(source), problem="no such file or folder",
                        fix="pass a folder with train.tsv (and dev.tsv/test.tsv), a file, or --dataset-name NAME")
    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        loaded = datasets.load_from_disk(str(path))
        loaded = dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {"train": loaded}
        return loaded, {split: f"{path}[{split}]" for split in loaded}
    files = _split_files(path)
    if files:
        return {split: read_file(f) for split, f in files.items()}, {split: str(f) for split, f in files.items()}
    if any(d.is_dir() for d in path.iterdir()):  # class folders, maybe under train/ validation/ test/
        loaded = dict(datasets.load_dataset("imagefolder", data_dir=str(path)))
        return loaded, {split: f"{path}[{split}]" for split in loaded}
    raise DataError(field=str(path), value=sorted(p.name for p in path.iterdir()), problem="the folder has no "
                    "train file", fix=f"add train.tsv (or another of {list(EXTENSIONS)}), image class folders, or "
                                      "pass files: --train-file ... --validation-file ... --test-file ...")


def _split_files(folder: Path) -> dict[str, Path]:
    files: dict[str, list[Path]] = {}
    for f in sorted(folder.iterdir()):
        split = _split_of(f.stem) if f.is_file() and f.suffix.lower() in FORMATS else None
        if split:
            files.setdefault(split, []).append(f)
    for split, hits in files.items():
        if len(hits) > 1:
            raise DataError(field=str(folder), value=[h.name for h in hits], problem=f"several {split} files "
                            f"(names for {split}: {list(SPLIT_NAMES[split])})",
                            fix="keep one file per split, or pass them explicitly: --train-file ... --validation-file ...")
    if files and "train" not in files:
        raise DataError(field=str(folder), value=sorted(f.name for f in folder.iterdir()),
                        problem="the folder has no train file",
                        fix=f"add train.tsv (or another of {list(EXTENSIONS)}), or pass the files explicitly")
    return {split: hits[0] for split, hits in files.items()}


def labelled(ds, label_column: str) -> bool:
    """False for a split without labels: no label column, or all -1 / None (GLUE's hidden test set)."""
    return label_column in ds.column_names and any(v not in (-1, None) for v in ds[label_column])


# ---------------------------------------------------------------------------------------- splits

def sample(rows, limit: int | None, seed: int):
    """A seeded random ``limit`` rows of ``rows`` (a Dataset or a Table), kept in their order."""
    if not limit or limit >= len(rows):
        return rows
    return rows.select(sorted(np.random.default_rng(seed).permutation(len(rows))[:limit].tolist()))


def carve(rows, fraction: float, seed: int, strata=None, name: str = "train"):
    """Split ``rows`` into (kept, held) with ``fraction`` held, seeded; stratified when ``strata`` is given."""
    from sklearn.model_selection import train_test_split

    try:
        keep, held = train_test_split(np.arange(len(rows)), test_size=fraction, random_state=seed, stratify=strata)
    except ValueError as err:  # too few rows, or a class with a single example
        raise DataError(field=f"{name} validation split", value=fraction, problem=f"cannot carve it: {err}",
                        fix="add examples, or pass a validation file") from None
    return rows.select(sorted(keep.tolist())), rows.select(sorted(held.tolist()))


def arrange(splits: dict, *, fraction: float, seed: int, strata: Callable | None = None, keep_validation=False,
            max_train: int | None = None, max_eval: int | None = None, name: str = "train") -> tuple[dict, list[str]]:
    """The one split convention (module docstring) over ``{"train": ..., "validation": ..., "test": ...}``.

    ``strata(rows)`` gives the labels to stratify the carved validation split by (None: not stratified).
    ``keep_validation``: the validation split was named explicitly, so it stays validation.
    """
    if not 0 < fraction < 1:
        raise ConfigError(field="validation_fraction", value=fraction, problem="must be in (0, 1)",
                          fix="use e.g. 0.1 to hold out 10% of train")
    splits = dict(splits)
    notes = [f"{split}: {len(rows)} rows" for split, rows in splits.items()]
    if "test" not in splits and "validation" in splits and not keep_validation:
        splits["test"] = splits.pop("validation")
        notes.append("no labelled test split: validation is the test set (GLUE keeps its test labels private)")
    if "validation" not in splits:
        splits["train"], splits["validation"] = carve(splits["train"], fraction, seed,
                                                      strata(splits["train"]) if strata else None, name)
        notes.append(f"validation: {len(splits['validation'])} rows carved from train ({fraction:g}, seed {seed}"
                     f"{', stratified' if strata else ''}); train keeps {len(splits['train'])}")
    for split, limit in (("train", max_train), ("validation", max_eval), ("test", max_eval)):
        if split in splits and limit and limit < len(splits[split]):
            splits[split] = sample(splits[split], limit, seed)
            notes.append(f"{split}: {limit} rows sampled (seed {seed})")
    return splits, notes


def load_splits(source=None, *, dataset_name: str | None = None, dataset_config: str | None = None,
                text_columns=None, label_column: str = "label", task: str | None = None,
                num_labels: int | None = None, validation_fraction: float = 0.1, seed: int = 0,
                max_train: int | None = None, max_eval: int | None = None) -> Splits:
    """Checked train / validation / test Tables from ``source`` (``load_raw``), arranged by ``arrange``."""
    if not 0 < validation_fraction < 1:
        raise ConfigError(field="validation_fraction", value=validation_fraction, problem="must be in (0, 1)",
                          fix="use e.g. 0.1 to hold out 10% of train")
    tables.check_options(text_columns, task, num_labels)
    if isinstance(source, str) and dataset_name is None and not Path(source).exists() and \
            re.fullmatch(r"[\w][\w.-]*/[\w.-]+", source) and Path(source).suffix.lower() not in FORMATS:
        dataset_name, dataset_config = source.split("/", 1)  # "glue/sst2": name/config, as adaptkit took before
        dataset_name, dataset_config = ("nyu-mll/glue", dataset_config) if dataset_name == "glue" else (source, None)
    raw, where = load_raw(source, dataset_name=dataset_name, dataset_config=dataset_config)
    found = list(raw)
    raw = {s: ds for s, ds in raw.items() if s in SPLIT_NAMES and labelled(ds, label_column)}
    if "train" not in raw:
        raise DataError(field="source", value=f"splits {found}", problem="no labelled train split",
                        fix="use a dataset with a 'train' split, or a local folder")
    train = tables.from_dataset(raw["train"], where["train"], text_columns, label_column, task, num_labels, None)
    # the train split fixes columns, task and label set so the others cannot drift from it
    same = dict(text_columns=list(train.text_columns), label_column=label_column, task=train.task,
                num_labels=train.num_labels if train.task == "classification" else None,
                label_names=train.label_names)
    read = {"train": train, **{s: tables.from_dataset(raw[s], where[s], **same) for s in ("validation", "test") if s in raw}}
    strata = (lambda t: t.labels) if train.task == "classification" else None
    read, notes = arrange(read, fraction=validation_fraction, seed=seed, strata=strata, max_train=max_train,
                          max_eval=max_eval, keep_validation=_explicit(source), name=str(train.path))
    notes = [f"{split}: {where[split]}" for split in raw] + notes
    return Splits(read["train"], read["validation"], read.get("test"), notes)


def _explicit(source) -> bool:
    """Files named split by split: their validation file stays validation."""
    return isinstance(source, Mapping) and not isinstance(source, _datasets().DatasetDict)


# ---------------------------------------------------------------------------------------- recipe flags

def add_data_args(parser, *, what: str = "data files") -> None:
    """The data flags every recipe has, named as in transformers' examples."""
    g = parser.add_argument_group("data")
    g.add_argument("--data", help=f"a folder ({what} named train/validation(dev)/test, or a save_to_disk folder), "
                                  "or one file used as train")
    g.add_argument("--dataset-name", help="a datasets name (hub or its cache) or a local dataset folder")
    g.add_argument("--dataset-config", help="the dataset's configuration, e.g. --dataset-name glue --dataset-config sst2")
    g.add_argument("--train-file")
    g.add_argument("--validation-file", help="used for model selection as given")
    g.add_argument("--test-file", help="the final adapter is scored on it")
    g.add_argument("--validation-fraction", type=float, default=0.1,
                   help="share of train carved off (seeded, stratified) when there is no validation split")
    g.add_argument("--max-train-samples", type=int, help="a seeded random N of train")
    g.add_argument("--max-eval-samples", type=int, help="a seeded random N of validation and of test")


def source_of(args):
    """What ``load_raw`` / ``load_splits`` read for these flags: explicit files, --data, or --dataset-name."""
    files = {split: getattr(args, f"{split}_file") for split in SPLIT_NAMES if getattr(args, f"{split}_file")}
    if files:
        files.setdefault("train", args.data)
        if files["train"] is None:
            raise ConfigError(field="--train-file", value=None, problem="--validation-file/--test-file need a train "
                              "file", fix="pass --train-file (or --data FILE)")
        return files
    if args.data is None and args.dataset_name is None:
        raise ConfigError(field="--data", value=None, problem="no data given",
                          fix="pass --data FOLDER_OR_FILE, --train-file FILE, or --dataset-name NAME")
    return args.data


def splits_from_args(args, *, label_column: str | None = None, strata: Callable | None = None,
                     prepare: Callable | None = None):
    """``{split: datasets.Dataset}`` and notes, arranged by the one convention (``arrange``) for these flags.

    With ``label_column``, splits without labels are dropped (GLUE's hidden test set). ``prepare``
    maps each split before it is arranged (e.g. drops blank lines).
    """
    source = source_of(args)
    raw, where = load_raw(source, dataset_name=args.dataset_name, dataset_config=args.dataset_config)
    raw = {split: prepare(ds) for split, ds in raw.items()} if prepare else raw
    if "train" not in raw:
        raise DataError(field="--data", value=sorted(where), problem="no train split",
                        fix="use a dataset with a 'train' split, or a local folder with train files")
    if label_column is not None and not labelled(raw["train"], label_column):
        raise DataError(field=where["train"], value=raw["train"].column_names, problem=f"the train split has no "
                        f"labels in column {label_column!r}", fix="name the label column with --label-column; an "
                        "image folder needs 2+ class sub-folders (datasets labels nothing with one)")
    raw = {s: ds for s, ds in raw.items() if s in SPLIT_NAMES and (label_column is None or labelled(ds, label_column))}
    splits, notes = arrange(raw, fraction=args.validation_fraction, seed=args.seed, strata=strata,
                            keep_validation=_explicit(source), max_train=args.max_train_samples,
                            max_eval=args.max_eval_samples, name=where["train"])
    return splits, [f"{split}: {where[split]}" for split in raw] + notes
