"""How many tokens a model can read: a learned position table (BERT, GPT-2) has no row past its last, and prefix or
prompt tuning's virtual tokens take positions too. Rotary or relative positions (Llama, T5) have no limit here."""

from __future__ import annotations

from typing import Any

from torch import nn

from adaptkit.errors import ConfigError

_TABLE_NAMES = ("position_embeddings", "wpe", "embed_positions")


def max_positions(model: nn.Module) -> int | None:
    """Rows of the model's learned position table that token positions can use; None without a table."""
    config = getattr(model, "config", None)
    if getattr(config, "position_embedding_type", "absolute") not in ("absolute", None):
        return None
    for name, module in model.named_modules():
        if isinstance(module, nn.Embedding) and name.rsplit(".", 1)[-1] in _TABLE_NAMES:
            # RoBERTa-style tables number positions from padding_idx + 1 (514 rows, 512 usable)
            offset = module.padding_idx + 1 if module.padding_idx is not None else 0
            offset += getattr(module, "offset", 0)  # BART's learned table keeps 2 extra rows
            return module.num_embeddings - offset
    return None


def virtual_tokens(model_or_strategy: Any) -> int:
    """Positions a prompt-learning adapter (prefix, prompt tuning, P-tuning) puts before the text; else 0."""
    peft_config = getattr(model_or_strategy, "peft_config", None)
    if isinstance(peft_config, dict):  # an adapted PeftModel: its active adapter
        active = peft_config.get(getattr(model_or_strategy, "active_adapter", "default"))
        return int(getattr(active, "num_virtual_tokens", 0) or 0) if getattr(active, "is_prompt_learning", False) else 0
    count = getattr(model_or_strategy, "num_virtual_tokens", None)  # adaptkit.Prefix, a PeftConfig
    options = getattr(model_or_strategy, "options", None)
    if count is None and isinstance(options, dict):  # adaptkit.PeftMethod: its validate() fills the count in
        count = options.get("num_virtual_tokens")
    return count if isinstance(count, int) else 0


def length_error(model: nn.Module, length: int, strategy: Any = None, field: str = "max_length") -> ConfigError | None:
    """The error for ``length`` tokens (plus the strategy's virtual tokens) on ``model``, or None when they fit."""
    limit = max_positions(model)
    extra = virtual_tokens(strategy if strategy is not None else model)
    if limit is None or length + extra <= limit:
        return None
    room = limit - extra
    because = f" + {extra} virtual tokens of the prefix/prompt = {length + extra}" if extra else ""
    fix = f"use {field} <= {room}" if room > 0 else "use fewer virtual tokens"
    if extra and room > 0:
        fix += f", or fewer virtual tokens (num_virtual_tokens <= {limit - length})" if limit > length else ""
    name = type(model.get_base_model() if hasattr(model, "get_base_model") else model).__name__
    return ConfigError(field, length, f"{length}{because} tokens do not fit {name}'s {limit} positions", fix)


def check_length(model: nn.Module, length: int, strategy: Any = None, field: str = "max_length") -> None:
    if error := length_error(model, length, strategy, field):
        raise error
