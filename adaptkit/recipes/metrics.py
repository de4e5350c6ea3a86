"""Task metrics as functions of numpy arrays (scikit-learn / scipy): offline, with no cache folder (``evaluate.load``
fetches from the hub). GLUE conventions; STS-B's ``combined`` is the mean of Pearson and Spearman, as in run_glue."""

from __future__ import annotations

import math
from functools import partial
import warnings

import numpy as np
from scipy import stats
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from adaptkit.errors import ConfigError, DataError


def accuracy(predictions, references) -> dict:
    return {"accuracy": float(accuracy_score(references, predictions))}


def f1(predictions, references, average: str = "binary") -> dict:
    """Binary F1 of class 1 (labels must be 0/1), or ``average="macro"`` over every class seen (``macro_f1``)."""
    if average == "binary" and not set(np.unique(np.concatenate([references, predictions])).tolist()) <= {0, 1}:
        raise ConfigError("f1.average", average, "binary F1 needs labels 0/1", "use average='macro' for K classes")
    return {"f1" if average == "binary" else "macro_f1": float(f1_score(references, predictions, average=average))}


def matthews_correlation(predictions, references) -> dict:
    return {"matthews_correlation": float(matthews_corrcoef(references, predictions))}


def pearson_spearman(predictions, references) -> dict:
    if len(predictions) < 2:
        raise DataError("pearson_spearman", len(predictions), "a correlation needs at least 2 examples", "add examples")
    with warnings.catch_warnings():  # constant input: scipy warns and returns NaN, which is what we report
        warnings.simplefilter("ignore", stats.ConstantInputWarning)
        pearson, spearman = float(stats.pearsonr(predictions, references)[0]), float(stats.spearmanr(predictions, references)[0])
    return {"pearson": pearson, "spearmanr": spearman, "combined": (pearson + spearman) / 2}


def perplexity(nll, num_tokens) -> dict:
    if not np.all(np.isfinite(nll)) or np.any(nll < 0):
        raise DataError(field="perplexity.nll", value=float(nll[~np.isfinite(nll) | (nll < 0)][0]), problem="summed "
                        "negative log-likelihoods must be finite and >= 0", fix="pass loss * num_tokens (natural log)")
    if np.any(num_tokens < 0) or num_tokens.sum() == 0:
        raise DataError("perplexity.num_tokens", int(num_tokens.sum()), "needs a positive total of scored tokens",
                        "count the tokens whose label is not -100")
    loss = float(nll.sum()) / int(num_tokens.sum())
    return {"perplexity": math.exp(loss), "loss": loss, "num_tokens": int(num_tokens.sum())}


class Metric:
    """Collects batches (``add_batch(**arrays)``) and computes ``functions`` over all of them, then starts empty."""

    def __init__(self, *functions, inputs=("predictions", "references")):
        self.functions, self.inputs, self.parts = functions, inputs, {name: [] for name in inputs}

    def add_batch(self, **arrays) -> None:
        arrays = {k: np.asarray(v) for k, v in arrays.items()}
        if set(arrays) != set(self.inputs) or len({a.shape for a in arrays.values()}) > 1 or \
                any(a.ndim != 1 for a in arrays.values()):
            raise DataError("add_batch", {k: a.shape for k, a in arrays.items()}, f"needs {list(self.inputs)} of the "
                            "same length, one number per example", "argmax the logits first")
        for k, a in arrays.items():
            self.parts[k].append(a)

    def compute(self, **arrays) -> dict:
        """Over everything added; then empty again, so one object serves a whole run."""
        if arrays:
            self.add_batch(**arrays)
        if not self.parts[self.inputs[0]]:
            raise DataError("compute", "no inputs", f"nothing was added; it needs {list(self.inputs)}", "add batches")
        arrays = {k: np.concatenate(v) for k, v in self.parts.items()}
        self.parts = {name: [] for name in self.inputs}
        return {key: value for fn in self.functions for key, value in fn(**arrays).items()}


# task -> (the metric functions given num_labels, primary metric name, higher is better)
TASKS = {
    "sst2": (lambda k: [accuracy], "accuracy", True),
    "rte": (lambda k: [accuracy], "accuracy", True),
    "cola": (lambda k: [matthews_correlation, accuracy], "matthews_correlation", True),
    "mrpc": (lambda k: [accuracy, f1], "f1", True),
    "stsb": (lambda k: [pearson_spearman], "combined", True),
    "classification": (lambda k: [accuracy, partial(f1, average="binary" if k == 2 else "macro")], "accuracy", True),
    "regression": (lambda k: [pearson_spearman], "combined", True),
    "language_model": (lambda k: [perplexity], "perplexity", False),
}


def metric_for_task(task: str, num_labels: int = 2) -> Metric:
    primary_metric(task)
    least = 2 if task == "classification" else 1  # a regression Table has num_labels=1
    if not isinstance(num_labels, int) or isinstance(num_labels, bool) or num_labels < least:
        raise ConfigError("num_labels", num_labels, f"must be an integer >= {least} for {task}", "e.g. num_labels=2")
    inputs = ("nll", "num_tokens") if task == "language_model" else ("predictions", "references")
    return Metric(*TASKS[task][0](num_labels), inputs=inputs)


def primary_metric(task: str) -> tuple[str, bool]:
    if task not in TASKS:
        raise ConfigError("task", task, f"unknown task; valid tasks are {sorted(TASKS)}", "or use 'classification'")
    return TASKS[task][1], TASKS[task][2]
