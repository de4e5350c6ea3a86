"""Prefix tuning through PEFT: trained key/value vectors prepended at every attention layer."""

from __future__ import annotations

import dataclasses

from torch import nn

from adaptkit import compat, targets
from adaptkit.errors import ConfigError, UnsupportedError
from adaptkit.strategies import register
from adaptkit.strategies.base import PeftStrategy
from adaptkit.strategies.lora import head_modules


def _checkpointing(model: nn.Module) -> bool:
    # transformers 5 renamed the flag; reading the old name only warns
    attr = "is_activation_checkpointing" if hasattr(type(model), "is_activation_checkpointing") else "is_gradient_checkpointing"
    return bool(getattr(model, attr, False))


@register
@dataclasses.dataclass
class Prefix(PeftStrategy):
    """Prefix tuning (Li & Liang, 2021). Works on encoders, decoders and encoder-decoders that take
    token ids; image models have no token sequence to prefix and are refused."""

    name = "prefix"
    mergeable = False
    aliases = {"prefix_projection": "projection", "encoder_hidden_size": "projection_hidden",
               "modules_to_save": "heads"}

    num_virtual_tokens: int = 20
    projection: bool = False          # reparametrise through an MLP (more params, often more stable)
    projection_hidden: int | None = None
    heads: list[str] | None = None

    def validate(self) -> None:
        if self.num_virtual_tokens <= 0:
            raise ConfigError(field="Prefix.num_virtual_tokens", value=self.num_virtual_tokens,
                              problem="must be positive", fix="use 20 (typical 10-100)")
        if self.projection_hidden is not None and self.projection_hidden <= 0:
            raise ConfigError(field="Prefix.projection_hidden", value=self.projection_hidden,
                              problem="must be positive", fix="leave it None (= hidden size)")

    def peft_config(self, model: nn.Module):
        from peft import PrefixTuningConfig
        if getattr(model, "main_input_name", "input_ids") != "input_ids":
            raise UnsupportedError(
                field="strategy", value=f"prefix on {type(model).__name__}",
                problem=f"prefix tuning prefixes token sequences; this model reads {model.main_input_name!r}",
                fix="use 'lora', 'bottleneck' or 'linear_probe' for image models")
        backbone = targets.base_module(model)
        if not any(compat.takes_prefix(m) for m in (model, backbone) if m is not None):
            raise UnsupportedError(
                field="strategy", value=f"prefix on {type(model).__name__}",
                problem="the model's forward takes no past_key_values (or cache), which prefix tuning fills",
                fix="use 'lora' or 'bottleneck' for this architecture")
        compat.refuse_untested_transformers()  # before PEFT wraps anything (core applies compat.bridge after)
        if _checkpointing(model):
            raise UnsupportedError(
                field="gradient_checkpointing", value=True, problem="PEFT refuses prefix tuning with it",
                fix="call model.gradient_checkpointing_disable() before adapt, or use 'lora'")
        config = PrefixTuningConfig(
            task_type=targets.peft_task_type(model), num_virtual_tokens=self.num_virtual_tokens,
            prefix_projection=self.projection,
            encoder_hidden_size=self.projection_hidden or targets.hidden_size(model))
        config.modules_to_save = head_modules(model, self.heads, "Prefix.heads")
        return config
