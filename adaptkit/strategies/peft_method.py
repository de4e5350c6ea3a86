"""Any other PEFT method, passed straight through: by name (``"ia3"``, ``"loha"``) or as a PeftConfig.

adaptkit only fills what PEFT leaves to the user and would otherwise get wrong silently: the task
type, the new task head in ``modules_to_save`` (or it stays random and is not saved), and target
modules for architectures missing from PEFT's tables (found from the model's structure).
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import re
import typing
from typing import Any

from torch import nn

from adaptkit import targets
from adaptkit.errors import (ConfigError, ConfigTypeError, TargetNotFoundError, UnknownOptionError, UnknownStrategyError,
                             UnsupportedError)
from adaptkit.strategies import register
from adaptkit.strategies.base import PeftStrategy, describe_type, type_ok
from adaptkit.strategies.lora import backbone_targets


def peft_method_names() -> list[str]:
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
    return sorted(t.value.lower() for t in PEFT_TYPE_TO_CONFIG_MAPPING)


def _jsonable(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (set, frozenset)):
        return sorted(_jsonable(v) for v in value)
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


@register
@dataclasses.dataclass
class PeftMethod(PeftStrategy):
    """``method`` is a PEFT method name; ``options`` are that PEFT config's own fields."""

    name = "peft"
    mergeable = True  # for the LoRA family; prompt-learning methods refuse in merge()

    method: str = "ia3"
    options: dict = dataclasses.field(default_factory=dict)

    def validate(self) -> None:
        names = peft_method_names()
        if self.method.lower() not in names:
            close = difflib.get_close_matches(self.method.lower(), names, n=1)
            raise UnknownStrategyError(field="PeftMethod.method", value=self.method, problem="is not a PEFT method",
                                       fix=(f"did you mean {close[0]!r}? " if close else "") + f"choose from {names}")
        self.method = self.method.lower()
        config_class = self._config_class()
        known = {f.name for f in dataclasses.fields(config_class)}
        unknown = sorted(set(self.options) - known)
        if unknown:
            hints = [f"{u!r} -> did you mean {m[0]!r}?" for u in unknown
                     if (m := difflib.get_close_matches(u, known, n=1))]
            raise UnknownOptionError(field=f"{self.method} options", value=unknown, problem="unknown option(s)",
                                     fix=("; ".join(hints) + "; " if hints else "")
                                     + f"see peft.{config_class.__name__} for the valid options")
        hints = typing.get_type_hints(config_class)
        for key, value in self.options.items():  # PEFT keeps e.g. target_modules=3 and fails at apply time
            if key in hints and not type_ok(value, hints[key]):
                raise ConfigTypeError(field=f"{self.method}.{key}", value=value,
                                      problem=f"expected {describe_type(hints[key])}, got {type(value).__name__}",
                                      fix=f"see peft.{config_class.__name__}.{key}")
        try:  # PEFT checks the values; its TypeError/ValueError become typed errors naming the method
            config_class(**{k: v for k, v in self.options.items() if k != "peft_type"})
        except (TypeError, ValueError) as exc:
            raise ConfigError(field=f"{self.method} options", value=self.options, problem=f"refused by PEFT: {exc}",
                              fix=f"fix the option values (see peft.{config_class.__name__})") from None

    @property
    def label(self) -> str:
        return self.method

    def _config_class(self):
        from peft import PeftType
        from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
        return PEFT_TYPE_TO_CONFIG_MAPPING[PeftType(self.method.upper())]

    @classmethod
    def from_peft_config(cls, config) -> "PeftMethod":
        options = {k: _jsonable(v) for k, v in config.to_dict().items() if k not in ("peft_type",)}
        return cls(method=config.peft_type.value.lower(), options=options)

    def peft_config(self, model: nn.Module):
        from peft import PromptLearningConfig
        config = self._config_class()(**{k: v for k, v in self.options.items() if k != "peft_type"})
        if config.task_type is None:
            config.task_type = targets.peft_task_type(model)
        if getattr(config, "modules_to_save", None) is None and targets.new_head_names(model):
            config.modules_to_save = targets.new_head_names(model)
        # a target that matches nothing: PEFT's "No modules were targeted" said with the names there are (any
        # module, not only linears: some methods adapt norms or embeddings)
        given = self.options.get("target_modules")
        if isinstance(given, str) and not any(re.fullmatch(given, n) for n, _ in model.named_modules()):
            raise TargetNotFoundError(field=f"{self.method}.target_modules", value=given,
                                      problem="a string is a regex full-matched against whole module names (as in "
                                              "PEFT) and this one matches no module",
                                      fix=f"pass a list of names or suffixes (e.g. [{given!r}]) or a regex such as "
                                          f"{'.*' + given!r}")
        if isinstance(given, (list, tuple)) and given:
            targets.match_targets(model, list(given), f"{self.method}.target_modules")
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if (not isinstance(config, PromptLearningConfig) and hasattr(config, "target_modules")
                and config.target_modules is None and not _peft_knows(self.method, model_type)):
            if hasattr(config, "feedforward_modules"):  # IA3-style: needs to know which layers are FFN
                raise UnsupportedError(
                    field=f"{self.method}.target_modules", value=None,
                    problem=f"PEFT has no default targets for model type {model_type!r}",
                    fix="pass options={'target_modules': [...], 'feedforward_modules': [...]}")
            config.target_modules, config.exclude_modules = backbone_targets(model)
        elif getattr(config, "exclude_modules", "absent") is None:
            # PEFT's tables name leaves like "dense" that also occur inside heads (RoBERTa's
            # classifier.dense); adapting a head that is also in modules_to_save breaks merging
            config.exclude_modules = backbone_targets(model)[1]
        return config


def _peft_knows(method: str, model_type: str | None) -> bool:
    import peft.utils as pu
    table = getattr(pu, f"TRANSFORMERS_MODELS_TO_{method.upper()}_TARGET_MODULES_MAPPING", None)
    return bool(table) and model_type in table
