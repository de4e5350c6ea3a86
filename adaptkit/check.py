"""``adaptkit.check``: model x strategy x options x quantization x processes, validated from the config alone.

Options are resolved field by field and each target matched on its own, so one call reports every problem
(docs/check-and-estimate.md lists what it covers).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import os
from typing import Any

import torch
from torch import nn

from adaptkit import lengths, placement, strategies, targets, versions
from adaptkit.core import adapt, resolve, summary
from adaptkit.errors import (AdaptkitError, ConfigError, ConfigErrors, ConfigTypeError, MissingDependencyError,
                             ProcessCountError, UnsupportedError)
from adaptkit.names import CLASSIFICATION_TASKS, CPU_LAUNCH, QUANTIZATIONS
from adaptkit.skeleton import Skeleton, describe, skeleton, task_of_class


@dataclasses.dataclass
class CheckReport:
    """What ``check`` found. ``problems`` is empty when the combination can run."""

    model: str
    model_class: str | None = None
    task: str | None = None
    strategy: Any = None              # the resolved Strategy, or None when it could not be resolved
    quantization: str | None = None
    processes: int = 1
    trainable: int | None = None      # counted on the adapted skeleton
    total: int | None = None
    problems: list[AdaptkitError] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def __str__(self) -> str:
        name = getattr(self.strategy, "name", None) or "?"
        lines = [f"model {self.model} -> {self.model_class or '?'} (task {self.task or '?'}); strategy {name}; "
                 f"quantization {self.quantization or 'none'}; processes {self.processes}"]
        if self.trainable is not None and self.total:
            lines.append(f"trainable {self.trainable:,} / {self.total:,} ({100 * self.trainable / self.total:.2f}%)")
        lines += [f"note: {n}" for n in self.notes]
        problems = [f"  - [{type(p).__name__}] {p}" for p in self.problems]
        lines += [f"{len(problems)} problem(s):", *problems] if problems else ["OK: no problems found"]
        return "\n".join(lines)


def check(model: Any, strategy: Any = "lora", *, options: dict[str, Any] | None = None, task: str = "auto",
          num_labels: int | None = None, quantization: str | None = None, processes: int = 1,
          gradient_checkpointing: bool = False, world_size: int | None = None, max_length: int | None = None,
          raise_on_error: bool = True) -> CheckReport:
    """Every problem of this training setup at once (ConfigErrors, or in the report with ``raise_on_error=False``).
    ``model``: a folder, a hub id, a config or a loaded model. ``world_size``: processes the launcher started
    (default: ``WORLD_SIZE``). ``max_length``: tokens per example, virtual tokens counted."""
    report = CheckReport(model=describe(model), quantization=quantization, processes=processes)
    add = report.problems.append
    sk = _skeleton(model, task, num_labels, report)
    config = _resolve(strategy, dict(options or {}), report)
    _check_quantization(quantization, config or _strategy_class(strategy), report)
    _check_processes(processes, world_size, report)
    if sk is not None:
        _check_padding(sk, report)
        base = sk.build()
        if gradient_checkpointing and not getattr(base, "supports_gradient_checkpointing", False):
            add(UnsupportedError("gradient_checkpointing", True, f"{sk.model_class.__name__} does not support it",
                                 "train without it (smaller batches instead)"))
            gradient_checkpointing = False
        if _check_targets(_named_targets(config, strategy, options or {}), base, report) and config is not None:
            _dry_run(sk, config, gradient_checkpointing, report)
        _check_length(base, config, max_length, report)
    if untested := versions.untested():  # a problem above may be the installed version's, not the architecture's: say which differ
        report.notes.append(f"installed versions outside the tested set: {versions.describe(*untested)} "
                            "(pip install -r requirements.lock gives the tested set)")
    if raise_on_error and report.problems:
        error = ConfigErrors(report.problems)
        error.report = report
        raise error
    return report


def _skeleton(model: Any, task: str, num_labels: Any, report: CheckReport) -> Skeleton | None:
    add = report.problems.append
    try:
        sk = skeleton(model, task)
    except AdaptkitError as exc:
        return add(exc)
    report.model_class, report.task, config = sk.model_class.__name__, sk.task, sk.config
    # a checkpoint that ships a trained classification head has a label count
    trained = next((int(config.num_labels) for a in getattr(config, "architectures", None) or []
                    if task_of_class(a, config) in CLASSIFICATION_TASKS), None)
    if num_labels is None:
        return sk
    if not isinstance(num_labels, int) or isinstance(num_labels, bool):
        add(ConfigTypeError("num_labels", num_labels, "expected an int", "pass e.g. 2"))
    elif num_labels < 1:
        add(ConfigError("num_labels", num_labels, "must be at least 1", "use 2 for binary classification"))
    elif sk.task not in CLASSIFICATION_TASKS:
        add(ConfigError("num_labels", num_labels, f"has no meaning for task {sk.task!r}", "drop num_labels"))
    elif trained is not None and trained != num_labels:
        add(ConfigError("num_labels", num_labels, f"the checkpoint's {config.architectures[0]} head has {trained} "
                        "labels", f"use num_labels={trained}, or ignore_mismatched_sizes=True for a new head"))
    else:
        sk.config.num_labels = num_labels
    return sk


def _resolve(strategy: Any, options: dict[str, Any], report: CheckReport):
    """The Strategy, with every bad option reported (not only the first one the constructor meets)."""
    add = report.problems.append
    cls = _strategy_class(strategy) if isinstance(strategy, str) else None
    if cls is not None and cls.name != "peft" and options:  # PEFT's options are checked by PEFT's config
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = {k: v for k, v in options.items() if k not in known}
        found = len(report.problems)
        if unknown:
            _collect(lambda: cls.from_dict(unknown), add)
        for key in sorted(set(options) & known):
            _collect(lambda key=key: cls(**{key: options[key]}), add)
        if len(report.problems) > found:
            return None
    try:
        report.strategy = resolve(strategy, **options)
    except AdaptkitError as exc:
        add(exc)
    except TypeError as exc:  # e.g. a PEFT config that rejects an option
        add(ConfigTypeError("options", sorted(options), str(exc), "check the option names and types"))
    return report.strategy


def _strategy_class(strategy: Any):
    """The strategy's class even when its options are wrong, so its other limits are still checked."""
    if isinstance(strategy, str):
        return strategies.REGISTRY.get(strategy.strip().lower().replace("-", "_"))
    return type(strategy) if isinstance(strategy, strategies.Strategy) else None


def _collect(call, add) -> None:
    try:
        call()
    except AdaptkitError as exc:
        add(exc)


def _check_padding(sk: Skeleton, report: CheckReport) -> None:
    """Decoder classifiers (GPT-2, Llama, ...) pool the last non-padding token: they need pad_token_id."""
    if sk.task != "seq_cls" or getattr(sk.config, "pad_token_id", None) is not None:
        return
    try:
        reads_pad = "pad_token_id" in inspect.getsource(sk.model_class.forward)
    except (OSError, TypeError):
        reads_pad = False
    if reads_pad:
        report.problems.append(ConfigError("config.pad_token_id", None, f"{sk.model_class.__name__} finds the last "
                                           "token through it: batches > 1 fail", "set model.config.pad_token_id"))


def quantization_of(value: Any) -> str | None:
    """None for "none", "" or None; the name when adaptkit knows it; else a ConfigError (check and estimate)."""
    if value in ("none", "", None):
        return None
    if value not in QUANTIZATIONS:
        raise ConfigError("quantization", value, "is not a quantization adaptkit knows",
                          f"choose 'none' or one of {list(QUANTIZATIONS)}")
    return value


def _check_quantization(quantization: Any, config, report: CheckReport) -> None:
    add = report.problems.append
    try:
        quantization = report.quantization = quantization_of(quantization)
    except ConfigError as exc:
        return add(exc)
    if quantization and importlib.util.find_spec("bitsandbytes") is None:
        add(MissingDependencyError("quantization", quantization, "needs bitsandbytes, which is not installed",
                                   "pip install 'adaptkit[bitsandbytes]'"))
    if quantization and config is not None and not config.supports_quantized:
        add(UnsupportedError("strategy", f"{config.name} on a {quantization} model", "quantized weights cannot "
                             "train", "drop the quantization, or use 'lora'"))


def _check_processes(processes: Any, world_size: int | None, report: CheckReport) -> None:
    add = report.problems.append
    if not isinstance(processes, int) or isinstance(processes, bool) or processes < 1:
        return add(ConfigTypeError("processes", processes, "expected an int >= 1", "pass e.g. 1 or 2"))
    gpu = torch.cuda.is_available()
    available = torch.cuda.device_count() if gpu else len(os.sched_getaffinity(0))
    if processes > available:
        add(ProcessCountError("processes", processes, f"this machine has {available} "
                              f"{'GPU(s)' if gpu else 'CPU core(s)'}; each process needs one", f"use <= {available}"))
    launch = ("accelerate launch --num_processes {n} <script> ..." if gpu else CPU_LAUNCH).format(n=processes)
    world_size = placement.launched_world_size() if world_size is None else world_size
    if world_size is not None and world_size != processes:
        add(ProcessCountError("processes", processes, f"the launcher started {world_size} process(es)",
                              f"launch with {launch}"))
    elif world_size is None and processes > 1:
        report.notes.append(f"not running under a launcher now; start the run with {launch}")


_TARGET_FIELDS = ("targets", "heads", "target_modules", "modules_to_save")


def _named_targets(config, strategy: Any, options: dict[str, Any]) -> dict[str, list[str] | str]:
    """Every option naming modules, by field (the raw options when the strategy could not be resolved)."""
    if config is not None:
        label = getattr(config, "method", None) or type(config).__name__
        values = {**vars(config), **(getattr(config, "options", None) or {})}
    else:
        label, values = "options", options
    names = lambda v: isinstance(v, (list, tuple)) and all(isinstance(n, str) for n in v)  # noqa: E731
    # one string is a regex full-matched against whole names, as in PEFT
    return {f"{label}.{key}": list(values[key]) if names(values[key]) else values[key] for key in _TARGET_FIELDS
            if names(values.get(key)) or (key in ("targets", "target_modules") and isinstance(values.get(key), str))}


def _check_targets(named: dict[str, list[str] | str], base: nn.Module, report: CheckReport) -> bool:
    """Match each target name on its own, so every unmatched name is reported. True if all match."""
    found, candidates = len(report.problems), targets.linear_names(base)
    for field, names in named.items():
        for name in [names] if isinstance(names, str) else names:  # one string: a regex, as PEFT reads it
            _collect(lambda name=name, field=field: targets.match_regex(base, name, field) if isinstance(names, str)
                     else targets.match_targets(base, [name], field, candidates if field.endswith("targets") else None),
                     report.problems.append)
    return len(report.problems) == found


def _check_length(base: nn.Module, config, max_length: Any, report: CheckReport) -> None:
    """Sequence length + virtual tokens against the model's position table (a longer input crashes)."""
    limit, extra = lengths.max_positions(base), lengths.virtual_tokens(config) if config is not None else 0
    if max_length is not None:
        if not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 1:
            return report.problems.append(ConfigError("max_length", max_length, "must be a positive int", "e.g. 128"))
        if error := lengths.length_error(base, max_length, config):
            report.problems.append(error)
    elif limit is not None and 0 < extra < limit:  # extra >= limit: adapt refuses it (the dry run reports it)
        report.notes.append(f"{extra} virtual tokens take positions: sequences must be <= {limit - extra} tokens "
                            f"(the model has {limit}); pass max_length to check yours")


def _dry_run(sk: Skeleton, config, gradient_checkpointing: bool, report: CheckReport) -> None:
    """Apply the strategy to a weightless model, as adaptkit.adapt would to the real one."""
    model = sk.build()
    if gradient_checkpointing:
        model.gradient_checkpointing_enable()
    try:
        adapted = adapt(model, config)
    except AdaptkitError as exc:
        return report.problems.append(exc)
    except Exception as exc:  # a library refusing the combination: report it, typed, with its words
        return report.problems.append(UnsupportedError("strategy", f"{config.name} on {sk.model_class.__name__}",
                                                       f"applying it fails: {type(exc).__name__}: {exc}",
                                                       "choose another strategy or other options"))
    counts = summary(adapted)
    report.total, report.trainable = counts.total, counts.trainable
    if report.trainable == 0:
        report.problems.append(UnsupportedError("strategy", config.name, f"leaves 0 trainable parameters on "
                                                f"{sk.model_class.__name__}", "name targets or heads that exist"))


__all__ = ["check", "CheckReport"]
