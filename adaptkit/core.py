"""The public calls: adapt, summary, save, load, merge, and named adapters on one base.

Everything strategy-specific lives in ``adaptkit/strategies/<name>.py``; this module only resolves
the user's input to a Strategy, checks that the combination can work, and marks the model so a
second ``adapt`` is refused instead of silently stacking adapters.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from adaptkit import compat, folders, hf, layout, strategies, targets
from adaptkit.precision import fp32_modules, fp32_new_heads, keep_trainable_fp32
from adaptkit.errors import (AdapterFormatError, AlreadyAdaptedError, ConfigError, ConfigTypeError,
                             NotAdaptedError, UnsupportedError)
from adaptkit.strategies.base import CONFIG_NAME, MARKER, OWNED, WEIGHTS_NAME, PeftStrategy, Strategy


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
    compat.bridge(model)  # PEFT 0.21.2 workarounds, per instance: any PEFT prefix_tuning config, disable_adapter
    hf.install(model)  # its save_pretrained (the Trainer's way of saving) writes the adapter folder
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
        # what save writes (owned_tensors), counted without copying it (a meta tensor cannot be copied)
        owned = set(model.__dict__.get(OWNED, ()))
        adapter_bytes = sum(targets.numel(p) * p.element_size() for n, p in model.named_parameters()
                            if p.requires_grad or n in owned)
    footprint = sum(p.numel() * p.element_size() for p in params)
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    if is_quantized(model):  # bitsandbytes keeps scales/statistics as attributes, not parameters/buffers
        from adaptkit.quantization import quantization_report
        footprint += quantization_report(model)["state_bytes"]
    return Summary(strategy.label if strategy else None, trainable, total, adapter_bytes, footprint + buffers,
                   4 * total + buffers)


def save(model: nn.Module, directory: str | Path, *, _gathered: dict[str, torch.Tensor] | None = None) -> Path:
    """Write only what the strategy trained (+ the task head) as safetensors, atomically.

    The files are built in a temporary folder beside the target and swapped into place in one step,
    so a crash never leaves a half-written adapter. In an existing adaptkit folder only the files the
    previous save wrote (listed in its ``adaptkit_config.json``) are replaced; the user's own files
    there stay. ``~`` is expanded and a symlinked folder keeps its link. A model sharded by FSDP2
    is saved with ``adaptkit.distributed.save_adapter`` (it passes ``_gathered``).
    """
    strategy = strategy_of(model)
    if strategy is None:
        raise NotAdaptedError(field="model", value=type(model).__name__, problem="was not adapted by adaptkit",
                              fix="call adaptkit.adapt(model, strategy) first (or save a plain model with save_pretrained)")
    if _gathered is None and _is_sharded(model):
        raise UnsupportedError(field="model", value="parameters sharded by FSDP (DTensor)",
                               problem="this process holds only its shard; saving it would write a partial adapter",
                               fix="call adaptkit.distributed.save_adapter(accelerator, model, directory) on every process")
    target = folders.resolve_target(directory)
    if target.exists() and not (target.is_dir() and (not any(target.iterdir()) or (target / CONFIG_NAME).is_file())):
        raise ConfigError(field="directory", value=str(directory),
                          problem="exists and is not an adaptkit folder; refusing to overwrite it",
                          fix="choose a new or empty folder")
    tmp = folders.make_temp(target)
    try:
        layout.write_folder(model, tmp, _gathered)
        folders.replace_owned(tmp, target, lambda: _owned_files(target))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Path(os.path.expanduser(os.fspath(directory)))


def _owned_files(folder: Path) -> set[str]:
    """The files an earlier adaptkit.save wrote into ``folder`` (its manifest); for folders saved before
    manifests existed, the names adaptkit and PEFT write."""
    try:
        files = json.loads((folder / CONFIG_NAME).read_text()).get("files")
    except (OSError, ValueError, AttributeError):
        files = None
    if isinstance(files, list) and all(isinstance(f, str) for f in files):
        return set(files)
    owned = {CONFIG_NAME, WEIGHTS_NAME}
    if (folder / "adapter_config.json").is_file():
        owned |= {"adapter_config.json", "README.md"}
        owned |= {f"{p.parent.name}/{n}" for p in folder.glob("*/adapter_config.json")
                  for n in ("adapter_config.json", WEIGHTS_NAME)}
    return owned


def _is_sharded(model: nn.Module) -> bool:
    from torch.distributed.tensor import DTensor
    return any(isinstance(p, DTensor) for p in model.parameters())


def load(directory: str | Path, base_model: nn.Module, trainable: bool = False) -> nn.Module:
    """Rebuild an adapted model from ``adaptkit.save``'s folder (or any PEFT adapter folder).

    ``base_model`` must be a freshly loaded copy of the model that was adapted. With
    ``trainable=True`` the loaded adapter keeps training (PEFT loads adapters frozen by default).
    Every saved tensor must land in the model and every adapter tensor must come from the file;
    named adapters come back with the one that was active.
    """
    directory = Path(os.path.expanduser(os.fspath(directory)))
    if not directory.is_dir():
        raise AdapterFormatError(field="directory", value=str(directory), problem="is not a folder",
                                 fix="pass the folder written by adaptkit.save")
    _refuse_if_adapted(base_model)
    adapters = {"names": ["default"], "active": "default"}
    peft_config, saved = None, {}
    if (directory / CONFIG_NAME).is_file():
        strategy, saved = layout.read_file(directory)
        adapters = layout.read_adapters(directory)
        if isinstance(strategy, PeftStrategy):
            layout.read_peft_config(directory)
    elif (directory / "adapter_config.json").is_file():  # a plain PEFT folder
        from adaptkit.strategies.peft_method import PeftMethod
        peft_config = layout.read_peft_config(directory)
        strategy = PeftMethod.from_peft_config(peft_config)
    else:
        raise AdapterFormatError(field="directory", value=str(directory),
                                 problem=f"holds neither {CONFIG_NAME} nor adapter_config.json",
                                 fix="pass the folder written by adaptkit.save")
    folder_of = {name: directory if name == "default" else directory / name for name in adapters["names"]}
    for name, folder in folder_of.items():
        if name != "default":
            layout.read_peft_config(folder)
        saved_keys = layout.check_weights(folder, base_model, strategy)
        if isinstance(strategy, PeftStrategy):
            layout.check_prompt_shape(folder, base_model)
    layout.check_base(directory, saved, base_model)
    if peft_config is not None:  # no task_type: complete it from the saved head, or refuse
        options = dict(strategy.options)
        layout.fill_task_type(directory, options, base_model, saved_keys)
        if options != strategy.options:
            peft_config.task_type, peft_config.modules_to_save = options["task_type"], options["modules_to_save"]
            strategy = PeftMethod.from_peft_config(peft_config)
        else:
            peft_config = None
    layout.restore_labels(saved, base_model)
    names_before: list[str] = []
    if strategy.freezes_base:  # as adapt did: the saved fp32 head loads into an fp32 head, without rounding
        fp32_new_heads(base_model)
        if isinstance(strategy, PeftStrategy):  # and so does anything else PEFT trains whole (LoRA's pooler)
            for folder in folder_of.values():
                fp32_modules(base_model, list(layout.read_peft_config(folder).modules_to_save or []))
    try:
        if isinstance(strategy, PeftStrategy):
            model = strategy.load(directory, base_model, trainable=trainable, config=peft_config)
            for name, folder in folder_of.items():
                if name != "default":
                    model.load_adapter(str(folder), adapter_name=name, is_trainable=trainable)
            model.set_adapter(adapters["active"], inference_mode=not trainable)
            for name, folder in folder_of.items():
                layout.check_peft_keys(model, name, folder)
            if not trainable:  # PEFT leaves a loaded prefix's prompt encoder trainable
                model.requires_grad_(False)
        else:
            model = strategy.load(directory, base_model)
            names_before = [n for n, p in model.named_parameters() if p.requires_grad]  # what save must write back, frozen or not
            if not trainable:
                model.requires_grad_(False)
    except (RuntimeError, KeyError) as exc:  # torch's size mismatch, PEFT's KeyError on another architecture
        text = str(exc)
        first = next((line.strip() for line in text.splitlines() if "size mismatch" in line), text[:300])
        raise AdapterFormatError(field=str(directory), value=type(_unwrap(base_model)).__name__,
                                 problem=f"the saved tensors do not fit this base model ({type(exc).__name__}: {first})",
                                 fix="load onto the same base model that was adapted (same architecture, sizes and "
                                     "num_labels)") from None
    if names_before:
        model.__dict__[OWNED] = names_before
    return _mark(model, strategy, base_model)


def merge(model: nn.Module) -> nn.Module:
    """Fold the trained pieces into the base weights; return a plain transformers model."""
    strategy = strategy_of(model)
    if strategy is None:
        raise NotAdaptedError(field="model", value=type(model).__name__, problem="was not adapted by adaptkit",
                              fix="nothing to merge; use the model as it is")
    merged = strategy.merge(model)
    for m in (model, merged):
        m.__dict__.pop(MARKER, None)
    hf.uninstall(model, merged)
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
