"""Reading text-classification / regression data, checked before any training starts.

Every problem is a ``DataError`` naming the file (and line), the value and the fix, so a bad file
fails in a second instead of an hour into a run.

``read_table(path)`` reads one file with a header line:

* ``.tsv``: tab-separated, quoting OFF (texts may hold literal ``"``; default CSV quoting would
  silently merge rows), ``.csv``: standard CSV (quoted fields may hold commas), ``.jsonl`` /
  ``.json``: one JSON object per line (a ``.json`` holding one array of objects works too).
* Text columns, unless ``text_columns`` is given, are the first of these that exist:
  ``sentence1``+``sentence2``, ``text_a``+``text_b``, ``sentence``, ``text``, ``text_a``.
  Two different matches (say ``sentence`` and ``text``) are refused as ambiguous.
* Other columns (ids, genre, ...) are ignored. Blank lines are skipped.
* Labels: integers -> classification with ``num_labels = max + 1`` (ids must be 0..K-1);
  non-numeric strings -> classification with ids in sorted order (``label_names``);
  other numbers -> regression. ``task=`` forces one reading.

``load_splits(source)`` gives train / validation / test from a folder, explicit files, a
``datasets.DatasetDict`` or a hub name (``"glue/sst2"``). GLUE keeps its test labels private, so a
GLUE folder holds train + dev only: then dev becomes the TEST split and validation (for model
selection / early stopping) is carved from train, stratified, with a fixed seed.
``Splits.notes`` says what was done.

``tokenize`` + ``make_dataloader`` turn a table into padded batches (transformers'
``DataCollatorWithPadding``), optionally grouped by length to cut padding.
"""

from __future__ import annotations

import csv
import dataclasses
import difflib
import io
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from adaptkit.errors import ConfigError, ConfigTypeError, DataError

__all__ = ["Table", "Splits", "read_table", "load_splits", "TEXT_COLUMN_CANDIDATES", "EXTENSIONS"]

TEXT_COLUMN_CANDIDATES = (("sentence1", "sentence2"), ("text_a", "text_b"), ("sentence",), ("text",), ("text_a",))
EXTENSIONS = (".tsv", ".csv", ".jsonl", ".json")
TASKS = ("classification", "regression")
_SPLIT_STEMS = {"train": ("train",), "validation": ("validation", "valid", "val"), "dev": ("dev",), "test": ("test",)}
_INT = re.compile(r"[+-]?\d+")


@dataclass
class Table:
    """One split: ``texts[i]`` is a tuple of 1 or 2 strings, ``labels[i]`` an int class id or a float."""

    texts: list[tuple[str, ...]]
    labels: list
    task: str  # "classification" or "regression"
    num_labels: int  # 1 for regression
    label_names: list[str] | None  # class names by id, when the labels were strings (or a hub ClassLabel)
    text_columns: tuple[str, ...]
    path: str | None  # the file (or "hub-name[split]") it came from

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, indices) -> "Table":
        return dataclasses.replace(self, texts=[self.texts[i] for i in indices],
                                   labels=[self.labels[i] for i in indices])


@dataclass
class Splits:
    train: Table
    validation: Table
    test: Table | None  # None when the source has no test (or dev) split
    notes: list[str] = field(default_factory=list)  # how each split was obtained


# ---------------------------------------------------------------------------------------- reading

def read_table(path, text_columns=None, label_column: str = "label", task: str | None = None,
               num_labels: int | None = None, label_names: list[str] | None = None) -> Table:
    """Read one labelled file (see the module docstring for formats and rules).

    ``num_labels`` / ``label_names`` (e.g. taken from the train split) make out-of-range or unseen
    labels an error instead of silently growing the label set.
    """
    _check_options(text_columns, task, num_labels)
    p = Path(path)
    if p.is_dir():
        raise DataError(field="path", value=str(p), problem="is a folder, not a file",
                        fix=f"pass a file such as {p / 'train.tsv'}, or use load_splits({str(p)!r})")
    if not p.is_file():
        raise DataError(field="path", value=str(p), problem="no such file", fix="check the path (relative to the "
                        "current directory) or set it to an existing .tsv/.csv/.jsonl file")
    ext = p.suffix.lower()
    if ext not in EXTENSIONS:
        raise DataError(field="path", value=str(p), problem=f"unknown extension {ext!r}",
                        fix=f"save the data as one of {list(EXTENSIONS)} with a header line")
    raw = p.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise DataError(field=str(p), value=f"byte 0x{raw[err.start]:02x} at offset {err.start} (line {line})",
                        problem="is not valid UTF-8",
                        fix=f"re-encode the file as UTF-8, e.g. iconv -f cp1252 -t utf-8 {p} > fixed{ext}") from None
    text = text.removeprefix("\ufeff")  # a BOM (Excel, MRPC) is not part of the first column's name
    if not text.strip():
        raise DataError(field="path", value=str(p), problem="the file is empty",
                        fix="write a header line and at least one data row")
    columns, records, where = _parse_json(text, p) if ext in (".jsonl", ".json") else _parse_delimited(text, p, ext)
    if not records:
        raise DataError(field="path", value=str(p), problem=f"has a header {columns} but no data rows",
                        fix="add data rows below the header")
    return _build_table(columns, records, where, str(p), text_columns, label_column, task, num_labels, label_names)


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


def _parse_delimited(text: str, p: Path, ext: str):
    tsv = ext == ".tsv"
    reader = csv.reader(io.StringIO(text, newline=""), delimiter="\t" if tsv else ",",
                        quoting=csv.QUOTE_NONE if tsv else csv.QUOTE_MINIMAL, strict=True)
    records, where = [], []
    try:
        header = next(reader)
        if len(header) == 1 and ("\t" if not tsv else ",") in header[0]:
            right = ".tsv (tab-separated, quoting off)" if not tsv else ".csv (comma-separated)"
            raise DataError(field=str(p), value=header[0][:80], problem=f"wrong delimiter: the header is one "
                            f"column holding {'tabs' if not tsv else 'commas'}", fix=f"rename the file to {right}")
        if not header or len(set(header)) != len(header) or "" in header:
            raise DataError(field=str(p), value=header, problem="the header has empty or repeated column names",
                            fix="give every column a unique name on the first line")
        while True:
            start = reader.line_num + 1  # a quoted CSV field may span lines; report where the row starts
            row = next(reader, None)
            if row is None:
                break
            if not row:
                continue
            if len(row) != len(header):
                fix = ("a text holds a tab, or the file is not tab-separated; quoting is off in .tsv, so quotes do "
                       "not protect tabs: remove them" if tsv else
                       "quote fields that hold commas (standard CSV), or save the data as .tsv")
                raise DataError(field=f"{p}, line {start}", value=row[:3] if len(row) > 3 else row,
                                problem=f"has {len(row)} fields but the header has {len(header)} {header} "
                                        "(wrong delimiter or quoting?)", fix=fix)
            records.append(dict(zip(header, row)))
            where.append(f"line {start}")
    except csv.Error as err:
        raise DataError(field=f"{p}, line {reader.line_num}", value=str(err), problem="malformed CSV",
                        fix="close every quoted field and double quotes inside quoted fields (\"\")") from None
    return header, records, where


def _parse_json(text: str, p: Path):
    if text.lstrip().startswith("["):
        try:
            items = [(f"record {i + 1}", obj) for i, obj in enumerate(json.loads(text))]
        except json.JSONDecodeError as err:
            raise DataError(field=f"{p}, line {err.lineno}", value=err.msg, problem="is not valid JSON",
                            fix="fix the JSON, or write one object per line (JSON lines)") from None
    else:
        items = []
        for n, line in enumerate(text.split("\n"), 1):
            if not line.strip():
                continue
            try:
                items.append((f"line {n}", json.loads(line)))
            except json.JSONDecodeError as err:
                raise DataError(field=f"{p}, line {n}", value=line[:80], problem=f"is not valid JSON ({err.msg})",
                                fix="write exactly one JSON object per line (JSON lines)") from None
    for loc, obj in items:
        if not isinstance(obj, dict):
            raise DataError(field=f"{p}, {loc}", value=obj, problem="is not a JSON object",
                            fix='write records like {"sentence": "...", "label": 1}')
    columns = list(items[0][1]) if items else []
    return columns, [obj for _, obj in items], [loc for loc, _ in items]


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
        missing = [name for name in (*text_cols, label_column) if name not in rec]  # JSON records may lack keys
        if missing:
            raise DataError(field=f"{source}, {loc}", value=missing[0], problem="the record has no such key",
                            fix="give every record the same keys")
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


# ---------------------------------------------------------------------------------------- splits

def load_splits(source, *, text_columns=None, label_column: str = "label", task: str | None = None,
                num_labels: int | None = None, validation_fraction: float = 0.1, seed: int = 0) -> Splits:
    """Train / validation / test from ``source``:

    * a folder holding ``train``, optionally ``dev`` or ``validation``/``valid``/``val``, and ``test``
      files (any extension of ``EXTENSIONS``; two files for one split are refused);
    * one file (used as train) or a mapping ``{"train": path, "validation": path, "test": path}``;
    * a ``datasets.DatasetDict``, or a hub name such as ``"glue/sst2"`` (loaded with
      ``datasets.load_dataset``; with HF_HUB_OFFLINE=1 and no cached copy it fails at once with a
      DataError, with no network and no flag after datasets' retries, about 25 s; splits whose
      labels are all -1, like GLUE test, count as missing).

    Which file plays which role: ``validation`` -> validation; ``dev`` -> validation when a test
    file exists, else -> test (GLUE). Without a validation file, ``validation_fraction`` of train is
    carved off (stratified by class for classification, ``random_state=seed``). The train split
    fixes the text columns, task and label set for the others. Every split must have labels.
    """
    if not 0 < validation_fraction < 1:
        raise ConfigError(field="validation_fraction", value=validation_fraction, problem="must be in (0, 1)",
                          fix="use e.g. 0.1 to hold out 10% of train")
    opts = dict(text_columns=text_columns, label_column=label_column, task=task, num_labels=num_labels)
    _check_options(text_columns, task, num_labels)
    loaded = sys.modules.get("datasets")  # a DatasetDict implies datasets is imported; do not import it (2-4 s)
    if loaded is not None and isinstance(source, loaded.DatasetDict):
        return _from_dataset_dict(source, "DatasetDict", opts, validation_fraction, seed)
    if isinstance(source, Mapping):
        unknown = sorted(set(source) - {"train", "validation", "test"})
        if unknown or "train" not in source:
            raise ConfigError(field="source", value=sorted(source), problem="keys must be 'train' (required), "
                              "'validation', 'test'", fix="load_splits({'train': 'a.tsv', 'test': 'b.tsv'})")
        files = dict(source)
    elif Path(source).is_dir():
        files = _split_files(Path(source))
    elif Path(source).is_file():
        files = {"train": source}
    elif isinstance(source, str) and re.fullmatch(r"[\w][\w.-]*(/[\w.-]+)?", source) \
            and Path(source).suffix.lower() not in EXTENSIONS:
        return _from_hub(source, opts, validation_fraction, seed)
    else:
        raise DataError(field="source", value=str(source), problem="no such file or folder",
                        fix="pass a folder with train.tsv (and dev.tsv/test.tsv), a file, or a hub name")
    readers = {role: (lambda o, f=f: read_table(f, **o)) for role, f in files.items()}
    return _assemble(readers, opts, validation_fraction, seed)


def _split_files(folder: Path) -> dict[str, Path]:
    present = sorted(p.name for p in folder.iterdir())
    files = {}
    for role, stems in _SPLIT_STEMS.items():
        hits = [folder / n for n in present if Path(n).stem.lower() in stems and Path(n).suffix.lower() in EXTENSIONS]
        if len(hits) > 1:
            raise DataError(field=str(folder), value=[h.name for h in hits], problem=f"several {role} files",
                            fix="keep one file per split, or pass them explicitly: load_splits({'train': ...})")
        if hits:
            files[role] = hits[0]
    if "train" not in files:
        raise DataError(field=str(folder), value=present, problem="the folder has no train file",
                        fix=f"add train.tsv (or {', '.join(EXTENSIONS[1:])}), or pass files: "
                            "load_splits({'train': ..., 'validation': ..., 'test': ...})")
    if "validation" in files and "dev" in files:
        raise DataError(field=str(folder), value=[files["validation"].name, files["dev"].name],
                        problem="both a dev and a validation file: which one is for model selection is unclear",
                        fix="rename dev to test, or remove one of them")
    return files


def _assemble(readers: dict[str, Callable], opts: dict, fraction: float, seed: int) -> Splits:
    if "dev" in readers:  # GLUE: dev is the test set when no test file is given
        readers = dict(readers)
        readers["validation" if "test" in readers else "test"] = readers.pop("dev")
    train = readers["train"](opts)
    # the train split fixes columns, task and label set so the others cannot drift from it
    same = dict(text_columns=list(train.text_columns), label_column=opts["label_column"], task=train.task,
                num_labels=train.num_labels if train.task == "classification" else None,
                label_names=train.label_names)
    split = {role: readers[role](same) for role in ("validation", "test") if role in readers}
    notes = [f"{role}: {t.path} ({len(t)} rows)" for role, t in (("train", train), *split.items())]
    if "validation" not in split:
        train, split["validation"] = _carve(train, fraction, seed)
        notes.append(f"validation: {len(split['validation'])} rows carved from train ({fraction:g}, seed {seed}"
                     f"{', stratified' if train.task == 'classification' else ''}); train keeps {len(train)}")
    return Splits(train, split["validation"], split.get("test"), notes)


def _carve(table: Table, fraction: float, seed: int) -> tuple[Table, Table]:
    from sklearn.model_selection import train_test_split

    strat = table.labels if table.task == "classification" else None
    try:
        keep, held = train_test_split(np.arange(len(table)), test_size=fraction, random_state=seed, stratify=strat)
    except ValueError as err:  # too few rows, or a class with a single example
        raise DataError(field=f"{table.path} validation split", value=fraction, problem=f"cannot carve it: {err}",
                        fix="add examples, or pass a validation file") from None
    return table.subset(sorted(keep)), table.subset(sorted(held))


def _from_hub(name: str, opts, fraction, seed) -> Splits:
    import datasets

    # "glue/<task>" is the old canonical GLUE name; it now lives at nyu-mll/glue with the task as config
    repo, config = ("nyu-mll/glue", name.split("/", 1)[1]) if name.startswith("glue/") else (name, None)
    try:
        loaded = datasets.load_dataset(repo, config)
    except (OSError, ValueError) as err:  # ConnectionError, DatasetNotFoundError, bad config name
        raise DataError(field="source", value=name, problem=f"no local file or folder has this name, and the "
                        f"Hugging Face hub failed ({type(err).__name__}: {str(err)[:160]})",
                        fix="pass a local folder with train.tsv/dev.tsv (e.g. $ADAPTKIT_DATA/sst2); the hub is "
                            "unreachable offline (HF_HUB_OFFLINE=1)") from None
    return _from_dataset_dict(loaded, name, opts, fraction, seed)


def _from_dataset_dict(dd, name: str, opts, fraction, seed) -> Splits:
    label = opts["label_column"]
    readers = {}
    for split, ds in dd.items():
        role = {"train": "train", "validation": "dev", "dev": "dev", "test": "test"}.get(split)
        if role is None or (label in ds.column_names and all(v == -1 for v in ds[label])):
            continue  # other splits, and hidden-label test sets (GLUE writes -1), are not usable
        feature = ds.features.get(label)
        class_names = list(feature.names) if hasattr(feature, "names") else None

        def read(o, ds=ds, split=split, class_names=class_names):
            o = dict(o, label_names=o.get("label_names") or class_names)
            return _build_table(ds.column_names, ds.to_list(), [f"row {i}" for i in range(len(ds))],
                                f"{name}[{split}]", **o)
        readers[role] = read
    if "train" not in readers:
        raise DataError(field="source", value=f"{name} splits {list(dd)}", problem="no labelled train split",
                        fix="use a dataset with a 'train' split, or a local folder")
    return _assemble(readers, opts, fraction, seed)
