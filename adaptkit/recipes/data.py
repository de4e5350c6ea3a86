"""Data for the recipes, read by ``datasets`` and checked before training; what ``datasets`` raises raw is re-said
as a ``DataError`` naming the file, the row and the fix.

Labelled text becomes a ``Table``. Text columns: ``sentence1``+``sentence2``, ``text_a``+``text_b``, ``sentence``,
``text``, unless named. Labels: integers, class names or a ``ClassLabel`` are classes; whole-number floats too when
at most ``WHOLE_CLASSES`` distinct values (noted); other numbers are regression. Checks run on the Arrow columns.
How files, folders and hub names become train/validation/test: ``adaptkit.recipes.sources``.
"""

from __future__ import annotations

import csv
import difflib
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from adaptkit.errors import ConfigError, ConfigTypeError, DataError

# file suffix -> datasets' packaged builder
FORMATS = {".tsv": "csv", ".csv": "csv", ".jsonl": "json", ".json": "json", ".parquet": "parquet",
           ".arrow": "arrow", ".txt": "text"}
TEXT_COLUMN_CANDIDATES = (("sentence1", "sentence2"), ("text_a", "text_b"), ("sentence",), ("text",), ("text_a",))
TASKS = ("classification", "regression")
WHOLE_CLASSES = 20  # whole-number floats with at most this many distinct values are class ids
MAX_CLASS_ID = 100_000  # a larger id is a typo or an id column, not a head anyone can train
_NUMBER = r"^\s*[+-]?((\d+\.?\d*|\.\d+)([eE][+-]?\d+)?|nan|inf|infinity)\s*$"
_INT = r"^\s*[+-]?\d+\s*$"


@dataclass
class Table:
    """One split: ``data`` holds the text columns and a ``labels`` column typed with datasets' own types."""

    data: datasets.Dataset
    task: str  # "classification" or "regression"
    num_labels: int  # 1 for regression
    label_names: list[str] | None  # class names by id, when the labels were strings or a ClassLabel
    text_columns: tuple[str, ...]
    path: str | None  # the file (or "name[split]") it came from
    notes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.data)

    @property
    def texts(self) -> list[tuple[str, ...]]:
        return list(zip(*(self.data.data.column(c).to_pylist() for c in self.text_columns)))

    @property
    def labels(self) -> list:
        return self.data.data.column("labels").to_pylist()  # data never has an indices mapping (flattened)


def _first(mask) -> int | None:
    at = pc.index(pc.fill_null(mask, True), True).as_py()
    return None if at < 0 else at


def from_dataset(ds, source: str, text_columns, label_column, task, num_labels, label_names) -> Table:
    columns = ds.column_names
    text_cols = _pick_text_columns(columns, text_columns, source)
    if label_column not in columns:
        close = difflib.get_close_matches(label_column, columns, n=1)
        raise DataError(field=f"{source} label_column", value=label_column, problem=f"no such column; the columns are "
                        f"{columns}", fix=f"pass label_column={close[0]!r}" if close else "name the column holding labels")
    ds = ds.select_columns([*text_cols, label_column]).flatten_indices()
    for name in (*text_cols, label_column):
        if (i := _first(pc.is_null(ds.data.column(name)))) is not None:
            raise DataError(f"{source}, row {i + 1}", name, "no such key (or null)", "give every record the same keys")
    for name in text_cols:
        col = ds.data.column(name)
        blank = pc.equal(pc.utf8_trim_whitespace(col), "") if pa.types.is_string(col.type) else pa.array([True])
        if (i := _first(blank)) is not None:
            raise DataError(f"{source}, row {i + 1}, column {name!r}", col[i].as_py(),
                            "the text is empty or not a string", "drop the row or fill in the text")
    return _type_labels(ds, source, text_cols, label_column, task, num_labels, label_names)


def check_options(text_columns, task, num_labels) -> None:
    if isinstance(text_columns, str):
        raise ConfigTypeError("text_columns", text_columns, "must be a list", f"text_columns=[{text_columns!r}]")
    if text_columns is not None and not 1 <= len(text_columns) <= 2:
        raise ConfigError("text_columns", list(text_columns), "must name 1 or 2 columns", "join extra fields into one")
    if task not in (None, *TASKS):
        raise ConfigError("task", task, f"must be None or one of {list(TASKS)}", "leave task=None to infer it")
    if num_labels is not None and (not isinstance(num_labels, int) or isinstance(num_labels, bool) or num_labels < 1):
        raise ConfigError("num_labels", num_labels, "must be a positive integer", "the class count (1: regression)")


def _pick_text_columns(columns: list[str], text_columns, source: str) -> tuple[str, ...]:
    if text_columns is not None:
        if missing := [c for c in text_columns if c not in columns]:
            raise DataError(f"{source} text_columns", missing, f"not found; the columns are {columns}", "use those")
        return tuple(text_columns)
    found = [c for c in TEXT_COLUMN_CANDIDATES if all(name in columns for name in c)]
    # a single column that is part of a found pair is that pair, not a second match
    found = [c for c in found if not any(len(o) > len(c) and set(c) <= set(o) for o in found)]
    if len(found) != 1:
        problem = (f"no text column; the columns are {columns}" if not found
                   else f"ambiguous text columns: {[list(c) for c in found]} all match")
        raise DataError(f"{source} text_columns", None, problem, f"name columns as one of "
                        f"{[list(c) for c in TEXT_COLUMN_CANDIDATES]}, or pass text_columns=[...] (1 or 2 names)")
    return found[0]


def _type_labels(ds, source, text_cols, column, task, num_labels, label_names) -> Table:
    feature, col, notes = ds.features[column], ds.data.column(column), []
    names = list(label_names or getattr(feature, "names", None) or []) or None  # a ClassLabel names its classes

    def bad(i, problem, fix, cells=col):
        return DataError(field=f"{source}, row {i + 1}, label", value=cells[i].as_py(), problem=problem, fix=fix)

    if pa.types.is_integer(col.type) or pa.types.is_floating(col.type):
        cells = pc.cast(col, pa.string())  # one typing rule for every format; ints print as written
    elif pa.types.is_string(col.type):
        cells = col
        if (i := _first(pc.equal(pc.utf8_trim_whitespace(col), ""))) is not None:
            raise DataError(f"{source}, row {i + 1}, column {column!r}", "", "empty label", "fill it or drop the row")
    else:
        raise bad(0, f"a label must be a number or a string, not {col.type}", "write class ids, class names or scores")
    number = pc.match_substring_regex(cells, _NUMBER, ignore_case=True)
    text_at, number_at = _first(pc.invert(number)), _first(number)
    if text_at is not None and number_at is not None:
        raise DataError(f"{source} labels", [cells[number_at].as_py(), cells[text_at].as_py()], f"mixed label types: a "
                        f"number at row {number_at + 1} and a string at row {text_at + 1}", "use one kind of label")
    if number_at is None:  # class names -> ids: sorted, or in the order given by label_names
        if task == "regression":
            raise bad(text_at, "is not a number but task='regression'", "use float scores, or task=None")
        names = names or sorted(pc.unique(cells).to_pylist())
        if (i := _first(pc.invert(pc.is_in(cells, value_set=pa.array(names))))) is not None:
            raise bad(i, f"is not one of the known classes {names}", "fix the label, or read this split with the "
                      "train split's label_names (load_splits does)")
        data = ds.cast_column(column, datasets.ClassLabel(names=names)).rename_column(column, "labels")
        return _classes(data, source, text_cols, len(names), num_labels, names, notes)
    values = pc.cast(pc.utf8_trim_whitespace(cells), pa.float64()).to_numpy()
    whole = np.isfinite(values) & (values == np.round(values))
    integer = not pa.types.is_floating(col.type) and pc.all(pc.match_substring_regex(cells, _INT)).as_py()
    as_classes = task == "classification" or (task is None and integer) or (
        task is None and whole.all() and len(np.unique(values)) <= WHOLE_CLASSES and values.min() >= 0)
    if not as_classes:
        if num_labels not in (None, 1) or label_names is not None:
            raise ConfigError("num_labels", num_labels, "regression has one output", "leave num_labels=None (or 1)")
        if (i := _first(pa.array(~np.isfinite(values)))) is not None:
            raise bad(i, "is not a finite number", "fix or drop the row", cells)
        data = ds.remove_columns(column).add_column("labels", values.astype(np.float32))
        return Table(data, "regression", 1, None, text_cols, source, notes)
    if (i := _first(pa.array(~whole | (np.abs(values) >= MAX_CLASS_ID)))) is not None:
        raise bad(i, "is not an integer class id but task='classification'" if not whole[i] else
                  f"is not a plausible class id (>= {MAX_CLASS_ID:,})", "use task='regression' for scores", cells)
    if not integer:
        notes.append(f"{source}: labels written as whole-number floats (e.g. {cells[0].as_py()}) read as class ids; "
                     "pass --task regression if they are scores")
    ids = values.astype(np.int64)
    if (i := _first(pa.array(ids < 0))) is not None:
        raise bad(i, "is negative (GLUE writes -1 for unlabeled test rows)", "class ids are 0..K-1; drop them", cells)
    k = len(names) if names else num_labels or int(ids.max()) + 1
    if (i := _first(pa.array(ids >= k))) is not None:
        raise bad(i, f"is out of range for num_labels={k}", f"use 0..{k - 1}, or the right num_labels", cells)
    data = ds.remove_columns(column).add_column("labels", ids, feature=datasets.ClassLabel(num_classes=k))
    return _classes(data, source, text_cols, k, num_labels if not names else None, names, notes)


def _classes(data, source, text_cols, k, num_labels, names, notes) -> Table:
    if num_labels is not None and num_labels != k:  # only reachable with class names
        raise ConfigError("num_labels", num_labels, f"{source} has {k} classes {names}", f"pass num_labels={k}")
    if k < 2:
        raise DataError(f"{source} labels", names or [0], "only one class; classification needs at least 2",
                        "pass num_labels=K if this file is a subset, or task='regression' for scores")
    return Table(data, "classification", k, names, text_cols, source, notes)


def read_file(path) -> datasets.Dataset:
    """One data file through ``datasets.load_dataset``; every failure is a DataError naming the file."""
    p, _ = Path(path), quiet()
    if p.is_dir():
        raise DataError("path", str(p), "is a folder, not a file", f"pass a file such as {p / 'train.tsv'}")
    if not p.is_file():
        raise DataError("path", str(p), "no such file", "check the path (relative to the current directory)")
    if (ext := p.suffix.lower()) not in FORMATS:
        raise DataError(field="path", value=str(p), problem=f"unknown extension {ext!r}", fix=f"use one of {list(FORMATS)}")
    options = {}
    if FORMATS[ext] == "csv":
        sep = "\t" if ext == ".tsv" else ","
        with open(p, encoding="utf-8-sig", errors="replace", newline="") as f:
            header = next(csv.reader(f, delimiter=sep, quoting=csv.QUOTE_NONE if sep == "\t" else csv.QUOTE_MINIMAL), [])
        if len(header) == 1 and ("," if sep == "\t" else "\t") in header[0]:
            right = ".tsv (tab-separated, quoting off)" if ext == ".csv" else ".csv (comma-separated)"
            raise DataError(field=str(p), value=header[0][:80], problem=f"wrong delimiter: the header is one column "
                            f"holding {'tabs' if sep == ',' else 'commas'}", fix=f"rename the file to {right}")
        if len(set(header)) < len(header) or "" in header:
            raise DataError(str(p), header, "the header has empty or repeated column names", "make them unique")
        # every cell as text (no NaN or number guessing); index_col=False: pandas otherwise takes a first data row
        # with one field more than the header as "the first column is the index" and shifts every column by one
        options = dict(keep_default_na=False, na_filter=False, index_col=False, sep=sep,
                       features=datasets.Features({c: datasets.Value("string") for c in header}) if header else None,
                       **({"quoting": 3} if ext == ".tsv" else {}))
    try:
        from pandas.errors import ParserWarning  # pandas comes with datasets
        with warnings.catch_warnings():  # ... and then only warns that it drops the extra field: an error here
            warnings.simplefilter("error", ParserWarning)
            ds = datasets.load_dataset(FORMATS[ext], data_files={"train": str(p)}, **options)["train"]
    except Exception as err:  # noqa: BLE001 - re-said below with the file and the fix
        raise _read_error(err, p, ext) from None
    if len(ds) == 0:
        raise DataError("path", str(p), f"has a header {ds.column_names} but no data rows", "add data rows")
    return ds


def quiet() -> None:
    datasets.logging.set_verbosity_error()  # it logs every parse error before raising it; we re-say them
    datasets.disable_progress_bars()


def _read_error(err: Exception, p: Path, ext: str) -> Exception:
    chain, cause = [], err
    while cause is not None and len(chain) < 5:
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    text = " | ".join(f"{type(c).__name__}: {c}" for c in chain)
    if any(isinstance(c, UnicodeDecodeError) for c in chain) or "Invalid UTF8" in text:
        raw, at = p.read_bytes(), 0
        try:
            raw.decode("utf-8")
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
        header = (p.read_text(encoding="utf-8", errors="replace").strip().splitlines() or [""])[0]
        columns = header.split("\t" if ext == ".tsv" else ",") if FORMATS[ext] == "csv" else [header]
        return DataError(field="path", value=str(p), problem=f"has a header {columns} but no data rows",
                         fix="add data rows below the header")
    if "Length of header or names does not match length of data" in text:  # the first data row, one field more
        count = len(p.read_text(encoding="utf-8", errors="replace").splitlines()[0].split("\t" if ext == ".tsv" else ","))
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
        return DataError(field=f"{p}, record {int(row[1]) + 1}" if row else str(p), value=str(chain[-1])[:120],
                         problem="is not valid JSON (or mixes types in a column)", fix="write one JSON object per "
                         "line (JSON lines) with the same keys and value types, or one JSON array of such objects")
    return DataError(field=str(p), value=text[:200], problem="datasets could not read it",
                     fix=f"check that it is a well-formed {ext} file")


def read_table(path, text_columns=None, label_column: str = "label", task: str | None = None,
               num_labels: int | None = None, label_names: list[str] | None = None) -> Table:
    """One labelled file as a checked Table; ``num_labels`` / ``label_names`` (the train split's) make unseen labels
    an error instead of silently growing the label set."""
    check_options(text_columns, task, num_labels)
    return from_dataset(read_file(path), str(Path(path)), text_columns, label_column, task, num_labels, label_names)
