"""Linear probe on cached features: run the frozen model once per example, then train only the head.

The benchmark's speed-up, not part of adaptkit: ``python benchmarks/feature_cache.py --feature-cache eval
<recipes/classify.py flags>`` runs the classify recipe with its linear probe trained on the cache
(``main``); benchmarks/run.py does so for the linear-probe cells.

A linear probe trains a head on a model that never changes, so running the whole encoder every epoch
repeats the same work. :class:`CachedProbe` runs it once per example (eval mode, no gradients),
records what the head reads with a forward pre-hook, and trains the head on those records::

    model = adaptkit.adapt(model, "linear_probe")
    probe = CachedProbe(model)                                    # refuses models it cannot replay
    train = probe.loader(train_loader, shuffle=True, seed=0)      # the encoder runs here, once
    for batch in train:                                           # {"head_inputs": ..., "labels": ...}
        probe(**batch).loss.backward(); ...
    adaptkit.save(probe, "out/")   # the folder adaptkit.save(model, ...) would write: the head only

The probe shares the head module with ``model``, so after training ``model`` is the trained linear
probe, end to end.

Honesty rules, checked while caching (a failure raises :class:`UnsupportedError` naming the reason,
so the caller runs the end-to-end probe instead and says so):

* the trainable parameters must all live in one top-level child of the model (the head) and be
  shared with nothing outside it. DistilBERT's two head modules with a ReLU between them in the
  model's code, or a language-model head tied to the input embeddings, are refused;
* on every batch, ``head(cached input)`` must reproduce the model's logits exactly (``torch.equal``)
  and the probe's loss the model's loss. GPT-2's classifier, which scores every position and then
  picks the last token, fails this and is refused;
* memory: a head that reads the whole sequence (RoBERTa's takes ``(batch, tokens, hidden)`` and uses
  position 0) is stored as position 0 only, when that reproduces the logits exactly on every batch;
  otherwise it is refused rather than storing ``tokens x hidden`` floats per example.
  BERT-style heads store ``hidden`` floats per example (SST-2 train on MiniLM: 6,920 x 384 x 4 B = 10.6 MB);
* ``encoder_mode="match"`` (the default) also requires that the frozen part computes the same head
  inputs in train mode as in eval mode: otherwise (dropout, batch-norm statistics or augmentation
  inside the model) the end-to-end probe trains on inputs that change every epoch and the cache
  would silently train something else. ``encoder_mode="eval"`` accepts the eval-mode features
  instead: the textbook linear probe of a fixed feature map, where the frozen encoder's dropout is
  off. It is a different (usually equivalent) training run, so it is never chosen implicitly.
  The check runs on the first batch, with the RNG forked and buffers restored (no side effects).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from adaptkit import strategy_of
from adaptkit.errors import ConfigError, NotAdaptedError, UnsupportedError
from adaptkit.names import MARKER

ROOT = Path(__file__).resolve().parent.parent

EncoderMode = Literal["match", "eval"]
ENCODER_MODES = ("match", "eval")


@dataclass
class CachedFeatures:
    """What the head reads, one row per example, in the examples' original order."""

    head_inputs: torch.Tensor          # (N, ...) on the CPU
    labels: torch.Tensor | None        # (N, ...) or None when the examples had no labels
    seconds: float                     # wall time of the caching pass

    def __len__(self) -> int:
        return self.head_inputs.shape[0]

    @property
    def nbytes(self) -> int:
        labels = 0 if self.labels is None else self.labels.numel() * self.labels.element_size()
        return self.head_inputs.numel() * self.head_inputs.element_size() + labels

    def loader(self, batch_size: int, *, shuffle: bool = False, seed: int = 0) -> torch.utils.data.DataLoader:
        """Batches ``{"head_inputs", "labels"}``; shuffling is seeded, so runs repeat exactly."""
        generator = torch.Generator().manual_seed(seed) if shuffle else None
        return torch.utils.data.DataLoader(range(len(self)), batch_size=batch_size, shuffle=shuffle,
                                           generator=generator, collate_fn=_Gather(self))


class _Gather:
    """Collate a list of row indices into one batch (a class, not a lambda, so workers can pickle it)."""

    def __init__(self, cached: CachedFeatures):
        self.cached = cached

    def __call__(self, rows: list[int]) -> dict[str, torch.Tensor]:
        index = torch.tensor(rows)
        batch = {"head_inputs": self.cached.head_inputs[index]}
        if self.cached.labels is not None:
            batch["labels"] = self.cached.labels[index]
        return batch


class CachedProbe(nn.Module):
    """The head of a linear-probe model, trained on cached head inputs (see the module docstring).

    Its parameters are the head's, under the same names as in the model (``classifier.weight``...),
    and it carries the model's strategy: ``adaptkit.save(probe, dir)`` writes exactly the folder
    ``adaptkit.save(model, dir)`` would, and ``adaptkit.load(dir, base)`` rebuilds the full model.
    """

    def __init__(self, model: nn.Module, *, encoder_mode: EncoderMode = "match"):
        super().__init__()
        if encoder_mode not in ENCODER_MODES:
            raise ConfigError(field="encoder_mode", value=encoder_mode, problem=f"must be one of {ENCODER_MODES}",
                              fix="use 'match' (cache only when train-mode features equal eval-mode ones) or "
                                  "'eval' (probe the eval-mode feature map)")
        strategy = strategy_of(model)
        if strategy is None:
            raise NotAdaptedError(field="model", value=type(model).__name__, problem="was not adapted by adaptkit",
                                  fix="call adaptkit.adapt(model, 'linear_probe') first")
        if strategy.name != "linear_probe":
            raise UnsupportedError(field="strategy", value=strategy.label,
                                   problem="cached features need a frozen encoder; only 'linear_probe' has one",
                                   fix="train this strategy end to end, or adapt with 'linear_probe'")
        self.config = getattr(model, "config", None)  # adaptkit.save records the base model's name from it
        self.encoder_mode = encoder_mode
        self.first_position_only: bool | None = None  # decided on the first batch of a 3-D head input
        self.cache_seconds = 0.0
        self.__dict__["model"] = model        # not a submodule: the probe's parameters are the head's only
        self.__dict__[MARKER] = strategy      # adaptkit.save/strategy_of treat the probe like the model
        self.head_name = _single_head(model)
        if hasattr(self, self.head_name):     # e.g. a head called "forward" or "config"
            raise UnsupportedError(field="model", value=self.head_name,
                                   problem="the head's name collides with an attribute of CachedProbe",
                                   fix="train the linear probe end to end (no feature cache)")
        self.add_module(self.head_name, getattr(model, self.head_name))
        self.cached_examples = 0

    def head_module(self) -> nn.Module:
        return getattr(self, self.head_name)

    def report(self) -> dict[str, Any]:
        """What a run records about the cache: mode, examples, seconds, what was stored."""
        return {"encoder_mode": self.encoder_mode, "cached_examples": self.cached_examples,
                "cache_seconds": round(self.cache_seconds, 3), "head": self.head_name,
                "first_position_only": self.first_position_only}

    # ---- training on the cache ------------------------------------------------------------------
    def forward(self, head_inputs: torch.Tensor, labels: torch.Tensor | None = None):
        from transformers.modeling_outputs import SequenceClassifierOutput
        logits = self.head_module()(head_inputs)
        loss = None if labels is None else _loss(logits, labels, self.config)
        return SequenceClassifierOutput(loss=loss, logits=logits)

    def loader(self, loader: torch.utils.data.DataLoader, *, shuffle: bool, seed: int = 0,
               batch_size: int | None = None) -> torch.utils.data.DataLoader:
        """Cache ``loader``'s examples (its dataset and collate_fn) and batch the cache like it did."""
        size = batch_size or loader.batch_size or getattr(loader.batch_sampler, "batch_size", None)
        if not size:
            raise ConfigError(field="batch_size", value=None, problem="the loader does not say its batch size",
                              fix="pass batch_size=...")
        return self.cache(loader.dataset, loader.collate_fn).loader(size, shuffle=shuffle, seed=seed)

    # ---- the caching pass -----------------------------------------------------------------------
    @torch.no_grad()
    def cache(self, examples, collate_fn, batch_size: int = 64) -> CachedFeatures:
        """Run the frozen model once per example (eval mode, length-sorted batches) and keep the head's input."""
        started = time.perf_counter()
        model, n = self.model, len(examples)
        device = next(model.parameters()).device
        order = list(range(n))
        if n and isinstance(examples[0], dict) and "input_ids" in examples[0]:
            order.sort(key=lambda i: len(examples[i]["input_ids"]))  # similar lengths: least padding
        calls: list[tuple[tuple, dict]] = []
        hook = self.head_module().register_forward_pre_hook(lambda m, a, k: calls.append((a, k)), with_kwargs=True)
        was_training = model.training
        inputs, labels = [], []
        try:
            model.eval()
            for start in range(0, n, batch_size):
                batch = _to(collate_fn([examples[i] for i in order[start:start + batch_size]]), device)
                calls.clear()
                out = model(**batch)
                x = self._head_input(calls)
                if start == 0 and self.encoder_mode == "match":
                    self._require_train_mode_equal(batch, x, calls)
                inputs.append(self._verified(x, out, batch.get("labels")).cpu())
                if batch.get("labels") is not None:
                    labels.append(batch["labels"].cpu())
        finally:
            hook.remove()
            model.train(was_training)
        back = torch.empty(n, dtype=torch.long)
        back[torch.tensor(order, dtype=torch.long)] = torch.arange(n)  # sorted position of each example
        head_inputs = torch.cat(inputs)[back] if inputs else torch.empty(0)
        label_tensor = torch.cat(labels)[back] if labels and len(labels) == len(inputs) else None
        seconds = time.perf_counter() - started
        self.cache_seconds += seconds
        self.cached_examples += n
        return CachedFeatures(head_inputs, label_tensor, seconds)

    def _head_input(self, calls: list[tuple[tuple, dict]]) -> torch.Tensor:
        if len(calls) != 1:
            raise UnsupportedError(field="model", value=f"{type(self.model).__name__}.{self.head_name}",
                                   problem=f"the head ran {len(calls)} times in one forward pass; a cache of one "
                                           "input per example cannot replay that",
                                   fix="train the linear probe end to end (no feature cache)")
        args, kwargs = calls[0]
        if len(args) != 1 or kwargs or not isinstance(args[0], torch.Tensor):
            raise UnsupportedError(field="model", value=f"{type(self.model).__name__}.{self.head_name}",
                                   problem="the head takes more than one tensor (or keyword arguments); only a "
                                           "head reading a single tensor can be fed from a cache",
                                   fix="train the linear probe end to end (no feature cache)")
        return args[0]

    def _verified(self, x: torch.Tensor, out, labels: torch.Tensor | None) -> torch.Tensor:
        """``x`` (or its first position) after checking that the head reproduces logits and loss exactly."""
        name = f"{type(self.model).__name__}.{self.head_name}"
        logits = getattr(out, "logits", None)
        replayed = self.head_module()(x)
        if not isinstance(logits, torch.Tensor) or replayed.shape != logits.shape or not torch.equal(replayed, logits):
            shapes = f"head output {tuple(replayed.shape)} vs logits " \
                     f"{tuple(logits.shape) if isinstance(logits, torch.Tensor) else None}"
            raise UnsupportedError(
                field="model", value=name,
                problem=f"head(cached input) does not reproduce the model's logits ({shapes}): the model's forward "
                        "does more after the head (e.g. GPT-2 scores every token, then picks the last one)",
                fix="train the linear probe end to end (no feature cache)")
        if x.dim() > 2 and self.first_position_only is not False:
            first = x[:, :1]
            if torch.equal(self.head_module()(first), logits):
                self.first_position_only = True
                x = first
            else:
                per_example = x[0].numel() * x.element_size()
                raise UnsupportedError(
                    field="model", value=name,
                    problem=f"the head reads a whole sequence {tuple(x.shape[1:])} and more than its first position; "
                            f"caching it would take {per_example:,} bytes per example (padded to each batch)",
                    fix="train the linear probe end to end (no feature cache)")
        elif x.dim() <= 2:
            self.first_position_only = False
        if labels is not None:
            mine = _loss(logits, labels, self.config)
            theirs = getattr(out, "loss", None)
            if theirs is None or not torch.equal(mine, theirs):
                raise UnsupportedError(
                    field="model", value=name,
                    problem="the model's loss differs from the standard sequence-classification loss on the same "
                            f"logits ({None if theirs is None else float(theirs)} vs {float(mine)})",
                    fix="train the linear probe end to end (no feature cache)")
        return x

    def _require_train_mode_equal(self, batch: dict, x: torch.Tensor, calls: list) -> None:
        """Refuse when the frozen part feeds the head differently in train mode (see the module docstring)."""
        model = self.model
        devices = [model_device.index or 0] if (model_device := x.device).type == "cuda" else []
        buffers = {name: b.clone() for name, b in model.named_buffers()}  # batch-norm statistics would move
        seen = []
        try:
            with torch.random.fork_rng(devices=devices):  # dropout draws must not shift the run's RNG stream
                model.train()
                for _ in range(2):
                    calls.clear()
                    model(**batch)
                    seen.append(self._head_input(calls))
        finally:
            model.eval()
            own = dict(model.named_buffers())
            for name, value in buffers.items():
                own[name].copy_(value)
        if not all(s.shape == x.shape and torch.equal(s, x) for s in seen):
            raise UnsupportedError(
                field="encoder_mode", value="match",
                problem=f"{type(model).__name__} feeds its head different inputs in train mode than in eval mode "
                        "(dropout, batch-norm statistics or augmentation in the frozen part), so the end-to-end "
                        "probe trains on features that change every epoch and a cache would train something else",
                fix="pass encoder_mode='eval' to probe the fixed eval-mode feature map (dropout off), load the model "
                    "with its dropout set to 0 (e.g. hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0), "
                    "or train the linear probe end to end")


def _single_head(model: nn.Module) -> str:
    """The one top-level child holding every trainable parameter, shared with nothing outside it."""
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    held = {name: {id(p) for p in child.parameters() if p.requires_grad} for name, child in model.named_children()}
    holders = [name for name, ids in held.items() if ids]
    tied = [name for name in holders if any(held[name] & held[other] for other in holders if other != name)]
    if tied:
        raise UnsupportedError(
            field="model", value=f"{type(model).__name__}: {tied}",
            problem="the head shares trained weights with the rest of the model (e.g. an LM head tied to the input "
                    "embeddings), so the 'frozen' features would change as it trains",
            fix="train the linear probe end to end (no feature cache)")
    if len(holders) != 1 or trainable - held[holders[0]]:
        raise UnsupportedError(
            field="model", value=type(model).__name__,
            problem=f"its trainable parameters live in {len(holders)} top-level modules {holders}"
                    f"{' and on the model itself' if holders and trainable - held[holders[0]] else ''}; a cached "
                    "input can feed one head module, not code that runs between several (e.g. DistilBERT's "
                    "pre_classifier -> ReLU -> classifier)",
            fix="train the linear probe end to end (no feature cache)")
    return holders[0]


def _loss(logits: torch.Tensor, labels: torch.Tensor, config) -> torch.Tensor:
    """transformers' own sequence-classification loss (cross-entropy, MSE for regression, BCE multi-label)."""
    from transformers.loss.loss_utils import ForSequenceClassificationLoss
    return ForSequenceClassificationLoss(labels, logits, config)


def _to(batch: Any, device: torch.device) -> dict:
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in dict(batch).items()}


def main(argv: list[str] | None = None) -> dict:
    """recipes/classify.py with ``--feature-cache eval|match|off``: its first ``accelerator.prepare(model, optimizer,
    train, validation)`` of a linear probe gets the probe and cached loaders instead; metrics.json gains
    ``feature_cache`` (used, or why not)."""
    import accelerate

    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--feature-cache", choices=[*ENCODER_MODES, "off"], default="eval")
    parser.add_argument("--recipe", type=Path, default=ROOT / "recipes" / "classify.py")
    known, rest = parser.parse_known_args(argv)
    out = argparse.ArgumentParser(add_help=False)
    out.add_argument("--output-dir", type=Path)
    output_dir = out.parse_known_args(rest)[0].output_dir
    spec = importlib.util.spec_from_file_location("classify", known.recipe)
    classify = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(classify)
    report, original = {"used": False}, accelerate.Accelerator.prepare

    def prepare(self, *objects, **kwargs):
        model = objects[0] if objects else None
        if len(objects) == 4 and "reason" not in report and not report["used"] and \
                getattr(strategy_of(model), "name", None) == "linear_probe":
            _, optimizer, train, val = objects
            if known.feature_cache == "off":
                report["reason"] = "--feature-cache off"
            else:
                try:
                    probe = CachedProbe(model, encoder_mode=known.feature_cache)
                    seed = getattr(train.batch_sampler, "seed", 0)
                    objects = (probe, optimizer, probe.loader(train, shuffle=True, seed=seed),
                               probe.loader(val, shuffle=False))
                    report.update(used=True, **probe.report())
                except UnsupportedError as err:
                    if known.feature_cache == "eval":  # asked for explicitly: refuse rather than run something else
                        raise
                    report["reason"] = str(err)
        return original(self, *objects, **kwargs)

    accelerate.Accelerator.prepare = prepare
    try:
        results = classify.main(rest)
    finally:
        accelerate.Accelerator.prepare = original
    results["feature_cache"] = report
    path = output_dir and output_dir.expanduser() / "metrics.json"
    if path and path.is_file():  # the recipe wrote it: add the cache's record, atomically
        written = {**json.loads(path.read_text()), "feature_cache": report}
        (tmp := path.with_name(f".metrics.json.tmp-{os.getpid()}")).write_text(json.dumps(written, indent=2))
        os.replace(tmp, path)
    return results


if __name__ == "__main__":
    main()
