"""adaptkit.recipes.metrics against scikit-learn / scipy computed directly, offline and with no cache folder."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from scipy import stats
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from adaptkit.errors import ConfigError, DataError
from adaptkit.recipes.metrics import (TASKS, accuracy, f1, matthews_correlation, metric_for_task, pearson_spearman,
                                      primary_metric)


def test_hand_made_classification_values():
    preds, refs = np.array([1, 0, 1, 1, 0, 1]), np.array([1, 0, 0, 1, 1, 1])
    # tp=3 fp=1 fn=1 tn=1: accuracy 4/6, F1 = 2*3 / (2*3 + 1 + 1) = 0.75, MCC = (3-1)/sqrt(4*4*2*2) = 0.25
    assert accuracy(preds, refs) == {"accuracy": pytest.approx(4 / 6)}
    assert f1(preds, refs) == {"f1": pytest.approx(0.75)}
    assert matthews_correlation(preds, refs)["matthews_correlation"] == pytest.approx(0.25)


def test_hand_made_regression_and_perplexity():
    out = pearson_spearman(np.array([1.0, 2.0, 3.0, 4.0]), np.array([2.0, 4.0, 6.0, 8.5]))
    assert out["spearmanr"] == pytest.approx(1.0)
    assert out["pearson"] == pytest.approx(stats.pearsonr([1, 2, 3, 4], [2, 4, 6, 8.5])[0])
    assert out["combined"] == pytest.approx((out["pearson"] + 1.0) / 2)
    # 5 tokens with total NLL 5 -> mean loss 1 -> perplexity e
    out = metric_for_task("language_model")(nll=[2.0, 3.0], num_tokens=[2, 3])
    assert out == {"perplexity": pytest.approx(math.e), "loss": pytest.approx(1.0), "num_tokens": 5}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_data_matches_sklearn_and_scipy(seed):
    rng = np.random.default_rng(seed)
    refs, preds = rng.integers(0, 2, 203), rng.integers(0, 2, 203)
    multi_refs, multi_preds = rng.integers(0, 4, 203), rng.integers(0, 4, 203)
    y, yhat = rng.normal(size=203), rng.normal(size=203)
    # torch, numpy and lists all accepted
    assert metric_for_task("mrpc")(predictions=torch.from_numpy(preds), references=torch.from_numpy(refs)) == \
        {"accuracy": pytest.approx(accuracy_score(refs, preds)), "f1": pytest.approx(f1_score(refs, preds))}
    cola = metric_for_task("cola")(predictions=preds.tolist(), references=refs.tolist())
    assert cola["matthews_correlation"] == pytest.approx(matthews_corrcoef(refs, preds))
    multi = metric_for_task("classification", 4)(predictions=multi_preds, references=multi_refs)
    assert multi["macro_f1"] == pytest.approx(f1_score(multi_refs, multi_preds, average="macro"))
    out = metric_for_task("stsb")(predictions=yhat, references=y)
    assert out["pearson"] == pytest.approx(stats.pearsonr(yhat, y)[0])
    assert out["spearmanr"] == pytest.approx(stats.spearmanr(yhat, y)[0])


def test_perplexity_of_per_sequence_sums_weighs_every_token_once():
    rng = np.random.default_rng(0)
    token_nll = rng.exponential(2.0, size=(4, 37))
    lengths = np.array([37, 5, 20, 1])  # ragged: padding positions are not scored
    sums = [row[:n].sum() for row, n in zip(token_nll, lengths)]
    scored = np.concatenate([row[:n] for row, n in zip(token_nll, lengths)])
    out = metric_for_task("language_model")(nll=sums, num_tokens=lengths)
    assert out["perplexity"] == pytest.approx(math.exp(scored.mean()))


def test_metric_for_task_mapping():
    mrpc = metric_for_task("mrpc")
    assert mrpc(predictions=[1, 0, 1, 0], references=[1, 1, 1, 0]) == {"accuracy": pytest.approx(0.75),
                                                                        "f1": pytest.approx(0.8)}
    assert mrpc(predictions=[0, 0], references=[1, 1]) == {"accuracy": 0.0, "f1": 0.0}  # no state between calls
    assert set(metric_for_task("cola")(predictions=[0, 1], references=[0, 1])) == \
        {"matthews_correlation", "accuracy"}
    assert set(metric_for_task("stsb")(predictions=[0.0, 1, 3], references=[0.0, 2, 1])) == \
        {"pearson", "spearmanr", "combined"}
    assert set(metric_for_task("classification")(predictions=[0, 1], references=[0, 1])) == \
        {"accuracy", "f1"}
    assert set(metric_for_task("classification", num_labels=3)(predictions=[0, 2], references=[0, 1])) \
        == {"accuracy", "macro_f1"}
    for task in ("sst2", "rte"):
        assert set(metric_for_task(task)(predictions=[0, 1], references=[0, 0])) == {"accuracy"}


def test_primary_metric_is_a_key_the_task_metric_returns():
    inputs = {"classification": dict(predictions=[0, 1, 1], references=[0, 1, 0]),
              "regression": dict(predictions=[0.0, 1, 3], references=[0.0, 2, 1]),
              "language_model": dict(nll=[3.0], num_tokens=[2])}
    kind = {"sst2": "classification", "rte": "classification", "cola": "classification",
            "mrpc": "classification", "stsb": "regression", "classification": "classification",
            "regression": "regression", "language_model": "language_model"}
    assert set(kind) == set(TASKS)  # a new task must be added here too
    for task in TASKS:
        name, higher = primary_metric(task)
        assert name in metric_for_task(task)(**inputs[kind[task]])
        assert higher is (task != "language_model")
    assert primary_metric("cola") == ("matthews_correlation", True)
    assert primary_metric("mrpc") == ("f1", True)


def test_unknown_task_lists_valid_tasks():
    with pytest.raises(ConfigError, match=r"task='glue': unknown task; valid tasks are \[.*'sst2'.*\]"):
        metric_for_task("glue")
    with pytest.raises(ConfigError, match="valid tasks are"):
        primary_metric("accuracy")
    with pytest.raises(ConfigError, match="num_labels=1: must be an integer >= 2 for classification"):
        metric_for_task("classification", num_labels=1)
    with pytest.raises(ConfigError, match="num_labels=0: must be an integer >= 1 for stsb"):
        metric_for_task("stsb", num_labels=0)
    assert "combined" in metric_for_task("regression", num_labels=1)(predictions=[0, 1.0], references=[1, 2.0])


def test_bad_inputs_are_typed_errors():
    with pytest.raises(ConfigError, match=r"f1.average='binary': binary F1 needs labels 0/1.*average='macro'"):
        metric_for_task("mrpc")(predictions=[0, 2], references=[0, 1])
    with pytest.raises(DataError, match="mrpc metric='no examples': there is nothing to score"):
        metric_for_task("mrpc")(predictions=[], references=[])
    with pytest.raises(DataError, match="of the same length, one number per example"):
        metric_for_task("sst2")(predictions=[0, 1], references=[0])
    with pytest.raises(DataError, match=r"argmax"):
        metric_for_task("sst2")(predictions=torch.zeros(2, 3), references=[0, 1])
    with pytest.raises(DataError, match=r"needs \['nll', 'num_tokens'\]"):
        metric_for_task("language_model")(predictions=[0], references=[0])
    with pytest.raises(DataError, match="at least 2 examples"):
        metric_for_task("stsb")(predictions=[1.0], references=[2.0])
    with pytest.raises(DataError, match="perplexity.nll=inf"):
        metric_for_task("language_model")(nll=[1.0, float("inf")], num_tokens=[1, 1])
    with pytest.raises(DataError, match="positive total of scored tokens"):
        metric_for_task("language_model")(nll=[0.0], num_tokens=[0])


def test_constant_predictions_give_nan_correlation_not_a_crash():
    out = metric_for_task("stsb")(predictions=[1.0, 1.0, 1.0], references=[0.0, 1.0, 2.0])
    assert math.isnan(out["pearson"]) and math.isnan(out["combined"])


def test_no_private_api_of_evaluate_and_a_read_only_home_offline_writes_nothing(tmp_path):
    """A stock evaluate.Metric creates ~/.cache/huggingface/metrics/...; ours must not touch disk (and, issue 27,
    must not reach into evaluate's private _build_data_dir to avoid it)."""
    import adaptkit.recipes.metrics as module
    assert "import evaluate" not in open(module.__file__).read() and "_build_data_dir" not in open(module.__file__).read()
    home = tmp_path / "home"
    home.mkdir()
    home.chmod(0o555)
    code = ("from adaptkit.recipes.metrics import metric_for_task as m\n"
            "print(m('mrpc')(predictions=[1, 0], references=[1, 1])['accuracy'])\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "XDG_"))}
    env.update(HOME=str(home), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "0.5"
    assert list(home.iterdir()) == []
