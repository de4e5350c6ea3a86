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

For text classification, ``read_table`` / ``load_splits`` give checked ``Table`` s: text columns
(``sentence1``+``sentence2``, ``text_a``+``text_b``, ``sentence``, ``text``, ``text_a`` unless named),
labels typed once (integers -> classes 0..K-1, strings or a ``ClassLabel`` -> class names, other
numbers -> regression), the train split fixing columns, task and label set for the others.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from adaptkit.errors import ConfigError, ConfigTypeError, DataError

__all__ = ["Table", "Splits", "read_table", "load_splits", "load_raw", "arrange", "sample", "carve",
           "TEXT_COLUMN_CANDIDATES", "FORMATS", "SPLIT_NAMES"]

TEXT_COLUMN_CANDIDATES = (("sentence1", "sentence2"), ("text_a", "text_b"), ("sentence",), ("text",), ("text_a",))
# file suffix -> datasets' packaged builder
FORMATS = {".tsv": "csv", ".csv": "csv", ".jsonl": "json", ".json": "json", ".parquet": "parquet",
           ".arrow": "arrow", ".txt": "text"}
EXTENSIONS = tuple(FORMATS)
# datasets' own split keywords (datasets.data_files): a file or folder stem -> the split it is
SPLIT_NAMES = {"train": ("train", "training"), "validation": ("validation", "valid", "val", "dev"),
               "test": ("test", "testing")}
TASKS = ("classification", "regression")
_INT = re.compile(r"[+-]?\d+")


@dataclass
class Table:
    """One split: ``texts[i]`` is a tuple of 1 or 2 strings, ``labels[i]`` an int class id or a float."""

    texts: list[tuple[str, ...]]
    labels: list
    task: str  # "classification" or "regression"
    num_labels: int  # 1 for regression
    label_names: list[str] | None  # class names by id, when the labels were strings or a ClassLabel
    text_columns: tuple[str, ...]
    path: str | None  # the file (or "name[split]") it came from

    def __len__(self) -> int:
        return len(self.texts)

    def select(self, indices) -> "Table":
        """The rows at ``indices``, like ``datasets.Dataset.select``."""
        return dataclasses.replace(self, texts=[self.texts[i] for i in indices],
                                   labels=[self.labels[i] for i in indices])


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
        options = dict(keep_default_na=False, na_filter=False, **({"sep": "\t", "quoting": 3} if ext == ".tsv" else {}))
    try:
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
    _check_options(text_columns, task, num_labels)
    return _table(read_file(path), str(Path(path)), text_columns, label_column, task, num_labels, label_names)


def _table(ds, source: str, text_columns, label_column, task, num_labels, label_names) -> Table:
    feature = ds.features.get(label_column)
    class_names = list(feature.names) if hasattr(feature, "names") else None  # a ClassLabel names its classes
    records = ds.to_list()
    where = [f"row {i + 1}" for i in range(len(records))]
    return _build_table(ds.column_names, records, where, source, text_columns, label_column, task, num_labels,
                        label_names or class_names)


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
    _check_options(text_columns, task, num_labels)
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
    train = _table(raw["train"], where["train"], text_columns, label_column, task, num_labels, None)
    # the train split fixes columns, task and label set so the others cannot drift from it
    same = dict(text_columns=list(train.text_columns), label_column=label_column, task=train.task,
                num_labels=train.num_labels if train.task == "classification" else None,
                label_names=train.label_names)
    tables = {"train": train, **{s: _table(raw[s], where[s], **same) for s in ("validation", "test") if s in raw}}
    strata = (lambda t: t.labels) if train.task == "classification" else None
    tables, notes = arrange(tables, fraction=validation_fraction, seed=seed, strata=strata, max_train=max_train,
                            max_eval=max_eval, keep_validation=_explicit(source), name=str(train.path))
    notes = [f"{split}: {where[split]}" for split in raw] + notes
    return Splits(tables["train"], tables["validation"], tables.get("test"), notes)


def _explicit(source) -> bool:
    """Files named split by split: their validation file stays validation."""
    return isinstance(source, Mapping) and not isinstance(source, _datasets().DatasetDict)


# ---------------------------------------------------------------------------------------- tables

def _check_options(text_columns, task, num_labels) -> None:
    if isinstance(text_columns, str):
        raise ConfigTypeError(field="text_columns", value=text_columns, problem="must be a list of 1 or 2 names",
                              fix=f"text_columns=[{text_columns!r}]")
    if text_columns is not None and not 1 <= len(text_columns) <= 2:
        raise ConfigError(field="text_columns", value=list(text_columns), problem="must name 1 or 2 columns",
                          fix="join extra fields into one text column, or pass a single sentence or a pair")
    if task not in (None, *TASKS):
        raise ConfigError(field="task", value=task, problem=f"must be None or one of {list(TASKS)}",
                          fix="leave task=None to infer it from the labels")
    if num_labels is not None and (not isinstance(num_labels, int) or isinstance(num_labels, bool) or num_labels < 1):
        raise ConfigError(field="num_labels", value=num_labels, problem="must be a positive integer",
                          fix="pass the number of classes (1 for regression) or None to infer it")


def _pick_text_columns(columns: list[str], text_columns, source: str) -> tuple[str, ...]:
    if text_columns is not None:
        missing = [c for c in text_columns if c not in columns]
        if missing:
            raise DataError(field=f"{source} text_columns", value=missing, problem=f"not found; the columns are "
                            f"{columns}", fix="pass text_columns with names from the header")
        return tuple(text_columns)
    found = [c for c in TEXT_COLUMN_CANDIDATES if all(name in columns for name in c)]
    # a single column that is part of a found pair is that pair, not a second match
    found = [c for c in found if not any(len(o) > len(c) and set(c) <= set(o) for o in found)]
    if len(found) != 1:
        problem = (f"no text column; the columns are {columns}" if not found
                   else f"ambiguous text columns: {[list(c) for c in found]} all match")
        raise DataError(field=f"{source} text_columns", value=None, problem=problem,
                        fix=f"name columns as one of {[list(c) for c in TEXT_COLUMN_CANDIDATES]}, or pass "
                            "text_columns=[...] (1 or 2 names)")
    return found[0]


def _build_table(columns, records, where, source, text_columns, label_column, task, num_labels, label_names):
    text_cols = _pick_text_columns(columns, text_columns, source)
    if label_column not in columns:
        close = difflib.get_close_matches(label_column, columns, n=1)
        hint = f"pass label_column={close[0]!r}" if close else "pass label_column=<the column holding labels>"
        raise DataError(field=f"{source} label_column", value=label_column,
                        problem=f"no such column; the columns are {columns}", fix=hint)
    texts, cells = [], []
    for rec, loc in zip(records, where):
        # datasets fills a key a JSON record lacks with None
        missing = [name for name in (*text_cols, label_column) if rec.get(name) is None]
        if missing:
            raise DataError(field=f"{source}, {loc}", value=missing[0], problem="the record has no such key (or null)",
                            fix="give every record the same keys, with values")
        row = tuple(rec[name] for name in text_cols)
        for name, value in zip(text_cols, row):
            if not isinstance(value, str) or not value.strip():
                raise DataError(field=f"{source}, {loc}, column {name!r}", value=value,
                                problem="the text is empty or not a string", fix="drop the row or fill in the text")
        texts.append(row)
        cells.append(_label_cell(rec[label_column], source, loc, label_column))
    labels, task, num_labels, label_names = _type_labels(cells, where, source, task, num_labels, label_names)
    return Table(texts, labels, task, num_labels, label_names, text_cols, source)


def _label_cell(value: Any, source: str, loc: str, column: str) -> str:
    # JSON numbers become strings so that every format goes through one typing rule
    if isinstance(value, bool) or not isinstance(value, (str, int, float, type(None))):
        raise DataError(field=f"{source}, {loc}, column {column!r}", value=value,
                        problem="a label must be a number or a string", fix="write class ids, class names or scores")
    cell = "" if value is None else str(value).strip()
    if not cell:
        raise DataError(field=f"{source}, {loc}, column {column!r}", value=value, problem="empty label",
                        fix="fill in the label or drop the row")
    return cell


def _kind(cell: str) -> str:
    if _INT.fullmatch(cell):
        return "int"
    try:
        float(cell)
        return "float"
    except ValueError:
        return "str"


def _type_labels(cells, where, source, task, num_labels, label_names):
    kinds = [_kind(c) for c in cells]
    first = {k: i for i, k in reversed(list(enumerate(kinds)))}  # first row of each kind
    if "str" in first and len(first) > 1:
        num = first.get("int", first.get("float"))
        raise DataError(field=f"{source} labels", value=[cells[num], cells[first['str']]],
                        problem=f"mixed label types: a number at {where[num]} and a string at {where[first['str']]}",
                        fix="use only class ids (0..K-1), only class names, or only float scores")

    def bad(i, problem, fix):
        return DataError(field=f"{source}, {where[i]}, label", value=cells[i], problem=problem, fix=fix)

    if task == "regression" or (task is None and "float" in first):
        if "str" in first:
            raise bad(first["str"], "is not a number but task='regression'", "use float scores, or task=None")
        if num_labels not in (None, 1) or label_names is not None:
            raise ConfigError(field="num_labels", value=num_labels, problem="regression has one output",
                              fix="leave num_labels=None (or 1) and label_names=None for regression")
        values = [float(c) for c in cells]
        for i, v in enumerate(values):
            if not math.isfinite(v):
                raise bad(i, "is not a finite number", "fix or drop the row")
        return values, "regression", 1, None
    if "float" in first:
        raise bad(first["float"], "is not an integer class id but task='classification'",
                  "use task='regression' for scores, or integer labels 0..K-1")
    if "str" in first:  # class names -> ids in sorted order (or in the order given by label_names)
        names = list(label_names) if label_names is not None else sorted(set(cells))
        index = {n: i for i, n in enumerate(names)}
        for i, c in enumerate(cells):
            if c not in index:
                raise bad(i, f"is not one of the known classes {names}", "fix the label, or read this split with "
                          "the train split's label_names (load_splits does)")
        labels = [index[c] for c in cells]
        k = len(names)
    else:
        labels = [int(c) for c in cells]
        names = list(label_names) if label_names is not None else None
        k = len(names) if names is not None else (num_labels or max(labels) + 1)
        for i, v in enumerate(labels):
            if v < 0:
                raise bad(i, "is negative (GLUE writes -1 for unlabeled test rows)", "class ids must be 0..K-1; "
                          "drop unlabeled rows")
            if v >= k:
                raise bad(i, f"is out of range for num_labels={k}", f"class ids must be 0..{k - 1}; pass the right "
                          "num_labels")
    if num_labels is not None and num_labels != k:  # only reachable with class names
        raise ConfigError(field="num_labels", value=num_labels, problem=f"{source} has {k} classes {names}",
                          fix=f"pass num_labels={k}, or label_names listing all {num_labels} classes")
    if k < 2:
        raise DataError(field=f"{source} labels", value=sorted(set(labels)), problem="only one class; "
                        "classification needs at least 2", fix="pass num_labels=K if this file is a subset, or "
                        "task='regression' for scores")
    return labels, "classification", k, names




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
