"""Full fine-tuning: every parameter trains. The reference the other strategies are measured against."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from safetensors.torch import load_model, save_file, save_model
from torch import nn

from adaptkit.errors import AdapterFormatError
from adaptkit.strategies import register
from adaptkit.strategies.base import Strategy, weights_file


@register
@dataclasses.dataclass
class Full(Strategy):
    """Everything trainable. Refused on 8-bit/4-bit models: quantized weights cannot take gradient steps."""

    name = "full"
    mergeable = True
    supports_quantized = False
    freezes_base = False

    def apply(self, model: nn.Module) -> nn.Module:
        return model.requires_grad_(True)

    def save(self, model: nn.Module, directory: Path, state_dict: dict | None = None) -> None:
        """The whole state dict (buffers too, tied weights once) under the live model's names, the ones the stock
        Trainer reloads with (transformers' save_pretrained may rename keys to an older hub layout, e.g. ViT's);
        with the model's config.json beside it from_pretrained loads the folder exactly."""
        path = str(directory / self.weights_name)
        if state_dict is None:
            save_model(model, path, metadata={"format": "pt"})
        else:
            names = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
            save_file({k: v.contiguous() for k, v in state_dict.items() if k in names}, path, metadata={"format": "pt"})
        if hasattr(getattr(model, "config", None), "save_pretrained"):
            model.config.save_pretrained(str(directory))
        if getattr(model, "can_generate", lambda: False)() and hasattr(model, "generation_config"):
            model.generation_config.save_pretrained(str(directory))

    def load(self, directory: Path, base_model: nn.Module) -> nn.Module:
        model, path = self.apply(base_model), weights_file(directory, self)
        missing, unexpected = load_model(model, str(path), strict=False)
        if hasattr(model, "tie_weights"):  # transformers writes tied weights once
            model.tie_weights()
            tied = {n for n, _ in model.named_parameters(remove_duplicate=False)} - {n for n, _ in model.named_parameters()}
            missing = [m for m in missing if m not in tied]
        if missing or unexpected:
            raise AdapterFormatError(str(path), {"missing": sorted(missing)[:5], "unexpected": sorted(unexpected)[:5]},
                                     "weights do not match the base model", "load into the saved architecture")
        return model

    def merge(self, model: nn.Module) -> nn.Module:
        return model
