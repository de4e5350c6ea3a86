"""Full fine-tuning: every parameter trains. The reference the other strategies are measured against."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from torch import nn

from adaptkit.errors import AdapterFormatError
from adaptkit.strategies import register
from adaptkit.strategies.base import WEIGHTS_NAME, Strategy


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

    # The whole state dict (buffers too, e.g. batch-norm statistics), tied weights written once.
    def save(self, model: nn.Module, directory: Path) -> None:
        from safetensors.torch import save_model
        save_model(model, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})

    def load(self, directory: Path, base_model: nn.Module) -> nn.Module:
        from safetensors.torch import load_model
        model = self.apply(base_model)
        missing, unexpected = load_model(model, str(directory / WEIGHTS_NAME), strict=False)
        if missing or unexpected:
            raise AdapterFormatError(field=str(directory / WEIGHTS_NAME),
                                     value={"missing": sorted(missing)[:5], "unexpected": sorted(unexpected)[:5]},
                                     problem="weights do not match the base model",
                                     fix="load into the same architecture (and num_labels) that was saved")
        return model

    def merge(self, model: nn.Module) -> nn.Module:
        return model
