"""Any other PEFT method, passed straight through: by name (``"ia3"``, ``"loha"``) or as a PeftConfig. adaptkit fills
only what PEFT would get wrong or fail on unnamed (docs/strategies.md); tests/test_peft_methods.py compares every
method with plain PEFT."""

from __future__ import annotations

import dataclasses
import difflib
import json
import typing

from torch import nn

from adaptkit import targets
from adaptkit.errors import ConfigError, UnknownStrategyError, UnsupportedError
from adaptkit.strategies import register
from adaptkit.strategies.base import PeftStrategy, check_types, pooler_if, refuse_unknown
from adaptkit.strategies.lora import backbone_targets, refuse_init

NORM_METHODS = {"ln_tuning"}  # PEFT's tables name only norm layers for these
# sizes PEFT leaves None and then fails on with a bare TypeError: Prefix's 20 virtual tokens; LLaMA-Adapter's 10
PROMPT_DEFAULTS = {"num_virtual_tokens": 20, "adapter_len": 10}
REQUIRED = {"trainable_tokens": "token_indices"}  # left empty, PEFT trains nothing


def peft_method_names() -> list[str]:
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
    return sorted(t.value.lower() for t in PEFT_TYPE_TO_CONFIG_MAPPING)


@register
@dataclasses.dataclass
class PeftMethod(PeftStrategy):
    """``method`` is a PEFT method name; ``options`` are that PEFT config's own fields (``train_pooler`` too)."""

    name = "peft"
    mergeable = True  # for the LoRA family; prompt-learning methods refuse in merge()
    saved_before = {"train_pooler": False}  # folders saved before the option trained no pooler

    method: str = "ia3"
    options: dict = dataclasses.field(default_factory=dict)
    train_pooler: bool = True

    def validate(self) -> None:
        names = peft_method_names()
        if self.method.lower() not in names:
            close = difflib.get_close_matches(self.method.lower(), names, n=1)
            raise UnknownStrategyError("PeftMethod.method", self.method, "is not a PEFT method",
                                       (f"did you mean {close[0]!r}? " if close else "") + f"choose from {names}")
        self.method = self.method.lower()
        if "train_pooler" in self.options:  # adapt(model, "loha", train_pooler=False) lands in options
            self.train_pooler = self.options.pop("train_pooler")
            check_types({"train_pooler": self.train_pooler}, {"train_pooler": bool}, self.method, default=" (default True)")
        config_class = self._config_class()
        hints = typing.get_type_hints(config_class)
        refuse_unknown(self.options, hints, f"{self.method} options", f"see peft.{config_class.__name__} for the valid options")
        # PEFT keeps e.g. target_modules=3 and fails at apply time
        check_types(self.options, hints, self.method, fix=f"see peft.{config_class.__name__}")
        self.options.update({k: v for k, v in PROMPT_DEFAULTS.items() if k in hints and self.options.get(k) is None})
        if self.method in REQUIRED and not self.options.get(REQUIRED[self.method]):
            raise ConfigError(f"{self.method}.{REQUIRED[self.method]}", None, "is required: without it PEFT trains "
                              "nothing", f"pass options={{'{REQUIRED[self.method]}': [...]}}")
        if self.method == "lora":
            refuse_init(self.options.get("init_lora_weights"), "lora.init_lora_weights")

    @property
    def label(self) -> str:
        return self.method

    def _config_class(self):
        from peft import PeftType
        from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
        return PEFT_TYPE_TO_CONFIG_MAPPING[PeftType(self.method.upper())]

    @classmethod
    def from_peft_config(cls, config) -> "PeftMethod":
        options = json.loads(json.dumps(config.to_dict(), default=sorted))  # sets as sorted lists, enums as values
        return cls(method=config.peft_type.value.lower(), options={k: v for k, v in options.items() if k != "peft_type"})

    def peft_config(self, model: nn.Module):
        options = {k: v for k, v in self.options.items() if k != "peft_type"}
        options.setdefault("task_type", targets.peft_task_type(model))
        if self.method == "adaption_prompt":  # LLaMA-Adapter's prompts in every layer unless told
            options.setdefault("adapter_layers", getattr(getattr(model, "config", None), "num_hidden_layers", None))
        try:  # PEFT checks the values; its TypeError/ValueError become typed errors naming the method
            config = self._config_class()(**options)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{self.method} options", self.options, f"refused by PEFT: {exc}",
                              f"see peft.{self._config_class().__name__}") from None
        if hasattr(config, "fan_in_fan_out") and "fan_in_fan_out" not in self.options:  # PEFT flips it with a warning
            config.fan_in_fan_out = any(isinstance(m, targets.Conv1D) for m in model.modules())
        heads = targets.new_head_names(model)
        if hasattr(config, "modules_to_save") and config.modules_to_save is None and heads:
            config.modules_to_save = heads + pooler_if(self.train_pooler, heads, model, f"{self.method}.train_pooler")
        if config.is_prompt_learning or config.is_adaption_prompt or not hasattr(config, "target_modules"):
            return config  # prompts, not modules: nothing to target
        whole = [m for m in config.modules_to_save or [] if m not in targets.head_names(model)]  # no update on top
        given = config.target_modules
        if isinstance(given, str):
            targets.match_regex(model, given, f"{self.method}.target_modules", linear=False)
        if isinstance(given, (list, tuple, set)) and given:
            targets.match_targets(model, list(given), f"{self.method}.target_modules")
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if given is None and model_type not in (table := _peft_table(self.method)) and table:
            if hasattr(config, "feedforward_modules"):  # IA3-style: needs to know which layers are FFN
                raise UnsupportedError(f"{self.method}.target_modules", None, "PEFT has no default targets for model "
                                       f"type {model_type!r}", "pass target_modules and feedforward_modules")
            if self.method in NORM_METHODS:
                config.target_modules = targets.unique_suffixes(model, _norm_names(model))
            else:
                config.target_modules = backbone_targets(model, whole)[0]
        if getattr(config, "exclude_modules", "absent") is None:
            # PEFT's tables name leaves like "dense" that also occur inside heads (RoBERTa's classifier.dense);
            # adapting a head that is also in modules_to_save breaks merging
            config.exclude_modules = backbone_targets(model, whole)[1]
        return config


def _peft_table(method: str) -> dict:
    """PEFT's default targets per model type for ``method``; empty where PEFT finds them itself (SHADOW's blocks)."""
    import peft.utils
    from peft import PeftType
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
    tuner = PEFT_TYPE_TO_TUNER_MAPPING[PeftType(method.upper())]
    return (getattr(tuner, "target_module_mapping", None)
            or getattr(peft.utils, f"TRANSFORMERS_MODELS_TO_{method.upper()}_TARGET_MODULES_MAPPING", None) or {})


def _norm_names(model: nn.Module) -> list[str]:
    heads = tuple(targets.head_names(model))
    return [n for n, m in model.named_modules() if type(m).__name__.endswith("Norm") and any(True for _ in m.parameters())
            and not n.startswith(heads)]
