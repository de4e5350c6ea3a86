"""Adapted models in the Hugging Face ecosystem: ``save_pretrained`` and the stock ``Trainer``.

The Trainer saves every checkpoint and ``save_model`` through ``model.save_pretrained(dir, state_dict=...,
is_main_process=...)``. An adapted model's ``save_pretrained`` is adaptkit's: the same writer as
``adaptkit.save`` (``folders.commit``), so a checkpoint holds only the trained tensors, and a folder holding
another program's files (a base model's) is refused, never overwritten. The Trainer reloads checkpoints and the
best model by itself: PEFT strategies through ``PeftModel.load_adapter``, native ones from ``model.safetensors``,
loaded non-strictly into the live model. Loading a folder with ``from_pretrained``: see ``adaptkit.layout``.
"""

from __future__ import annotations

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
    model.__dict__[_SAVE] = _SavePretrained(model)
    if not hasattr(model, "peft_config"):  # PEFT models have PEFT's (adaptkit.compat mends it for prompt learning)
        model.__dict__[_DISABLE] = _DisableAdapter(model)
    config = (getattr(model, "peft_config", None) or {}).get(getattr(model, "active_adapter", None))
    if getattr(getattr(config, "peft_type", None), "value", None) == "PREFIX_TUNING":
        for name in _CHECKPOINTING:
            model.__dict__[name] = _refuse_checkpointing


class _SavePretrained:
    """An object holding the model rather than a bound method: pickling a bound method stores
    ``getattr(model, "save_pretrained")``, which on unpickling resolves to transformers' method."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        save_pretrained(self.model, *args, **kwargs)


class _DisableAdapter:
    """``with model.disable_adapter():`` as PEFT models have it, for native strategies: bottleneck adapters are
    switched off inside; linear_probe and full train the model's own weights, so they have no adapter to switch off."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __call__(self):
        if not bottleneck.has_adapters(self.model):
            name = getattr(self.model.__dict__.get(MARKER), "name", None)
            raise UnsupportedError(field="disable_adapter", value=name, problem=f"{name} trains the model's own weights: "
                                   "there is no adapter to switch off", fix="load the base model again to compare with it")
        return bottleneck.adapters_off(self.model)


def uninstall(*models: nn.Module) -> None:
    for model in models:
        for name in (_SAVE, _DISABLE, *_CHECKPOINTING):
            model.__dict__.pop(name, None)


def _refuse_checkpointing(*args: Any, **kwargs: Any) -> None:
    # PEFT refuses prefix tuning on a model with checkpointing on; switched on afterwards, the prefix
    # silently gets no gradient (measured: the Trainer's optimizer never saw one)
    raise UnsupportedError(field="gradient_checkpointing", value=True, fix="set gradient_checkpointing=False "
                           "(TrainingArguments), or use 'lora'", problem="PEFT refuses prefix tuning with it; switched "
                           "on after adapt, the prefix gets no gradient and never trains")


def save_pretrained(model: nn.Module, save_directory: str | os.PathLike, is_main_process: bool = True,
                    state_dict: dict | None = None, safe_serialization: bool = True, **kwargs: Any) -> None:
    """Write the adapter folder into ``save_directory`` with ``adaptkit.save``'s rules. ``state_dict`` is the
    gathered state dict the Trainer passes under FSDP / DeepSpeed."""
    if kwargs:
        raise ConfigError(field="save_pretrained options", value=sorted(kwargs), problem="not supported on an "
                          "adaptkit-adapted model", fix="call save_pretrained(dir) (or adaptkit.save) and upload the "
                          "folder with huggingface_hub.upload_folder")
    if not safe_serialization:
        raise ConfigError(field="safe_serialization", value=False, problem="adaptkit never pickles weights",
                          fix="leave safe_serialization=True")
    if is_main_process:
        layout.save(model, save_directory, state_dict, field="save_directory")
