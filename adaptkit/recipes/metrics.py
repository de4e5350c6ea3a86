"""Task metrics as HF ``evaluate`` modules that work with no hub and no cache folder.

``evaluate.load("accuracy")`` downloads the metric script from the hub, so it fails offline: the
0.4.6 wheel ships no metric scripts. The classes here subclass ``evaluate.Metric`` in code instead
(``_info`` declares the inputs, ``_compute`` does the maths with scikit-learn / scipy), so
``compute``, ``add_batch`` and ``evaluate.combine`` behave as usual::

    metric = metric_for_task("mrpc")            # accuracy + binary F1
    for batch in loader:
        metric.add_batch(predictions=logits.argmax(-1), references=batch["labels"])
    metric.compute()                            # {"accuracy": ..., "f1": ...}
    primary_metric("mrpc")                      # ("f1", True): what early stopping watches

Two things differ from a stock ``evaluate.Metric``:

* predictions are always kept in memory (``keep_in_memory=True``) and no cache folder is created.
  A stock metric writes an Arrow file plus a lock under ``~/.cache/huggingface/metrics`` and even the
  in-memory mode makes that folder, which fails on a read-only home and races between processes.
* there is no ``num_process``/``process_id``: in a multi-process run gather the predictions first
  (``accelerator.gather_for_metrics``) and feed the metric on one process, instead of evaluate's
  file-system rendez-vous.

Task → metrics (``primary`` is what ``primary_metric`` returns; GLUE conventions of the BERT paper,
except STS-B, which uses the mean of Pearson and Spearman like transformers' ``run_glue``):

=============== =============================== =====================
task            metrics                         primary
=============== =============================== =====================
sst2, rte       accuracy                        accuracy
cola            matthews_correlation, accuracy  matthews_correlation
mrpc            accuracy, f1 (binary)           f1
stsb            pearson, spearmanr, combined    combined
classification  accuracy, f1 (binary) or        accuracy
                macro_f1 (num_labels > 2)
regression      pearson, spearmanr, combined    combined
language_model  perplexity, loss, num_tokens    perplexity (lower)
=============== =============================== =====================
"""

from __future__ import annotations

import math
import os
import warnings

import datasets
import evaluate
import numpy as np
from scipy import stats
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from adaptkit.errors import ConfigError, DataError

__all__ = ["Accuracy", "F1", "MatthewsCorrelation", "PearsonSpearman", "Perplexity", "TASKS",
           "metric_for_task", "primary_metric"]

_INT_PAIR = datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")})
_FLOAT_PAIR = datasets.Features({"predictions": datasets.Value("float64"),
                                 "references": datasets.Value("float64")})


class _OfflineMetric(evaluate.Metric):
    """In-memory ``evaluate.Metric`` that never touches the disk (see the module docstring)."""

    features: datasets.Features = _INT_PAIR
    description = ""

    def __init__(self, *, seed: int | None = None):
        super().__init__(keep_in_memory=True, seed=seed)

    def _build_data_dir(self) -> str:
        # evaluate calls os.makedirs here even with keep_in_memory=True; the path is only used to
        # name cache files, which the in-memory mode never writes, so skip creating it.
        return os.path.join(self._data_dir_root, self.name, self.config_name)

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(description=self.description, citation="", inputs_description="",
                                   features=self.features, format="numpy")

    def add_batch(self, **kwargs):
        """Add one batch of inputs (same keywords as compute).
"""
        # evaluate reports mismatched lengths as a bare ValueError; make it a typed DataError
        lengths = {name: len(kwargs[name]) for name in self.features if kwargs.get(name) is not None}
        if len(set(lengths.values())) > 1:
            raise DataError(field=f"{type(self).__name__}.add_batch", value=lengths,
                            problem="inputs have different lengths",
                            fix="pass one prediction per reference (argmax the logits first for classification)")
        try:
            return super().add_batch(**kwargs)
        except ValueError as err:  # e.g. 2-D logits where class ids were expected
            raise DataError(field=f"{type(self).__name__}.add_batch", value=str(err).splitlines()[0],
                            problem=f"inputs do not match {dict(self.features)}",
                            fix="pass one number per example: class ids (logits.argmax(-1)) or float scores"
                            ) from err

    def compute(self, **kwargs):
        """Compute the metric over everything added (plus any inputs passed here), then reset.
"""
        # (evaluate appends the inputs description to this docstring, so it must exist.)
        # A stock metric computed with nothing added dies with an AttributeError deep inside
        # evaluate; say what is missing instead.
        if self.writer is None and all(kwargs.get(name) is None for name in self.features):
            raise DataError(field=f"{type(self).__name__}.compute", value="no inputs",
                            problem=f"nothing was added; it needs {list(self.features)}",
                            fix="call add_batch(...) for each batch first, or pass the inputs to compute(...)")
        return super().compute(**kwargs)


class Accuracy(_OfflineMetric):
    """Fraction of exact matches between integer predictions and references."""

    description = "accuracy"

    def _compute(self, predictions, references):
        return {"accuracy": float(accuracy_score(references, predictions))}


class F1(_OfflineMetric):
    """F1 of integer labels. ``average="binary"`` scores class 1 (labels must be 0/1); ``"macro"``
    averages the per-class F1 over every class seen, for multiclass tasks (key ``macro_f1``)."""

    description = "f1"
    _AVERAGES = ("binary", "macro")

    def __init__(self, average: str = "binary", *, seed: int | None = None):
        if average not in self._AVERAGES:
            raise ConfigError(field="F1.average", value=average, problem=f"must be one of {list(self._AVERAGES)}",
                              fix="use average='binary' for 0/1 labels or 'macro' for more classes")
        # set before super().__init__, which calls _info(); the option lives on the object (not a
        # compute() keyword) because evaluate.combine passes compute keywords to every module.
        self.average = average
        super().__init__(seed=seed)

    def _compute(self, predictions, references):
        if self.average == "binary":
            seen = set(np.unique(references).tolist()) | set(np.unique(predictions).tolist())
            if not seen <= {0, 1}:
                raise ConfigError(field="F1.average", value="binary",
                                  problem=f"binary F1 needs labels 0/1 but saw {sorted(seen)}",
                                  fix="use F1(average='macro') (metric_for_task(..., num_labels=K)) for K classes")
            return {"f1": float(f1_score(references, predictions, average="binary", pos_label=1))}
        return {"macro_f1": float(f1_score(references, predictions, average="macro"))}


class MatthewsCorrelation(_OfflineMetric):
    """Matthews correlation coefficient (CoLA's metric); 0.0 when either side is constant."""

    description = "matthews_correlation"

    def _compute(self, predictions, references):
        return {"matthews_correlation": float(matthews_corrcoef(references, predictions))}


class PearsonSpearman(_OfflineMetric):
    """Pearson and Spearman correlation of float predictions with float references, and their
    mean as ``combined``. Both are NaN when either side is constant (the correlation is
    undefined there), which early stopping must treat as the worst score."""

    description = "pearson_spearman"
    features = _FLOAT_PAIR

    def _compute(self, predictions, references):
        if len(predictions) < 2:
            raise DataError(field="PearsonSpearman.predictions", value=len(predictions),
                            problem="a correlation needs at least 2 examples", fix="evaluate on more examples")
        with warnings.catch_warnings():
            # scipy warns and returns NaN for constant input; the NaN is documented above
            warnings.simplefilter("ignore", stats.ConstantInputWarning)
            pearson = float(stats.pearsonr(predictions, references)[0])
            spearman = float(stats.spearmanr(predictions, references)[0])
        return {"pearson": pearson, "spearmanr": spearman, "combined": (pearson + spearman) / 2}


class Perplexity(_OfflineMetric):
    """Token-level perplexity ``exp(total_nll / total_tokens)``.

    Inputs are sums, not means, so batches of any size and padding combine exactly: for each
    sequence (or each whole batch) pass ``nll`` = the summed negative log-likelihood (natural log)
    of its scored tokens and ``num_tokens`` = how many tokens were scored. Averaging per-batch mean
    losses instead would weight short batches too much. Returns ``perplexity``, ``loss`` (mean NLL
    per token) and ``num_tokens``."""

    description = "perplexity"
    features = datasets.Features({"nll": datasets.Value("float64"), "num_tokens": datasets.Value("int64")})

    def _compute(self, nll, num_tokens):
        if not np.all(np.isfinite(nll)) or np.any(nll < 0):
            bad = nll[~np.isfinite(nll) | (nll < 0)][0]
            raise DataError(field="Perplexity.nll", value=float(bad),
                            problem="summed negative log-likelihoods must be finite and >= 0",
                            fix="pass loss * num_tokens from a finite cross-entropy (natural log)")
        if np.any(num_tokens < 0) or num_tokens.sum() == 0:
            raise DataError(field="Perplexity.num_tokens", value=int(num_tokens.sum()),
                            problem="needs a positive total of scored tokens (and no negative counts)",
                            fix="count the tokens whose label is not -100")
        total_nll, total_tokens = float(nll.sum()), int(num_tokens.sum())
        loss = total_nll / total_tokens
        return {"perplexity": math.exp(loss), "loss": loss, "num_tokens": total_tokens}


# task -> (builder of the metric modules given num_labels, primary metric name, higher is better)
TASKS = {
    "sst2": (lambda k: [Accuracy()], "accuracy", True),
    "rte": (lambda k: [Accuracy()], "accuracy", True),
    "cola": (lambda k: [MatthewsCorrelation(), Accuracy()], "matthews_correlation", True),
    "mrpc": (lambda k: [Accuracy(), F1("binary")], "f1", True),
    "stsb": (lambda k: [PearsonSpearman()], "combined", True),
    "classification": (lambda k: [Accuracy(), F1("binary" if k == 2 else "macro")], "accuracy", True),
    "regression": (lambda k: [PearsonSpearman()], "combined", True),
    "language_model": (lambda k: [Perplexity()], "perplexity", False),
}


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise ConfigError(field="task", value=task, problem=f"unknown task; valid tasks are {sorted(TASKS)}",
                          fix="use 'classification' or 'regression' for your own data")


def metric_for_task(task: str, num_labels: int = 2) -> evaluate.CombinedEvaluations | evaluate.Metric:
    """A fresh metric for ``task`` (see the table in the module docstring).

    One metric comes back as itself, several as ``evaluate.CombinedEvaluations``; both have
    ``add_batch(predictions=..., references=...)`` and ``compute()``, and both start empty again
    after ``compute()``, so one object serves every evaluation of a run. ``num_labels`` only
    matters for "classification": 2 gives binary F1 (``f1``), more gives macro F1 (``macro_f1``).
    """
    _check_task(task)
    # a regression Table has num_labels=1, so metric_for_task(table.task, table.num_labels) must work
    least = 2 if task == "classification" else 1
    if not isinstance(num_labels, int) or isinstance(num_labels, bool) or num_labels < least:
        raise ConfigError(field="num_labels", value=num_labels, problem=f"must be an integer >= {least} for {task}",
                          fix="pass the number of classes, e.g. num_labels=2 (Table.num_labels)")
    modules = TASKS[task][0](num_labels)
    return modules[0] if len(modules) == 1 else evaluate.combine(modules)


def primary_metric(task: str) -> tuple[str, bool]:
    """``(result key, higher_is_better)`` that model selection / early stopping should watch."""
    _check_task(task)
    return TASKS[task][1], TASKS[task][2]
