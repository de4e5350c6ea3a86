"""A model's skeleton from its config alone: its module tree on the ``meta`` device (a 7B model builds in seconds,
in no memory), so ``check`` and ``estimate`` apply strategies as to a real model. Remote code is never run."""

from __future__ import annotations

import copy
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from huggingface_hub.errors import StrictDataclassError
from torch import nn
from transformers import AutoConfig, PretrainedConfig

from adaptkit.errors import AdapterFormatError, ConfigError, ConfigTypeError, UnsupportedError
from adaptkit.names import ADAPTKIT_MODEL_TYPE, CLASSIFICATION_TASKS, TASKS

# task -> transformers' public config-class -> model-class mapping behind the task's Auto class
_MAPPINGS = {"seq_cls": "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING", "qa": "MODEL_FOR_QUESTION_ANSWERING_MAPPING",
             "token_cls": "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING", "causal_lm": "MODEL_FOR_CAUSAL_LM_MAPPING",
             "seq2seq": "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING", "image_cls": "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING",
             "base": "MODEL_MAPPING"}
_ARCH_SUFFIXES = [("ForSequenceClassification", "seq_cls"), ("ForTokenClassification", "token_cls"),
                  ("ForQuestionAnswering", "qa"), ("ForCausalLM", "causal_lm"), ("LMHeadModel", "causal_lm"),
                  ("ForImageClassification", "image_cls")]
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
# config fields that decide how many modules a model builds, and the largest layer count accepted: the deepest
# released models have ~130 layers, and building one layer's modules takes ~6 ms even on the meta device
_LAYER_FIELDS = ("num_hidden_layers", "n_layer", "num_layers", "encoder_layers", "decoder_layers", "num_decoder_layers")
MAX_LAYERS = 512
_CODE_FILES = ("config.json", "tokenizer_config.json", "preprocessor_config.json", "processor_config.json",
               "feature_extractor_config.json", "image_processor_config.json")


@dataclass
class Skeleton:
    """A config, the task it was built for, and a fresh meta-device model of that task."""

    source: str          # what the user passed, for messages
    config: Any          # transformers.PretrainedConfig (a private copy)
    task: str
    model_class: type

    def build(self, dtype: torch.dtype = torch.float32) -> nn.Module:
        """A new weightless model (each strategy dry-run needs its own: adapting changes the model)."""
        with torch.device("meta"):
            model = self.model_class(copy.deepcopy(self.config))
        return model.to(dtype) if dtype != torch.float32 else model


def read_config(model: Any):
    """A private copy of the config of a path, hub id, PretrainedConfig or loaded model."""
    if isinstance(model, nn.Module) and not isinstance(getattr(model, "config", None), PretrainedConfig):
        raise ConfigTypeError("model", type(model).__name__, "has no transformers config", "pass its folder or config")
    if isinstance(model, (PretrainedConfig, nn.Module)):
        return copy.deepcopy(model if isinstance(model, PretrainedConfig) else model.config)
    if not isinstance(model, (str, Path)):
        raise ConfigTypeError("model", model, "expected a path, a hub id or a PretrainedConfig", "pass a folder")
    path = Path(model).expanduser()
    path = path.parent if path.is_file() else path  # a config.json given directly
    if not path.is_dir() and (str(model).startswith((".", "/", "~")) or str(model).count("/") > 1):
        raise ConfigError("model", str(model), "is neither an existing folder nor a hub id", "check the path")
    if path.is_dir():
        _refuse_adapter_folder(path)
        refuse_remote_code(path)
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("0", "", "false")
    for local_only in (True, False):  # local first: a hub id that is already cached must not wait on network retries
        try:
            return AutoConfig.from_pretrained(str(path) if path.is_dir() else str(model), trust_remote_code=False,
                                              local_files_only=local_only)
        except StrictDataclassError as exc:  # transformers >= 5.2x checks each field's type as it reads config.json
            field = re.search(r"field '(\w+)'", str(exc))
            raise ConfigTypeError(f"config.{field.group(1) if field else '?'}", str(model), f"is of the wrong type: "
                                  f"{exc.__cause__ or exc}", 'write the type named, e.g. 32 rather than "32"') from None
        except ValueError as exc:
            if "trust_remote_code" in str(exc) or "custom code" in str(exc):
                raise remote_code_error(model, "its config names custom code") from None
            raise ConfigError("model", str(model), f"its config cannot be read: {exc}", "fix its config.json") from None
        except OSError as exc:
            if path.is_dir() or offline or not local_only:
                raise ConfigError("model", str(model), "has no readable config.json" if path.is_dir() else
                                  "is not a local folder and not in the hub cache (HF_HUB_OFFLINE is set)" if offline
                                  else f"cannot be read: {exc}", "pass a folder with config.json, or download the "
                                  "model first") from None


def _json(file: Path) -> dict:
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _refuse_adapter_folder(path: Path) -> None:
    """An adapter folder (adaptkit's or PEFT's) is not a model to check: name the base it was trained on."""
    if _json(path / "config.json").get("model_type") not in (None, ADAPTKIT_MODEL_TYPE):
        return  # a whole model (full)
    for name, key in (("adaptkit_config.json", "base_model"), ("adapter_config.json", "base_model_name_or_path")):
        if (path / name).is_file():
            base = _json(path / name).get(key)
            raise AdapterFormatError("model", str(path), f"is an adapter folder ({name}), not a model",
                                     f"pass the base model it was trained on{f' ({base})' if base else ''}")


def refuse_remote_code(name_or_path: Any, trust_remote_code: Any = None) -> None:
    """Refuse a model whose files name custom code (``auto_map``) before transformers sees it: given
    ``trust_remote_code=None`` it asks at a terminal, and "y" runs code from the model folder."""
    if trust_remote_code:
        raise remote_code_error(name_or_path, "trust_remote_code=True was passed")
    folder = Path(os.path.expanduser(str(name_or_path))) if isinstance(name_or_path, (str, os.PathLike)) else None
    if folder is None or not folder.is_dir():
        return  # a hub id: from_pretrained runs with trust_remote_code=False and refuses it
    for name in _CODE_FILES:
        if auto_map := _json(folder / name).get("auto_map"):
            raise remote_code_error(name_or_path, f"{name} names custom code (auto_map: {sorted(auto_map)})")


def remote_code_error(name_or_path: Any, why: str) -> UnsupportedError:
    return UnsupportedError("model", str(name_or_path), f"needs custom code from the model repository "
                            f"(trust_remote_code): {why}", "adaptkit never runs remote code: review the code, load "
                            "the model yourself with trust_remote_code=True and pass it to adaptkit.adapt")


def infer_task(config) -> str:
    """The task the config's architectures name; a bare backbone counts as a classifier (seq_cls, image_cls)."""
    named = (task_of_class(a, config) for a in getattr(config, "architectures", None) or [])
    usable = (t for t in ("seq_cls", "image_cls", "causal_lm", "seq2seq") if _model_class(config, t) is not None)
    return next((t for t in named if t is not None), None) or next(usable, "base")


def task_of_class(name: str, config) -> str | None:
    """``BertForSequenceClassification`` -> ``seq_cls``; None for a bare backbone or an unknown head."""
    seq2seq = name.endswith("ForConditionalGeneration") and getattr(config, "is_encoder_decoder", False)
    return next((task for suffix, task in _ARCH_SUFFIXES if name.endswith(suffix)), "seq2seq" if seq2seq else None)


def _model_class(config, task: str) -> type | None:
    return getattr(transformers, _MAPPINGS[task]).get(type(config), None)


def skeleton(model: Any, task: str = "auto", num_labels: int | None = None) -> Skeleton:
    """Read the config and pick the model class; raise a typed error when either is impossible."""
    config = read_config(model)
    for field in _LAYER_FIELDS:  # their types transformers checks itself (StrictDataclassError, see read_config)
        if isinstance(value := getattr(config, field, None), int) and not 0 <= value <= MAX_LAYERS:
            raise ConfigError(f"config.{field}", value, f"is outside 0..{MAX_LAYERS}, beyond any real model",
                              "check config.json")
    if task not in TASKS and task != "auto":
        raise ConfigError("task", task, "is not a task adaptkit knows", f"choose one of {['auto', *TASKS]}")
    if isinstance(model, nn.Module):  # a loaded model: check exactly its class
        model_class = type(model)
        if task == "auto":
            task = task_of_class(model_class.__name__, config) or "base"
    else:
        task = infer_task(config) if task == "auto" else task
        model_class = _model_class(config, task)
    if model_class is None:
        usable = [t for t in TASKS if _model_class(config, t) is not None]
        raise UnsupportedError("task", f"{task} for model type {config.model_type!r}", "transformers has no such "
                               "model class", f"choose a task this model supports: {usable}")
    if num_labels is not None:
        config.num_labels = num_labels
    return Skeleton(describe(model), config, task, model_class)


def describe(model: Any) -> str:
    """A short name for messages: the path or id, the config class, or the model class."""
    if isinstance(model, nn.Module):
        return type(model).__name__
    if hasattr(model, "model_type") and hasattr(model, "to_dict"):  # a PretrainedConfig
        return f"{type(model).__name__}({getattr(model, 'name_or_path', '') or model.model_type!r})"
    return str(model)


def dtype_of(name: Any) -> torch.dtype:
    if not isinstance(name, torch.dtype) and name not in DTYPES:
        raise ConfigError("dtype", name, "is not a supported dtype", f"choose one of {sorted(DTYPES)}")
    return DTYPES.get(name, name)


__all__ = ["Skeleton", "skeleton", "read_config", "infer_task", "dtype_of", "describe", "TASKS", "CLASSIFICATION_TASKS"]
