"""Adapted models in the Hugging Face ecosystem: ``save_pretrained``, the stock ``Trainer``, ``from_pretrained``.

The ``Trainer`` saves every checkpoint and ``save_model`` through ``model.save_pretrained(dir,
state_dict=..., is_main_process=...)`` (PEFT models pass through it the same way), then writes the
optimizer state of the parameters that train. So an adapted model's ``save_pretrained`` writes the
adapter folder, exactly what ``adaptkit.save`` writes: only the trained tensors. The Trainer reloads
them for ``resume_from_checkpoint`` and ``load_best_model_at_end`` by itself: PEFT strategies through
``PeftModel.load_adapter``; native ones from ``model.safetensors``, which it loads non-strictly into
the live model (so the frozen base stays as it is and only the trained tensors are replaced).

``from_pretrained`` on a folder: PEFT strategies load through transformers' PEFT integration (the base
path recorded in adapter_config.json is absolute); ``full`` folders are whole models; the other native
folders carry a ``config.json`` of model type ``adaptkit``, which ``AutoModel*.from_pretrained`` refuses
(with ``adaptkit.load`` in the message once adaptkit is imported).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from torch import nn

from adaptkit import folders, layout
from adaptkit.errors import AdapterFormatError, ConfigError, UnsupportedError

_SAVE = "save_pretrained"


_CHECKPOINTING = ("activation_checkpointing_enable", "gradient_checkpointing_enable")


def install(model: nn.Module) -> None:
    """Give this adapted model (the instance only) a save_pretrained that writes the adapter folder, and
    on prefix tuning a checkpointing switch that refuses (the Trainer flips it on from its arguments)."""
    model.__dict__[_SAVE] = _SavePretrained(model)
    config = (getattr(model, "peft_config", None) or {}).get(getattr(model, "active_adapter", None))
    if getattr(getattr(config, "peft_type", None), "value", None) == "PREFIX_TUNING":
        for name in _CHECKPOINTING:
            model.__dict__[name] = _refuse_checkpointing


class _SavePretrained:
    """``model.save_pretrained`` of one adapted model. An object holding the model rather than a bound
    method: pickling a bound method stores ``getattr(model, "save_pretrained")``, which on unpickling
    resolves to transformers' method before the instance's own attributes are back."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        save_pretrained(self.model, *args, **kwargs)


def uninstall(*models: nn.Module) -> None:
    for model in models:
        for name in (_SAVE, *_CHECKPOINTING):
            model.__dict__.pop(name, None)


def _refuse_checkpointing(*args: Any, **kwargs: Any) -> None:
    # PEFT refuses prefix tuning on a model with checkpointing on; switched on afterwards, the prefix
    # silently gets no gradient (measured: the Trainer's optimizer never saw one)
    raise UnsupportedError(field="gradient_checkpointing", value=True,
                           problem="PEFT refuses prefix tuning with it; switched on after adapt, the prefix gets "
                                   "no gradient and never trains",
                           fix="set gradient_checkpointing=False (TrainingArguments), or use 'lora'")


def save_pretrained(model: nn.Module, save_directory: str | os.PathLike, is_main_process: bool = True,
                    state_dict: dict | None = None, safe_serialization: bool = True, **kwargs: Any) -> None:
    """Write the adapter folder into ``save_directory`` (kept with whatever else is in it, as transformers'
    save_pretrained does). Every file is written under a temporary name first, then renamed into place.
    ``state_dict`` is the gathered state dict the Trainer passes under FSDP / DeepSpeed."""
    if kwargs:
        raise ConfigError(field="save_pretrained options", value=sorted(kwargs),
                          problem="not supported on an adaptkit-adapted model",
                          fix="call save_pretrained(dir) (or adaptkit.save) and upload the folder with "
                              "huggingface_hub.upload_folder")
    if not safe_serialization:
        raise ConfigError(field="safe_serialization", value=False, problem="adaptkit never pickles weights",
                          fix="leave safe_serialization=True")
    if not is_main_process:
        return
    target = Path(save_directory)
    if target.exists() and not target.is_dir():
        raise ConfigError(field="save_directory", value=str(target), problem="is a file",
                          fix="pass a folder")
    target.mkdir(parents=True, exist_ok=True)
    tmp = folders.make_temp(target)
    try:
        layout.write_folder(model, tmp, state_dict=state_dict)
        _move_into(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _move_into(src: Path, dst: Path) -> None:
    for entry in sorted(src.iterdir()):
        if entry.is_dir():
            (dst / entry.name).mkdir(exist_ok=True)
            _move_into(entry, dst / entry.name)
        else:
            os.replace(entry, dst / entry.name)  # atomic per file


# ---- from_pretrained on a native adapter folder -----------------------------------------------------
def register_auto_classes() -> None:
    """Register model type ``adaptkit`` so ``AutoModel*.from_pretrained(folder)`` raises the fix."""
    from transformers import AutoConfig, PretrainedConfig
    from transformers.models.auto import modeling_auto

    class AdaptkitFolderConfig(PretrainedConfig):
        model_type = layout.ADAPTKIT_MODEL_TYPE

    class AdaptkitFolder:
        """Stands in for a model class: an adapter folder is not a model."""
        config_class = AdaptkitFolderConfig

        @classmethod
        def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
            raise AdapterFormatError(
                field="from_pretrained", value=str(pretrained_model_name_or_path),
                problem="is an adaptkit adapter folder (only the trained tensors), not a whole model",
                fix="load the base model, then model = adaptkit.load(folder, base_model); the base is "
                    "recorded in the folder's adaptkit_config.json")

    AutoConfig.register(layout.ADAPTKIT_MODEL_TYPE, AdaptkitFolderConfig, exist_ok=True)
    for name in dir(modeling_auto):
        auto = getattr(modeling_auto, name)
        if name.startswith("AutoModel") and isinstance(auto, type) and hasattr(auto, "_model_mapping"):
            auto.register(AdaptkitFolderConfig, AdaptkitFolder, exist_ok=True)
