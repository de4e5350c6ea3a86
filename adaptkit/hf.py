"""An adapted model's own ``save_pretrained``, the stock Trainer's way of saving every checkpoint, is adaptkit's
writer (docs/folder-format.md). The Trainer reloads native checkpoints non-strictly from ``model.safetensors``."""

from __future__ import annotations

import functools
import os
from typing import Any

from torch import nn

from adaptkit import layout
from adaptkit.names import MARKER
from adaptkit.strategies import bottleneck
from adaptkit.errors import ConfigError, UnsupportedError

_SAVE = "save_pretrained"
_DISABLE = "disable_adapter"
_CHECKPOINTING = ("activation_checkpointing_enable", "gradient_checkpointing_enable")


def install(model: nn.Module) -> None:
    """Give this adapted model (the instance only) a save_pretrained that writes the adapter folder, and on
    prefix tuning a checkpointing switch that refuses (the Trainer flips it on from its arguments)."""
    # a partial, not a bound method: pickling a bound method stores ``getattr(model, name)``, which on unpickling
    # resolves to transformers' method
    model.__dict__[_SAVE] = functools.partial(save_pretrained, model)
    if not hasattr(model, "peft_config"):  # PEFT models have PEFT's (adaptkit.compat mends it for prompt learning)
        model.__dict__[_DISABLE] = functools.partial(_disable_adapter, model)
    config = (getattr(model, "peft_config", None) or {}).get(getattr(model, "active_adapter", None))
    if getattr(getattr(config, "peft_type", None), "value", None) == "PREFIX_TUNING":
        for name in _CHECKPOINTING:
            model.__dict__[name] = _refuse_checkpointing


def _disable_adapter(model: nn.Module):
    """``with model.disable_adapter():`` as PEFT models have it: bottleneck adapters off inside; linear_probe and
    full train the model's own weights, so they have no adapter to switch off."""
    if not bottleneck.has_adapters(model):
        name = getattr(model.__dict__.get(MARKER), "name", None)
        raise UnsupportedError("disable_adapter", name, f"{name} trains the model's own weights", "reload the base")
    return bottleneck.adapters_off(model)


def uninstall(*models: nn.Module) -> None:
    for model in models:
        for name in (_SAVE, _DISABLE, *_CHECKPOINTING, MARKER):
            model.__dict__.pop(name, None)


def _refuse_checkpointing(*args: Any, **kwargs: Any) -> None:
    # PEFT refuses prefix tuning on a model with checkpointing on; switched on afterwards, the prefix
    # silently gets no gradient (measured: the Trainer's optimizer never saw one)
    raise UnsupportedError("gradient_checkpointing", True, "PEFT refuses prefix tuning with it (turned on later, the "
                           "prefix never trains)", "set gradient_checkpointing=False, or use 'lora'")


def save_pretrained(model: nn.Module, save_directory: str | os.PathLike, is_main_process: bool = True,
                    state_dict: dict | None = None, safe_serialization: bool = True, **kwargs: Any) -> None:
    """``adaptkit.save`` into ``save_directory``; ``state_dict``: the one the Trainer gathers under FSDP / DeepSpeed."""
    if kwargs:
        raise ConfigError("save_pretrained options", sorted(kwargs), "not supported on an adapted model",
                          "call save_pretrained(dir), then huggingface_hub.upload_folder")
    if not safe_serialization:
        raise ConfigError("safe_serialization", False, "adaptkit never pickles weights", "leave it True")
    if is_main_process:
        layout.save(model, save_directory, state_dict, field="save_directory")
