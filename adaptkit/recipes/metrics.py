"""Task metrics as functions of numpy arrays (scikit-learn / scipy): offline, with no cache folder (``evaluate.load``
fetches from the hub). GLUE conventions; STS-B's ``combined`` is the mean of Pearson and Spearman, as in run_glue."""

from __future__ import annotations

import math
from functools import partial
from typing import Callable
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


def metric_for_task(task: str, num_labels: int = 2) -> Callable[..., dict]:
    """The task's metrics as one function of whole arrays (an evaluation joins its batches first), e.g.
    ``metric_for_task("mrpc")(predictions=..., references=...)`` or ``(nll=..., num_tokens=...)`` for language_model."""
    primary_metric(task)
    least = 2 if task == "classification" else 1  # a regression Table has num_labels=1
    if not isinstance(num_labels, int) or isinstance(num_labels, bool) or num_labels < least:
        raise ConfigError("num_labels", num_labels, f"must be an integer >= {least} for {task}", "e.g. num_labels=2")
    functions = TASKS[task][0](num_labels)
    inputs = ["nll", "num_tokens"] if task == "language_model" else ["predictions", "references"]

    def compute(**arrays) -> dict:
        arrays = {k: np.asarray(v) for k, v in arrays.items()}
        if sorted(arrays) != inputs or len({a.shape for a in arrays.values()}) > 1 or \
                any(a.ndim != 1 for a in arrays.values()):
            raise DataError(f"{task} metric", {k: a.shape for k, a in arrays.items()}, f"needs {inputs} of the same "
                            "length, one number per example", "argmax the logits first")
        if len(arrays[inputs[0]]) == 0:
            raise DataError(f"{task} metric", "no examples", "there is nothing to score", "evaluate on 1+ examples")
        return {key: value for fn in functions for key, value in fn(**arrays).items()}
    return compute


def primary_metric(task: str) -> tuple[str, bool]:
    if task not in TASKS:
        raise ConfigError("task", task, f"unknown task; valid tasks are {sorted(TASKS)}", "or use 'classification'")
    return TASKS[task][1], TASKS[task][2]
