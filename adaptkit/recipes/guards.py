"""Guards so that a run never ends silently wrong: flag values, over-long inputs, data that cannot train, divergence,
collapsed predictions. Each names the flag and the fix."""

from __future__ import annotations

import math
from typing import Any, Iterable

import numpy as np
import torch

from adaptkit import lengths
from adaptkit.errors import ConfigError, DataError, NonFiniteError

# flag -> its smallest value; a float one means a float flag, which must be finite too
_LEAST = {"learning_rate": 0.0, "weight_decay": 0.0, "warmup_ratio": 0.0, "max_grad_norm": 0.0,
          "validation_fraction": 0.0, "max_length": 1, "max_train_samples": 1, "max_eval_samples": 1, "num_samples": 0,
          "max_new_tokens": 1, "steps": 1, "batch_size": 1, "block_size": 0, "epochs": 1, "log_every": 1,
          "gradient_accumulation_steps": 1, "keep_checkpoints": 1, "max_steps": 0, "eval_every": 0, "patience": 0,
          "checkpoint_every": 0}
_POSITIVE = {"learning_rate"}  # the smallest value itself refused: a zero rate trains nothing


def check_numbers(args: Any, flags: dict[str, str] | None = None) -> None:
    """Refuse NaN, inf and negative values (argparse's float takes "inf"; lr=inf trains an all-NaN adapter, exit 0)."""
    for name, least in _LEAST.items():
        value, flag = getattr(args, name, None), (flags or {}).get(name) or f"--{name.replace('_', '-')}"
        if value is None:
            continue
        if not math.isfinite(value):
            raise ConfigError(flag, value, "is not a finite number", f"pass a finite value (or leave {flag} out)")
        if value < least or (value == least and name in _POSITIVE):
            bound = f"{'greater than' if name in _POSITIVE else 'at least'} {least:g}"
            fix = f"pass an integer >= {least}" if isinstance(least, int) else \
                f"pass a {'positive' if name in _POSITIVE else 'non-negative'} value (or leave {flag} out)"
            raise ConfigError(flag, value, f"must be {bound}", fix)
    seed = getattr(args, "seed", None)
    if seed is not None and not 0 <= seed < 2**32:  # numpy's seed range; set_seed raised a bare ValueError
        raise ConfigError(field="--seed", value=seed, problem="must be in [0, 2**32 - 1]", fix="pass e.g. --seed 0")


def fit_max_length(model: torch.nn.Module, asked: int | None, default: int, notes: list[str] | None = None) -> int:
    """--max-length that fits the model's positions: an explicit one is checked, the default clamped (and noted)."""
    if asked is not None:
        lengths.check_length(model, asked, field="--max-length")
        return asked
    if (error := lengths.length_error(model, default, field="--max-length")) is None:
        return default
    room = lengths.max_positions(model) - lengths.virtual_tokens(model)
    if room < 1:
        raise error
    if notes is not None:
        notes.append(f"--max-length: default {default} clamped to {room}, what {type(model).__name__} has room for")
    return room


def prompt_room(model: torch.nn.Module, max_new_tokens: int) -> int | None:
    """Prompt tokens that fit beside ``max_new_tokens`` (None: no limit); past the last position is an IndexError."""
    limit = lengths.max_positions(model)
    if limit is None:
        return None
    limit -= lengths.virtual_tokens(model)
    if max_new_tokens >= limit:
        raise ConfigError("--max-new-tokens", max_new_tokens, f"leaves no room for a prompt in the model's {limit} "
                          "positions", f"use --max-new-tokens <= {limit - 1}, or --num-samples 0")
    return limit - max_new_tokens


def require_examples(count: int, source: Any, what: str = "training examples") -> None:
    """A loop over zero batches would spin forever."""
    if count < 1:
        raise DataError(str(source), count, f"holds no {what}", "point at a file with at least one non-blank example")


def require_classes(labels: Iterable[int], source: Any) -> None:
    """With one class the model learns a constant, and its accuracy on that class reads 1.0."""
    seen = sorted(set(int(v) for v in labels))
    if len(seen) < 2:
        raise DataError(f"{source} labels", seen, "the training examples hold only one class", "train on 2+ classes")


# ---- divergence ---------------------------------------------------------------------------------------
def check_finite_loss(loss: float, step: int) -> None:
    if not math.isfinite(loss):
        raise NonFiniteError("loss", loss, f"is not finite at step {step}; the run stopped (the adapter saved before, "
                             "if any, is the last finite best)", "lower --learning-rate, keep --max-grad-norm > 0")


def check_finite_weights(model: torch.nn.Module, step: int) -> None:
    bad = [n for n, p in model.named_parameters() if p.requires_grad and not torch.isfinite(p.detach()).all()]
    if bad:
        raise NonFiniteError("trained weights", bad[:3], f"{len(bad)} tensor(s) hold NaN/inf at step {step}; not saved "
                             "as the best", "lower --learning-rate, keep --max-grad-norm > 0, and check the data")


# ---- collapsed output ----------------------------------------------------------------------------------
# Spread (std of predictions / std of labels) below CONSTANT_SPREAD is one number up to float32 rounding (LoRA on
# MiniLM at 30x its rate: 1.4e-7). Below NEAR_CONSTANT_SPREAD with |pearson| < NO_CORRELATION it has collapsed
# (LoRA at 2e-3 on STS-B: 0.006, pearson -0.04); as narrow but correlated is a slow learner, not flagged.
CONSTANT_SPREAD, NEAR_CONSTANT_SPREAD, NO_CORRELATION = 1e-6, 1e-2, 0.1


def output_spread(predictions: np.ndarray, references: np.ndarray, regression: bool) -> dict[str, float]:
    """``prediction_spread`` (regression; NaN for constant labels) or ``predicted_classes``, so a collapse shows."""
    if regression:
        label_std = float(np.std(references))
        return {"prediction_spread": float(np.std(predictions)) / label_std if label_std > 0 else math.nan}
    return {"predicted_classes": float(len(np.unique(predictions)))}


def constant_output(scores: dict[str, float]) -> str | None:
    """Why the predictions say nothing about their inputs, or None; named, not refused (training passes through it)."""
    if "prediction_spread" in scores:
        spread, pearson = scores["prediction_spread"], scores.get("pearson", math.nan)
        if spread < CONSTANT_SPREAD:
            return f"constant predictions (their spread is {spread:.2g} of the labels')"
        if spread < NEAR_CONSTANT_SPREAD and not abs(pearson) >= NO_CORRELATION:
            return f"near-constant predictions (spread {spread:.2g} of the labels', pearson {pearson:.2f})"
    elif scores.get("predicted_classes") == 1:
        return "one class predicted for every example"
    return None


def collapse_warning(kept: dict[str, dict[str, float]], learning_rate: float) -> str | None:
    """The end-of-run warning when the adapter kept (``kept``: split -> scores) collapsed: constant output comes from
    a rate too high; near-constant, uncorrelated output from a rate too high or too low."""
    found = {split: why for split, scores in kept.items() if scores and (why := constant_output(scores))}
    if not found:
        return None
    where = "; ".join(f"{split}: {why}" for split, why in found.items())
    if any(scores.get("prediction_spread", 1.0) < CONSTANT_SPREAD for scores in kept.values() if scores):
        cause = (f"--learning-rate {learning_rate:g} is too high for this task and strategy: the output collapsed "
                 f"onto one value. Fix: run again with a lower rate, e.g. --learning-rate {learning_rate / 10:g}")
    else:
        cause = (f"--learning-rate {learning_rate:g} does not suit this task and strategy: too high and the output "
                 f"collapses, too low (or too few steps) and it never learns to vary. Fix: run again with "
                 f"--learning-rate {learning_rate / 10:g} and with {learning_rate * 10:g}, or train longer")
    return f"WARNING: the adapter kept gives {where}: it learned nothing usable. {cause}."
