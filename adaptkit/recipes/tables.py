"""A labelled text split as a checked ``Table``: a ``datasets.Dataset`` of its text columns and a ``labels``
column typed once with ``datasets``' own types (a ``ClassLabel`` for classes, float32 for scores).

Text columns: ``sentence1``+``sentence2``, ``text_a``+``text_b``, ``sentence``, ``text``, ``text_a``, unless named.
Labels: integers, class names or a ``ClassLabel`` are classes; whole numbers written as floats (``0.0``/``1.0``)
too when there are at most ``WHOLE_CLASSES`` distinct values (a note says so); other numbers are regression.
Checks run on the Arrow columns (no ``to_list``); every problem is a ``DataError`` naming the file, the row
as counted in the file, and the fix.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from adaptkit.errors import ConfigError, ConfigTypeError, DataError

TEXT_COLUMN_CANDIDATES = (("sentence1", "sentence2"), ("text_a", "text_b"), ("sentence",), ("text",), ("text_a",))
TASKS = ("classification", "regression")
WHOLE_CLASSES = 20  # whole-number floats with at most this many distinct values are class ids
MAX_CLASS_ID = 100_000  # a larger id is a typo or an id column, not a head anyone can train
_NUMBER = r"^\s*[+-]?((\d+\.?\d*|\.\d+)([eE][+-]?\d+)?|nan|inf|infinity)\s*$"
_INT = r"^\s*[+-]?\d+\s*$"


@dataclass
class Table:
    """One split: ``data`` holds the text columns and ``labels``; ``texts``/``labels`` read them as lists."""

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
        return self.data.data.column("labels").to_pylist()  # data never has an indices mapping (see select)

    def select(self, indices) -> "Table":
        return dataclasses.replace(self, data=self.data.select(indices).flatten_indices())


def _first(mask) -> int | None:
    at = pc.index(pc.fill_null(mask, True), True).as_py()
    return None if at < 0 else at


def from_dataset(ds, source: str, text_columns, label_column, task, num_labels, label_names) -> Table:
    """A checked Table from a ``datasets.Dataset``; ``source`` names it in errors."""
    columns = ds.column_names
    text_cols = _pick_text_columns(columns, text_columns, source)
    if label_column not in columns:
        close = difflib.get_close_matches(label_column, columns, n=1)
        raise DataError(field=f"{source} label_column", value=label_column, problem=f"no such column; the columns are "
                        f"{columns}", fix=f"pass label_column={close[0]!r}" if close else "name the column holding labels")
    ds = ds.select_columns([*text_cols, label_column]).flatten_indices()
    for name in (*text_cols, label_column):
        if (i := _first(pc.is_null(ds.data.column(name)))) is not None:
            raise DataError(field=f"{source}, row {i + 1}", value=name, problem="the record has no such key (or null)",
                            fix="give every record the same keys, with values")
    for name in text_cols:
        col = ds.data.column(name)
        blank = pc.equal(pc.utf8_trim_whitespace(col), "") if pa.types.is_string(col.type) else pa.array([True])
        if (i := _first(blank)) is not None:
            raise DataError(field=f"{source}, row {i + 1}, column {name!r}", value=col[i].as_py(),
                            problem="the text is empty or not a string", fix="drop the row or fill in the text")
    return _type_labels(ds, source, text_cols, label_column, task, num_labels, label_names)


def check_options(text_columns, task, num_labels) -> None:
    """The table options, checked before any file is read."""
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
        if missing := [c for c in text_columns if c not in columns]:
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
            raise DataError(field=f"{source}, row {i + 1}, column {column!r}", value="", problem="empty label",
                            fix="fill in the label or drop the row")
    else:
        raise bad(0, f"a label must be a number or a string, not {col.type}", "write class ids, class names or scores")
    number = pc.match_substring_regex(cells, _NUMBER, ignore_case=True)
    text_at, number_at = _first(pc.invert(number)), _first(number)
    if text_at is not None and number_at is not None:
        raise DataError(field=f"{source} labels", value=[cells[number_at].as_py(), cells[text_at].as_py()],
                        problem=f"mixed label types: a number at row {number_at + 1} and a string at row {text_at + 1}",
                        fix="use only class ids (0..K-1), only class names, or only float scores")
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
            raise ConfigError(field="num_labels", value=num_labels, problem="regression has one output",
                              fix="leave num_labels=None (or 1) and label_names=None for regression")
        if (i := _first(pa.array(~np.isfinite(values)))) is not None:
            raise bad(i, "is not a finite number", "fix or drop the row", cells)
        data = ds.remove_columns(column).add_column("labels", values.astype(np.float32))
        return Table(data, "regression", 1, None, text_cols, source, notes)
    if (i := _first(pa.array(~whole | (np.abs(values) >= MAX_CLASS_ID)))) is not None:
        raise bad(i, "is not an integer class id but task='classification'" if not whole[i] else
                  f"is not a plausible class id (>= {MAX_CLASS_ID:,})", "use task='regression' for scores, integer "
                  "labels 0..K-1, or class names", cells)
    if not integer:
        notes.append(f"{source}: labels written as whole-number floats (e.g. {cells[0].as_py()}) read as class ids; "
                     "pass --task regression if they are scores")
    ids = values.astype(np.int64)
    if (i := _first(pa.array(ids < 0))) is not None:
        raise bad(i, "is negative (GLUE writes -1 for unlabeled test rows)", "class ids must be 0..K-1; drop "
                  "unlabeled rows", cells)
    k = len(names) if names else num_labels or int(ids.max()) + 1
    if (i := _first(pa.array(ids >= k))) is not None:
        raise bad(i, f"is out of range for num_labels={k}", f"class ids must be 0..{k - 1}; pass the right num_labels",
                  cells)
    data = ds.remove_columns(column).add_column("labels", ids, feature=datasets.ClassLabel(num_classes=k))
    return _classes(data, source, text_cols, k, num_labels if not names else None, names, notes)


def _classes(data, source, text_cols, k, num_labels, names, notes) -> Table:
    if num_labels is not None and num_labels != k:  # only reachable with class names
        raise ConfigError(field="num_labels", value=num_labels, problem=f"{source} has {k} classes {names}",
                          fix=f"pass num_labels={k}, or label_names listing all {num_labels} classes")
    if k < 2:
        raise DataError(field=f"{source} labels", value=names or [0], problem="only one class; classification needs "
                        "at least 2", fix="pass num_labels=K if this file is a subset, or task='regression' for scores")
    return Table(data, "classification", k, names, text_cols, source, notes)
