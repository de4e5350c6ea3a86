"""Prefix tuning through PEFT: trained key/value vectors prepended at every attention layer."""

from __future__ import annotations

import dataclasses

from torch import nn

from adaptkit import compat, targets
from adaptkit.errors import ConfigError, UnsupportedError
from adaptkit.strategies import register
from adaptkit.strategies.base import PeftStrategy
from adaptkit.strategies.lora import head_modules


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
        for key in ("num_virtual_tokens", "projection_hidden"):
            if (value := getattr(self, key)) is not None and value <= 0:
                raise ConfigError(f"Prefix.{key}", value, "must be positive", "use e.g. 20 (projection_hidden: None)")

    def peft_config(self, model: nn.Module):
        from peft import PrefixTuningConfig
        if getattr(model, "main_input_name", "input_ids") != "input_ids":
            raise UnsupportedError("strategy", f"prefix on {type(model).__name__}", "prefixes token sequences; this "
                                   f"model reads {model.main_input_name!r}", "use 'lora' or 'bottleneck'")
        backbone = targets.base_module(model)
        if not any(compat.takes_prefix(m) for m in (model, backbone) if m is not None):
            raise UnsupportedError("strategy", f"prefix on {type(model).__name__}", "its forward takes no "
                                   "past_key_values (nor cache) to fill", "use 'lora' or 'bottleneck'")
        compat.refuse_untested_transformers()  # before PEFT wraps anything (core applies compat.bridge after)
        if getattr(model, "is_activation_checkpointing", False):  # transformers >= 5.23; the old name warns
            raise UnsupportedError("gradient_checkpointing", True, "PEFT refuses prefix tuning with it",
                                   "call model.gradient_checkpointing_disable() before adapt, or use 'lora'")
        config = PrefixTuningConfig(
            task_type=targets.peft_task_type(model), num_virtual_tokens=self.num_virtual_tokens,
            prefix_projection=self.projection,
            encoder_hidden_size=self.projection_hidden or targets.hidden_size(model))
        config.modules_to_save = head_modules(model, self.heads, "Prefix.heads")
        return config
