"""``adaptkit.sanity_check(model, first_batch, base_model=load_base)``: five cheap checks before a run spends hours.

1. **init**: the adapter at initialisation leaves the outputs unchanged (prompt learning is skipped: by design);
2. **gradients**: every trainable tensor gets a finite gradient, a new task head trains, no frozen tensor changes;
3. **loss**: the loss is finite and falls over ``steps`` AdamW steps on this batch; every trainable tensor changes;
4. **save_load**: ``save`` then ``load`` onto ``base_model()`` (a fresh base) reproduces the outputs;
5. **merge**: the merged plain model computes what the adapted one does (mergeable strategies).

The model is left as found (tensors, RNG states, mode). A failure raises SanityCheckError (``.report``).
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel, PromptLearningConfig
from torch import nn

from adaptkit import lengths, targets
from adaptkit.core import is_quantized, load, merge, save, strategy_of
from adaptkit.errors import (BaseMismatchError, ConfigError, ConfigTypeError, NotAdaptedError, NotMergeableError,
                             SanityCheckError)
from adaptkit.strategies import bottleneck

CHECKS = ("init", "gradients", "loss", "save_load", "merge")


@dataclasses.dataclass
class Result:
    name: str
    status: str             # "ok", "skipped" or "failed"
    detail: str = ""        # what was measured, or why skipped, or what is wrong
    fix: str | None = None  # for failures
    value: Any = None


@dataclasses.dataclass
class SanityReport:
    strategy: str
    results: list[Result]
    losses: list[float]

    @property
    def ok(self) -> bool:
        return not self.failures

    @property
    def failures(self) -> list[Result]:
        return [r for r in self.results if r.status == "failed"]

    def __str__(self) -> str:
        lines = [f"sanity check ({self.strategy}): " + ("OK" if self.ok else f"{len(self.failures)} failed")]
        lines += [f"  {r.status:>7}  {r.name}: {r.detail}" + (f" Fix: {r.fix}" if r.fix else "") for r in self.results]
        return "\n".join(lines)


def sanity_check(model: nn.Module, batch: Mapping[str, torch.Tensor], *, steps: int = 3, lr: float = 1e-3,
                 base_model: Callable[[], nn.Module] | None = None, at_init: bool = True,
                 loss_fn: Callable[[Any, Mapping], torch.Tensor] | None = None,
                 atol: float = 1e-5, merge_rtol: float = 1e-4, raise_on_failure: bool = True) -> SanityReport:
    """The module docstring's checks on an adapted model and one batch of inputs and labels (or pass
    ``loss_fn(outputs, batch)``). ``at_init=False`` skips the init check for a model that has trained already."""
    strategy = strategy_of(model)
    if strategy is None:
        raise NotAdaptedError("model", type(model).__name__, "was not adapted by adaptkit", "adaptkit.adapt it first")
    if not isinstance(batch, Mapping) or not all(isinstance(v, torch.Tensor) for v in batch.values()):
        raise ConfigTypeError("batch", type(batch).__name__, "expected a dict of tensors", "pass next(iter(loader))")
    if not isinstance(steps, int) or steps < 2:
        raise ConfigTypeError("steps", steps, "must be an int >= 2 (LoRA's A moves from step 2)", "use steps=3")
    _check_batch(model, batch)
    quant = is_quantized(model)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    saved = {n: p.detach().clone() for n, p in trainable.items()}
    frozen = {n: _fingerprint(p) for n, p in model.named_parameters() if not p.requires_grad}
    results, losses, was_training = [], [], model.training
    try:
        with torch.random.fork_rng():  # CPU and CUDA states (dropout draws)
            results.append(_check_init(model, batch, strategy, quant, atol) if at_init
                           else Result("init", "skipped", "at_init=False (the model has trained already)"))
            results += _train_checks(model, batch, strategy, trainable, saved, frozen, steps, lr, loss_fn, losses)
            results += _roundtrip_checks(model, batch, strategy, base_model, quant, atol, merge_rtol)
    finally:  # the model as found: trained tensors, gradients, train/eval mode
        model.train(was_training)
        with torch.no_grad():
            for name, p in trainable.items():
                p.copy_(saved[name])
                p.grad = None
    report = SanityReport(strategy.name, results, losses)
    if raise_on_failure and not report.ok:
        first, *others = report.failures
        also = f" (also failed: {', '.join(r.name for r in others)})" if others else ""
        error = SanityCheckError(f"sanity_check.{first.name}", first.value, first.detail + also, first.fix)
        error.report = report
        raise error
    return report


def _check_batch(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> None:
    """Token ids, labels and length the model can take (else an IndexError deep inside names no input)."""
    ids, labels = batch.get("input_ids"), batch.get("labels")
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if ids is not None and (vocab := getattr(embeddings, "num_embeddings", None)) is not None:
        _in_range(ids, vocab, "input_ids", "the model's vocabulary", "tokenize with the model's own tokenizer")
    if ids is not None and ids.dim() == 2:
        lengths.check_length(model, ids.shape[1], field="batch['input_ids'] length")
    if labels is None or labels.is_floating_point():
        return
    config = getattr(model, "config", None)
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if out is not None and getattr(out, "out_features", None):  # language model: labels are token ids
        _in_range(labels[labels != -100], out.out_features, "labels", "the vocabulary")  # -100: ignored
    elif getattr(config, "problem_type", None) != "regression" and getattr(config, "num_labels", 1) > 1:
        _in_range(labels[labels != -100], config.num_labels, "labels", f"the {config.num_labels} classes")


def _in_range(values: torch.Tensor, size: int, key: str, what: str,
              fix: str = "map labels to 0..K-1 and load with num_labels=K (-100: ignored)") -> None:
    if values.numel() and (int(values.min()) < 0 or int(values.max()) >= size):
        bad = int(values.min()) if int(values.min()) < 0 else int(values.max())
        raise ConfigError(f"batch[{key!r}]", bad, f"is outside {what} 0..{size - 1}", fix)


def _check_init(model, batch, strategy, quant, atol) -> Result:
    peft = isinstance(model, PeftModel)
    if quant == "4bit":  # an eval forward repacks 4-bit weights on CPU, and training fails after it
        return Result("init", "skipped", "4-bit model: an eval-mode forward would break its training on CPU")
    if peft and isinstance(model.peft_config[model.active_adapter], PromptLearningConfig):
        return Result("init", "skipped", f"{strategy.name} prepends trained vectors: it changes the outputs by design")
    if not peft and not bottleneck.has_adapters(model):
        return Result("init", "skipped", f"{strategy.name} adds no modules: the outputs are the base model's")
    adapted = _outputs(model, batch)
    with model.disable_adapter() if peft else bottleneck.adapters_off(model):
        base = _outputs(model, batch)
    if (diff := _max_diff(adapted, base)) > atol + atol * float(base.abs().max()):
        return Result("init", "failed", f"the {strategy.name} adapter changes the outputs at initialisation (max "
                      f"|difference| {diff:.3g})", "initialise it to the identity (LoRA: B = 0; bottleneck: up = 0), "
                      "or pass at_init=False if the model has trained already", diff)
    return Result("init", "ok", f"outputs unchanged by the adapter (max |difference| {diff:.2g})")


_NO_GRADIENTS = Result("loss", "skipped", "no gradients to follow")


def _train_checks(model, batch, strategy, trainable, saved, frozen, steps, lr, loss_fn, losses) -> list[Result]:
    if not trainable:
        return [Result("gradients", "failed", "0 trainable parameters", "check the strategy's targets/heads", 0),
                Result("loss", "skipped", "nothing trains")]
    model.train()
    start = _fixed_loss(model, batch, loss_fn)
    optimizer = torch.optim.AdamW(trainable.values(), lr=lr, weight_decay=0.0)  # no decay: a change means a gradient
    for step in range(steps):
        optimizer.zero_grad(set_to_none=True)
        loss = _loss(model, batch, loss_fn)
        losses.append(float(loss.detach()))
        if not math.isfinite(losses[-1]):
            return [Result("gradients", "skipped", "the loss is not finite"),
                    Result("loss", "failed", f"loss is {losses[-1]} at step {step + 1}",
                           "lower the learning rate, check the labels and the inputs for NaN", losses[-1])]
        if not loss.requires_grad:  # the graph from the trainable tensors to the loss is cut
            return [_gradient_result(model, strategy, trainable, dict.fromkeys(trainable)), _NO_GRADIENTS]
        loss.backward()
        grads = {n: p.grad for n, p in trainable.items()}
        if step == 0 and (result := _gradient_result(model, strategy, trainable, grads)).status == "failed":
            return [result, _NO_GRADIENTS]
        optimizer.step()
    end = _fixed_loss(model, batch, loss_fn)
    if changed := [n for n, fp in frozen.items() if not torch.equal(fp, _fingerprint(model.get_parameter(n)))]:
        result = Result("gradients", "failed", f"{len(changed)} frozen tensor(s) changed during training: "
                        f"{changed[:5]}", "something writes into base weights in place: report it", len(changed))
    if unchanged := [n for n, p in trainable.items() if torch.equal(p.detach(), saved[n])]:
        return [result, Result("loss", "failed", f"{len(unchanged)} trainable tensor(s) did not change in {steps} "
                               f"steps: {unchanged[:5]}", "put them on the path to the loss", len(unchanged))]
    if not end < start:
        return [result, Result("loss", "failed", f"the loss did not fall over {steps} steps on one batch ({start:.4f} "
                               f"-> {end:.4f})", f"try another learning rate (lr={lr} here)", (start, end))]
    return [result, Result("loss", "ok", f"finite, {start:.4f} -> {end:.4f} over {steps} steps; all trainables moved")]


def _gradient_result(model, strategy, trainable, grads) -> Result:
    missing = [n for n, g in grads.items() if g is None]
    bad = [n for n, g in grads.items() if g is not None and not bool(torch.isfinite(g).all())]
    checkpointing = any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())
    if len(missing) == len(trainable):
        return Result("gradients", "failed", "0 trainable parameters received gradients: " + (
            "gradient checkpointing without input gradients" if checkpointing else "none is on the path to the loss"),
            "call model.enable_input_require_grads() after gradient_checkpointing_enable()" if checkpointing
            else "check the strategy's targets and that the loss uses the outputs", 0)
    if missing:
        return Result("gradients", "failed", f"{len(missing)} of {len(trainable)} trainable tensors received no "
                      f"gradient: {missing[:5]}", "freeze what the loss does not reach", len(missing))
    if bad:
        return Result("gradients", "failed", f"{len(bad)} gradient(s) contain NaN/inf: {bad[:5]}",
                      "lower the learning rate or use fp32/bf16 instead of fp16", len(bad))
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    heads = [h for h in targets.new_head_names(base) if not any(h in n.split(".") for n in trainable)]
    if strategy.freezes_base and heads:
        return Result("gradients", "failed", f"the new task head(s) {heads} do not train: they stay random",
                      "list them in the strategy's heads option (PEFT: modules_to_save)", heads)
    return Result("gradients", "ok", f"all {len(trainable)} trainable tensors received finite gradients")


_SAME_BASE = "load onto the same base model (same checkpoint, num_labels, dtype) that was adapted"


def _roundtrip_checks(model, batch, strategy, base_model, quant, atol, merge_rtol) -> list[Result]:
    why = ("pass base_model=<a callable returning a freshly loaded base> to check it" if base_model is None else
           "4-bit model: an eval-mode forward would break its training on CPU" if quant == "4bit" else None)
    if why:
        return [Result("save_load", "skipped", why), Result("merge", "skipped", why)]
    reference = _outputs(model, batch)
    with tempfile.TemporaryDirectory(prefix=".adaptkit-sanity-") as tmp:
        save(model, Path(tmp) / "adapter")
        try:
            loaded = load(Path(tmp) / "adapter", base_model())
        except BaseMismatchError as exc:  # load compares the base with the one the adapter was saved from
            return [Result("save_load", "failed", f"the adapter does not load onto base_model(): {exc.problem}",
                           _SAME_BASE, exc.value), Result("merge", "skipped", "nothing reloaded")]
    diff = _max_diff(_outputs(loaded, batch), reference)
    results = [Result("save_load", "ok", f"reloaded outputs match (max |difference| {diff:.2g})")
               if diff <= atol + atol * float(reference.abs().max()) else Result("save_load", "failed", "the reloaded "
               f"adapter computes different outputs (max |difference| {diff:.3g})", _SAME_BASE, diff)]
    if not strategy.mergeable or quant:
        return results + [Result("merge", "skipped", f"{strategy.name} is not mergeable" if not strategy.mergeable
                                 else f"{quant} model: merging needs dequantized weights")]
    try:
        merged = merge(loaded)
    except NotMergeableError as exc:
        return results + [Result("merge", "skipped", str(exc))]
    diff, tolerance = _max_diff(_outputs(merged, batch), reference), atol + merge_rtol * float(reference.abs().max())
    return results + [Result("merge", "ok", f"merged outputs match (max |difference| {diff:.2g})") if diff <= tolerance
                      else Result("merge", "failed", f"the merged model computes different outputs (max |difference| "
                                  f"{diff:.3g} > {tolerance:.3g})", "report it; keep the unmerged adapter", diff)]


def _inputs(batch: Mapping) -> dict:
    return {k: v for k, v in batch.items() if k not in ("labels", "start_positions", "end_positions")}


def _outputs(model, batch) -> torch.Tensor:
    """The main output (logits) in eval mode, in fp32 (the training checks set train mode; sanity_check restores
    the caller's)."""
    model.eval()
    with torch.no_grad():
        out = model(**_inputs(batch))
    main = out[0] if isinstance(out, tuple) else getattr(out, "logits", None)
    return (main if main is not None else next(iter(out.values()))).detach().float()


def _loss(model, batch, loss_fn) -> torch.Tensor:
    outputs = model(**(batch if loss_fn is None else _inputs(batch)))
    loss = loss_fn(outputs, batch) if loss_fn is not None else getattr(outputs, "loss", None)
    if loss is None:
        raise ConfigTypeError("batch", sorted(batch), "the model returned no loss", "include 'labels', or pass loss_fn")
    return loss


def _fixed_loss(model, batch, loss_fn) -> float:
    """The loss in training mode with the same dropout masks each time (same seed), without gradients."""
    with torch.random.fork_rng(), torch.no_grad():
        torch.manual_seed(0)
        return float(_loss(model, batch, loss_fn))


def _fingerprint(p: torch.Tensor) -> torch.Tensor:
    """The float64 sum plus ~4k evenly spaced values: any real update moves them; no copy of the tensor."""
    flat = p.detach().reshape(-1)
    sample = flat[:: max(1, flat.numel() // 4096)].to(torch.float64)
    return torch.cat([flat.sum(dtype=torch.float64).reshape(1), sample])


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return math.inf if a.shape != b.shape else float((a - b).abs().max()) if a.numel() else 0.0


__all__ = ["sanity_check", "SanityReport", "Result", "CHECKS"]
