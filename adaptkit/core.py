"""The public calls: adapt, summary, save, load, merge, and named adapters on one base.

Everything strategy-specific lives in ``adaptkit/strategies/<name>.py``; this module only resolves
the user's input to a Strategy, checks that the combination can work, and marks the model so a
second ``adapt`` is refused instead of silently stacking adapters.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from adaptkit import strategies, targets
from adaptkit.errors import (AdapterFormatError, AlreadyAdaptedError, ConfigError, ConfigTypeError,
                             NotAdaptedError, UnsupportedError)
from adaptkit.strategies.base import CONFIG_NAME, MARKER, PeftStrategy, Strategy, trained_tensors, write_config

FORMAT = "adaptkit-adapter/1"
_FILE_KEYS = {"format", "adaptkit_version", "base_model", "strategy"}


# ---- resolving what the user asked for -------------------------------------------------------------
def resolve(strategy: Any, **options: Any) -> Strategy:
    """A Strategy from a name (+ options), a Strategy object, a dict, or a peft.PeftConfig."""
    from peft import PeftConfig

    from adaptkit.strategies.peft_method import PeftMethod, peft_method_names

    if isinstance(strategy, Strategy):
        if options:
            return dataclasses.replace(strategy, **options)
        return strategy
    if isinstance(strategy, PeftConfig):
        if options:
            raise ConfigError(field="options", value=sorted(options), problem="given beside a PeftConfig",
                              fix="set them on the PeftConfig itself")
        return PeftMethod.from_peft_config(strategy)
    if isinstance(strategy, dict):
        data = {**strategy, **options}
        return strategies.get(str(data.get("strategy"))).from_dict(data)
    if isinstance(strategy, str):
        name = strategy.strip().lower().replace("-", "_")
        if name in strategies.REGISTRY and name != "peft":
            return strategies.get(name).from_dict(options)
        if name in peft_method_names():
            return PeftMethod(method=name, options=options)
        strategies.get(name)  # raises UnknownStrategyError with "did you mean"
    raise ConfigTypeError(field="strategy", value=strategy,
                          problem=f"expected a name, a strategy config or a peft.PeftConfig, got {type(strategy).__name__}",
                          fix=f"pass one of {sorted(strategies.REGISTRY)} or e.g. adaptkit.LoRA(r=8)")


def strategy_of(model: nn.Module) -> Strategy | None:
    """The strategy ``adapt``/``load`` applied to this model, or None for a plain model."""
    return model.__dict__.get(MARKER)


def is_quantized(model: nn.Module) -> str | None:
    """'8bit' / '4bit' when bitsandbytes quantized this model, else None."""
    inner = _unwrap(model)
    if getattr(inner, "is_loaded_in_8bit", False):
        return "8bit"
    if getattr(inner, "is_loaded_in_4bit", False):
        return "4bit"
    quant = getattr(getattr(inner, "config", None), "quantization_config", None)
    if quant is not None:
        get = quant.get if isinstance(quant, dict) else lambda k, d=None: getattr(quant, k, d)
        if get("load_in_8bit", False):
            return "8bit"
        if get("load_in_4bit", False):
            return "4bit"
    return None


def _unwrap(model: nn.Module) -> nn.Module:
    from peft import PeftModel
    return model.get_base_model() if isinstance(model, PeftModel) else model


def _refuse_if_adapted(model: nn.Module) -> None:
    from peft import PeftModel
    applied = strategy_of(model)
    if applied is not None or isinstance(model, PeftModel) or hasattr(model, "peft_config"):
        what = applied.name if applied is not None else "a PEFT adapter"
        raise AlreadyAdaptedError(
            field="model", value=f"{type(model).__name__} already adapted with {what}",
            problem="adapting twice would stack strategies silently",
            fix="start from a freshly loaded base model, or use adaptkit.add_adapter(model, name, strategy) "
                "for a second named adapter")


def _mark(model: nn.Module, strategy: Strategy, *also: nn.Module) -> nn.Module:
    for m in (model, *also):
        m.__dict__[MARKER] = strategy  # plain attribute, not a submodule/parameter/buffer
    return model


# ---- the public calls ------------------------------------------------------------------------------
def adapt(model: nn.Module, strategy: Any = "lora", **options: Any) -> nn.Module:
    """Turn a loaded model into a LoRA / bottleneck / prefix / linear-probe / fully fine-tuned model.

    ``strategy`` is a name (``"lora"``, ``"ia3"``...), a config (``adaptkit.LoRA(r=16)``) or a
    ``peft.PeftConfig``; ``options`` are that strategy's fields. Returns the model to train.
    """
    if not isinstance(model, nn.Module):
        raise ConfigTypeError(field="model", value=type(model).__name__, problem="is not a torch model",
                              fix="pass a loaded transformers model, e.g. AutoModelForSequenceClassification.from_pretrained(...)")
    config = resolve(strategy, **options)
    _refuse_if_adapted(model)
    quant = is_quantized(model)
    if quant and not config.supports_quantized:
        raise UnsupportedError(field="strategy", value=f"{config.name} on a {quant} model",
                               problem="quantized weights cannot take gradient steps",
                               fix="load the model without quantization for 'full', or use 'lora' on the quantized model")
    if quant:
        # models users quantized themselves get the same protection as adaptkit.load_model's:
        # a quantized head refused with the fix, no fp32 upcast, no 4-bit CPU inference repack
        from adaptkit.quantization import prepare_kbit
        prepare_kbit(model)
    adapted = config.apply(model)
    return _mark(adapted, config, model)


@dataclasses.dataclass
class Summary:
    strategy: str | None
    trainable: int
    total: int
    adapter_bytes: int     # bytes of tensors adaptkit.save writes (safetensors payload, without headers)
    footprint_bytes: int   # bytes the model's parameters and buffers take in memory now
    fp32_bytes: int        # the same model with every parameter in fp32 (compare with a quantized footprint)

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "percent": round(self.percent, 4)}

    def __str__(self) -> str:
        return (f"{self.strategy or 'not adapted'}: trainable {self.trainable:,} / {self.total:,} "
                f"({self.percent:.2f}%), adapter {self.adapter_bytes / 1e6:.2f} MB, "
                f"in memory {self.footprint_bytes / 1e6:.1f} MB (fp32: {self.fp32_bytes / 1e6:.1f} MB)")


def summary(model: nn.Module) -> Summary:
    """Trainable / total parameters, % trainable, adapter size on disk, memory footprint."""
    strategy = strategy_of(model)
    params = {id(p): p for p in model.parameters()}.values()
    total = sum(targets.numel(p) for p in params)
    trainable = sum(targets.numel(p) for p in params if p.requires_grad)
    if strategy is not None and not strategy.freezes_base:
        adapter_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    else:
        adapter_bytes = sum(t.numel() * t.element_size() for t in trained_tensors(model).values())
    footprint = sum(p.numel() * p.element_size() for p in params)
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    if is_quantized(model):  # bitsandbytes keeps scales/statistics as attributes, not parameters/buffers
        from adaptkit.quantization import quantization_report
        footprint += quantization_report(model)["state_bytes"]
    return Summary(strategy.label if strategy else None, trainable, total, adapter_bytes, footprint + buffers,
                   4 * total + buffers)


def save(model: nn.Module, directory: str | Path) -> Path:
    """Write only what the strategy trained (+ the task head) as safetensors, atomically.

    The folder is built under a temporary name beside the target and renamed into place, so a crash
    never leaves a half-written adapter; an existing adaptkit folder there is replaced.
    """
    strategy = strategy_of(model)
    if strategy is None:
        raise NotAdaptedError(field="model", value=type(model).__name__, problem="was not adapted by adaptkit",
                              fix="call adaptkit.adapt(model, strategy) first (or save a plain model with save_pretrained)")
    directory = Path(directory)
    if directory.exists() and not (directory.is_dir() and (not any(directory.iterdir())
                                                           or (directory / CONFIG_NAME).is_file())):
        raise ConfigError(field="directory", value=str(directory),
                          problem="exists and is not an adaptkit folder; refusing to overwrite it",
                          fix="choose a new or empty folder")
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        strategy.save(model, tmp)
        base = _unwrap(model)
        write_config({"format": FORMAT, "adaptkit_version": _version(),
                      "base_model": getattr(getattr(base, "config", None), "name_or_path", None) or None,
                      "strategy": strategy.to_dict()}, tmp / CONFIG_NAME)
        replace_dir(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def replace_dir(src: Path, dst: Path) -> None:
    """Move the finished folder ``src`` to ``dst``. An old ``dst`` is swapped out in one atomic step where
    the OS can (Linux renameat2 RENAME_EXCHANGE), so ``dst`` is never missing, even if the process dies
    here; elsewhere it is moved aside first, then deleted."""
    if dst.exists() and _exchange(src, dst):
        shutil.rmtree(src, ignore_errors=True)  # ``src`` now holds the old folder
        return
    old = None
    if dst.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old-", dir=dst.parent))
        dst.rename(old / "previous")
    src.rename(dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux >= 3.15); False where the call or the filesystem cannot."""
    import ctypes
    import os
    import sys
    if not sys.platform.startswith("linux"):
        return False
    rename = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    at_fdcwd, rename_exchange = -100, 2
    return rename is not None and rename(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def read_config(directory: Path) -> Strategy:
    """Read and validate ``adaptkit_config.json``: unknown keys or wrong types raise, nothing executes."""
    path = directory / CONFIG_NAME
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise AdapterFormatError(field=str(path), value=type(exc).__name__, problem=f"cannot be read: {exc}",
                                 fix="pass a folder written by adaptkit.save") from None
    if not isinstance(data, dict) or set(data) - _FILE_KEYS or data.get("format") != FORMAT:
        raise AdapterFormatError(field=str(path), value=sorted(data) if isinstance(data, dict) else data,
                                 problem=f"is not an {FORMAT} file",
                                 fix="pass a folder written by adaptkit.save of this version")
    spec = data.get("strategy")
    if not isinstance(spec, dict):
        raise AdapterFormatError(field=f"{path}:strategy", value=spec, problem="must be an object",
                                 fix="re-save the adapter with adaptkit.save")
    return strategies.get(str(spec.get("strategy"))).from_dict(spec)


def load(directory: str | Path, base_model: nn.Module, trainable: bool = False) -> nn.Module:
    """Rebuild an adapted model from ``adaptkit.save``'s folder (or any PEFT adapter folder).

    ``base_model`` must be a freshly loaded copy of the model that was adapted. With
    ``trainable=True`` the loaded adapter keeps training (PEFT loads adapters frozen by default).
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise AdapterFormatError(field="directory", value=str(directory), problem="is not a folder",
                                 fix="pass the folder written by adaptkit.save")
    _refuse_if_adapted(base_model)
    if (directory / CONFIG_NAME).is_file():
        strategy = read_config(directory)
    elif (directory / "adapter_config.json").is_file():  # a plain PEFT folder
        from peft import PeftConfig

        from adaptkit.strategies.peft_method import PeftMethod
        strategy = PeftMethod.from_peft_config(PeftConfig.from_pretrained(str(directory)))
    else:
        raise AdapterFormatError(field="directory", value=str(directory),
                                 problem=f"holds neither {CONFIG_NAME} nor adapter_config.json",
                                 fix="pass the folder written by adaptkit.save")
    _check_weights(directory, base_model)
    try:
        if isinstance(strategy, PeftStrategy):
            model = strategy.load(directory, base_model, trainable=trainable)
        else:
            model = strategy.load(directory, base_model)
            if not trainable:
                model.requires_grad_(False)
    except RuntimeError as exc:  # torch's load_state_dict shape error, typed
        if "size mismatch" not in str(exc):
            raise
        first = next(line.strip() for line in str(exc).splitlines() if "size mismatch" in line)
        raise AdapterFormatError(field=str(directory), value=type(base_model).__name__,
                                 problem=f"the saved tensors do not fit this base model ({first})",
                                 fix="load onto the same base model that was adapted (same checkpoint, num_labels)"
                                 ) from None
    return _mark(model, strategy, base_model)


def _check_weights(directory: Path, base_model: nn.Module) -> None:
    """Safetensors only (never unpickle), and a saved task head must fit the base's (num_labels)."""
    from safetensors import safe_open

    from adaptkit.strategies.base import WEIGHTS_NAME
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        pickled = sorted(p.name for p in directory.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl", ".ckpt"))
        raise AdapterFormatError(field="directory", value=str(directory), problem=f"has no {WEIGHTS_NAME}" + (
            f"; it holds pickle files {pickled}, which adaptkit never loads (unpickling can run code)" if pickled
            else ""), fix="save adapters as safetensors (adaptkit.save does; PEFT: safe_serialization=True)")
    with safe_open(str(weights), "pt") as f:
        saved = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    base = _unwrap(base_model)
    for head in targets.new_head_names(base):
        for name, p in getattr(base, head).named_parameters():
            key = f"{head}.{name}"
            match = next((k for k in saved if k == key or k.endswith("." + key)), None)
            if match is not None and saved[match] != tuple(p.shape):
                raise AdapterFormatError(
                    field=f"{weights.name}:{match}", value=saved[match],
                    problem=f"the saved task head does not fit this base model's {key} {tuple(p.shape)} "
                            "(trained with another num_labels?)",
                    fix="load the base model with the num_labels the adapter was trained with")


def merge(model: nn.Module) -> nn.Module:
    """Fold the trained pieces into the base weights; return a plain transformers model."""
    strategy = strategy_of(model)
    if strategy is None:
        raise NotAdaptedError(field="model", value=type(model).__name__, problem="was not adapted by adaptkit",
                              fix="nothing to merge; use the model as it is")
    merged = strategy.merge(model)
    for m in (model, merged):
        m.__dict__.pop(MARKER, None)
    return merged


# ---- several named adapters on one base (PEFT strategies) -------------------------------------------
def add_adapter(model: nn.Module, name: str, strategy: Any = "lora", **options: Any) -> nn.Module:
    """Add a second (third, ...) named adapter to a PEFT-adapted model; it becomes active."""
    config = resolve(strategy, **options)
    existing = strategy_of(model)
    if not isinstance(existing, PeftStrategy) or not isinstance(config, PeftStrategy):
        raise UnsupportedError(field="strategy", value=f"{getattr(existing, 'name', None)} + {config.name}",
                               problem="named adapters need a PEFT-backed strategy on both sides",
                               fix="use 'lora' (or another PEFT method) for every adapter sharing a base")
    if name in model.peft_config:
        raise ConfigError(field="name", value=name, problem="is already an adapter of this model",
                          fix=f"pick a new name; existing: {sorted(model.peft_config)}")
    model.add_adapter(name, config.peft_config(model.get_base_model()))
    model.set_adapter(name)
    return model


def set_adapter(model: nn.Module, name: str) -> nn.Module:
    """Make ``name`` the active adapter (its task head comes with it)."""
    names = sorted(getattr(model, "peft_config", {}) or {})
    if name not in names:
        raise ConfigError(field="name", value=name, problem="is not an adapter of this model",
                          fix=f"choose one of {names}")
    model.set_adapter(name)
    return model


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("adaptkit")
    except PackageNotFoundError:
        return "unknown"
