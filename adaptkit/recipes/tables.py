"""A labelled text split as a checked ``Table``: its text columns found, its labels typed once.

Text columns: ``sentence1``+``sentence2``, ``text_a``+``text_b``, ``sentence``, ``text``, ``text_a``, unless named.
Labels: integers -> classes 0..K-1, strings or a ``ClassLabel`` -> class names, other numbers -> regression.
A split read after train (validation, test) gets train's columns, task and label set, so it cannot drift
from it. Every problem is a ``DataError`` naming the file, the row and the fix. ``adaptkit.recipes.data``
reads the files and arranges the splits.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
from dataclasses import dataclass
from typing import Any

from adaptkit.errors import ConfigError, ConfigTypeError, DataError

TEXT_COLUMN_CANDIDATES = (("sentence1", "sentence2"), ("text_a", "text_b"), ("sentence",), ("text",), ("text_a",))
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


def from_dataset(ds, source: str, text_columns, label_column, task, num_labels, label_names) -> Table:
    """A checked Table from a ``datasets.Dataset``; ``source`` names it in errors."""
    feature = ds.features.get(label_column)
    class_names = list(feature.names) if hasattr(feature, "names") else None  # a ClassLabel names its classes
    records = ds.to_list()
    where = [f"row {i + 1}" for i in range(len(records))]
    return _build_table(ds.column_names, records, where, source, text_columns, label_column, task, num_labels,
                        label_names or class_names)


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
