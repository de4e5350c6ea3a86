"""The public calls: adapt, summary, save, load, merge, and named adapters on one base. What is strategy-specific
lives in ``adaptkit/strategies/<name>.py``; here each argument is checked once and the model is marked, so a
second ``adapt`` is refused instead of silently stacking adapters."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from peft import PeftConfig, PeftModel
from torch import nn

from adaptkit import compat, folders, hf, layout, strategies, targets
from adaptkit.errors import (AdapterFormatError, AlreadyAdaptedError, ConfigError, ConfigTypeError, NotAdaptedError,
                             UnsupportedError)
from adaptkit.names import CONFIG_NAME, MARKER, OWNED
from adaptkit.precision import fp32_modules, fp32_new_heads, keep_trainable_fp32
from adaptkit.quantization import prepare_kbit, quantization_report
from adaptkit.strategies.base import PeftStrategy, Strategy
from adaptkit.strategies.peft_method import PeftMethod, peft_method_names


def _model(model: Any, field: str = "model") -> nn.Module:
    if not isinstance(model, nn.Module):
        raise ConfigTypeError(field, type(model).__name__, "is not a torch model", "pass a transformers model")
    return model


def _adapted(model: Any) -> Strategy:
    if (strategy := strategy_of(_model(model))) is None:
        raise NotAdaptedError("model", type(model).__name__, "was not adapted by adaptkit", "adaptkit.adapt it first")
    return strategy


# ---- resolving what the user asked for -------------------------------------------------------------
def resolve(strategy: Any, model: nn.Module | None = None, **options: Any) -> Strategy:
    """A Strategy from a name (+ options), a Strategy object, a dict, or a peft.PeftConfig (whose task type
    must be the model's, when one is given)."""
    if isinstance(strategy, Strategy):
        return dataclasses.replace(strategy, **options) if options else strategy
    if isinstance(strategy, PeftConfig):
        if options:
            raise ConfigError("options", sorted(options), "given beside a PeftConfig", "set them on the PeftConfig")
        layout.check_task_type(f"{type(strategy).__name__}.task_type", strategy, model, ConfigError)
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
    raise ConfigTypeError("strategy", strategy, "expected a name, a strategy or a peft.PeftConfig, got "
                          f"{type(strategy).__name__}", f"pass one of {sorted(strategies.REGISTRY)} or LoRA()")


def strategy_of(model: nn.Module) -> Strategy | None:
    """The strategy ``adapt``/``load`` applied to this model, or None for a plain model."""
    return getattr(model, "__dict__", {}).get(MARKER)


def is_quantized(model: nn.Module) -> str | None:
    """'8bit' / '4bit' when bitsandbytes quantized this model, else None."""
    inner = layout.unwrap(model)
    quant = getattr(getattr(inner, "config", None), "quantization_config", None)
    get = quant.get if isinstance(quant, dict) else lambda k, d=None: getattr(quant, k, d)
    for bits in ("8bit", "4bit"):
        if getattr(inner, f"is_loaded_in_{bits}", False) or (quant is not None and get(f"load_in_{bits}", False)):
            return bits
    return None


def _refuse_if_adapted(model: nn.Module, field: str = "model") -> None:
    applied = strategy_of(model)
    if applied is not None or isinstance(model, PeftModel) or hasattr(model, "peft_config"):
        what = applied.name if applied is not None else "a PEFT adapter"
        raise AlreadyAdaptedError(field, f"{type(model).__name__} already adapted with {what}", "strategies would "
                                  "stack", "start from a freshly loaded base model, or use adaptkit.add_adapter")


def _mark(model: nn.Module, strategy: Strategy, *also: nn.Module) -> nn.Module:
    for m in (model, *also):
        m.__dict__[MARKER] = strategy  # plain attribute, not a submodule/parameter/buffer
    compat.bridge(model)  # PEFT 0.21.2 workarounds, per instance: any PEFT prefix_tuning config, disable_adapter
    hf.install(model)  # its save_pretrained (the Trainer's way of saving) writes the adapter folder
    return model


# ---- the public calls ------------------------------------------------------------------------------
def adapt(model: nn.Module, strategy: Any = "lora", **options: Any) -> nn.Module:
    """Turn a loaded model into the model to train: ``strategy`` is a name (``"lora"``, ``"ia3"``...), a config
    (``adaptkit.LoRA(r=16)``) or a ``peft.PeftConfig``; ``options`` are that strategy's fields."""
    config = resolve(strategy, _model(model), **options)
    _refuse_if_adapted(model)
    quant = is_quantized(model)
    if quant and not config.supports_quantized:
        raise UnsupportedError("strategy", f"{config.name} on a {quant} model", "quantized weights cannot train",
                               "load the model unquantized, or use 'lora'")
    if quant:  # a model quantized by hand gets adaptkit.load_model's protection: no fp32 upcast, no 4-bit repack
        prepare_kbit(model)
    if config.freezes_base:  # bf16/fp16 base: what trains is kept fp32 (adaptkit/precision.py says why)
        fp32_new_heads(model)
    adapted = config.apply(model)
    if config.freezes_base:
        keep_trainable_fp32(adapted)
    if not isinstance(config, PeftStrategy):
        adapted.__dict__[OWNED] = [n for n, p in adapted.named_parameters() if p.requires_grad]
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

    def __str__(self) -> str:
        return (f"{self.strategy or 'not adapted'}: trainable {self.trainable:,} / {self.total:,} "
                f"({self.percent:.2f}%), adapter {self.adapter_bytes / 1e6:.2f} MB, "
                f"in memory {self.footprint_bytes / 1e6:.1f} MB (fp32: {self.fp32_bytes / 1e6:.1f} MB)")


def summary(model: nn.Module) -> Summary:
    """Trainable / total parameters, % trainable, adapter size on disk, memory footprint."""
    strategy = strategy_of(_model(model))
    params = {id(p): p for p in model.parameters()}.values()
    total = sum(targets.numel(p) for p in params)
    trainable = sum(targets.numel(p) for p in params if p.requires_grad)
    if strategy is not None and not strategy.freezes_base:
        adapter_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    else:  # what save writes, counted without copying it (a meta tensor cannot be copied)
        owned = set(model.__dict__.get(OWNED, ()))
        adapter_bytes = sum(targets.numel(p) * p.element_size() for n, p in model.named_parameters()
                            if p.requires_grad or n in owned)
    footprint = sum(p.numel() * p.element_size() for p in params)
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    if is_quantized(model):  # bitsandbytes keeps scales/statistics as attributes, not parameters/buffers
        footprint += quantization_report(model)["state_bytes"]
    return Summary(strategy.label if strategy else None, trainable, total, adapter_bytes, footprint + buffers,
                   4 * total + buffers)


def save(model: nn.Module, directory: str | Path, *, _gathered: dict[str, torch.Tensor] | None = None) -> Path:
    """Write what the strategy trained (+ the task head) as safetensors, by docs/folder-format.md's rules. A model
    sharded by FSDP2 is saved with ``adaptkit.distributed.save_adapter`` (it passes ``_gathered``)."""
    _adapted(model)
    layout.save(model, directory, _gathered)
    return folders.path_of(directory)


def load(directory: str | Path, base_model: nn.Module, trainable: bool = False) -> nn.Module:
    """Rebuild an adapted model from ``adaptkit.save``'s folder (or any PEFT adapter folder) on a freshly loaded
    ``base_model``; ``trainable=True`` keeps it training. Every saved tensor must land in the model and every adapter
    tensor come from the file; named adapters come back with the one that was active."""
    directory = folders.path_of(directory)
    _refuse_if_adapted(_model(base_model, "base_model"), "base_model")
    adapters, saved, configs, plain = {"names": ["default"], "active": "default"}, {}, {}, False
    if (directory / CONFIG_NAME).is_file():
        strategy, saved = layout.read_file(directory)
        adapters = layout.read_adapters(saved, directory / CONFIG_NAME)
    elif plain := (directory / "adapter_config.json").is_file():  # a plain PEFT folder
        configs["default"] = layout.read_peft_config(directory, base_model)
        strategy = PeftMethod.from_peft_config(configs["default"])
    else:
        raise AdapterFormatError("directory", str(directory), f"holds neither {CONFIG_NAME} nor adapter_config.json"
                                 if directory.is_dir() else "is not a folder", "pass the folder adaptkit.save wrote")
    folder_of = {name: directory if name == "default" else directory / name for name in adapters["names"]}
    saved_keys = {}
    for name, folder in folder_of.items():
        saved_keys[name] = layout.check_weights(folder, base_model, strategy)
        if isinstance(strategy, PeftStrategy):
            configs[name] = configs.get(name) or layout.read_peft_config(folder, base_model)
    layout.check_base(directory, saved, base_model)
    if plain:  # no task_type: complete it from the saved head, or refuse
        layout.fill_task_type(directory, configs["default"], base_model, saved_keys["default"])
        strategy = PeftMethod.from_peft_config(configs["default"])
    elif isinstance(strategy, PeftStrategy):
        layout.check_agreement(directory, strategy, configs["default"], base_model)
    layout.restore_labels(saved, base_model)
    if strategy.freezes_base:  # as adapt did: the saved fp32 head loads into an fp32 head, without rounding
        fp32_new_heads(base_model)
        for config in configs.values():  # and so does anything else PEFT trains whole (LoRA's pooler)
            fp32_modules(base_model, list(config.modules_to_save or []))
    try:
        if isinstance(strategy, PeftStrategy):
            model = strategy.load(directory, base_model, trainable=trainable, config=configs["default"])
            for name, folder in folder_of.items():
                if name != "default":
                    model.load_adapter(str(folder), adapter_name=name, is_trainable=trainable)
            model.set_adapter(adapters["active"], inference_mode=not trainable)
            for name, folder in folder_of.items():
                layout.check_peft_keys(model, name, folder, saved_keys[name])
        else:
            model = strategy.load(directory, base_model)
            model.__dict__[OWNED] = [n for n, p in model.named_parameters() if p.requires_grad]  # save writes them back
        if not trainable:  # PEFT leaves a loaded prefix's prompt encoder trainable
            model.requires_grad_(False)
    except (RuntimeError, KeyError, ValueError) as exc:  # torch's size mismatch, PEFT's errors on another architecture
        if isinstance(exc, AdapterFormatError):
            raise
        first = next((line.strip() for line in str(exc).splitlines() if "size mismatch" in line), str(exc)[:300])
        raise AdapterFormatError(str(directory), type(layout.unwrap(base_model)).__name__, "the saved tensors do not "
                                 f"fit this base ({type(exc).__name__}: {first})", "use the adapted base") from None
    return _mark(model, strategy, base_model)


def merge(model: nn.Module) -> nn.Module:
    """Fold the trained pieces into the base weights; return a plain transformers model."""
    merged = _adapted(model).merge(model)
    hf.uninstall(model, merged)  # its methods and the marker: both are plain models again
    return merged


# ---- several named adapters on one base (PEFT strategies) -------------------------------------------
def add_adapter(model: nn.Module, name: str, strategy: Any = "lora", **options: Any) -> nn.Module:
    """Add a second (third, ...) named adapter to a PEFT-adapted model; it becomes active."""
    existing, name = _adapted(model), layout.adapter_name(name)
    config = resolve(strategy, layout.unwrap(model), **options)
    both = isinstance(config, PeftStrategy) and isinstance(existing, PeftStrategy)
    peft_config = config.peft_config(model.get_base_model()) if both else None
    if not both or peft_config.peft_type != model.peft_config[model.active_adapter].peft_type:
        raise UnsupportedError("strategy", f"{existing.label} + {config.label}", "named adapters need one PEFT method",
                               "add an adapter of the model's method, or adapt a fresh base")
    if name in model.peft_config:
        raise ConfigError("name", name, "is already an adapter of this model", f"not {sorted(model.peft_config)}")
    model.add_adapter(name, peft_config)
    model.set_adapter(name)
    return model


def set_adapter(model: nn.Module, name: str) -> nn.Module:
    """Make ``name`` the active adapter (its task head comes with it)."""
    names = sorted(getattr(_model(model), "peft_config", {}) or {})
    if name not in names:
        raise ConfigError("name", name, "is not an adapter of this model", f"one of {names}")
    model.set_adapter(name)
    return model
