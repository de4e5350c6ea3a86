"""Linear probe: the pretrained model is a fixed feature map; only the task head learns."""

from __future__ import annotations

import dataclasses

from torch import nn

from adaptkit import targets
from adaptkit.errors import UnsupportedError
from adaptkit.strategies import register
from adaptkit.strategies.base import Strategy


@register
@dataclasses.dataclass
class LinearProbe(Strategy):
    """Freeze everything except the task head (found from the model's structure, or named).

    On a causal LM the head is ``lm_head``, which is usually tied to the input embeddings: probing it
    trains the embedding matrix too, because they are one tensor.
    """

    name = "linear_probe"
    mergeable = True  # nothing to fold: merge() just returns the plain model

    heads: list[str] | None = None

    def apply(self, model: nn.Module) -> nn.Module:
        heads = (targets.match_targets(model, self.heads, "LinearProbe.heads") if self.heads
                 else targets.head_names(model))
        if not heads:
            raise UnsupportedError(
                field="LinearProbe.heads", value=None,
                problem=f"{type(model).__name__} has no task head to train",
                fix="load a task model (e.g. AutoModelForSequenceClassification) or name the head modules")
        model.requires_grad_(False)
        modules = dict(model.named_modules())
        for name in heads:
            # PEFT-style suffix match: "classifier" names model.classifier
            for full, module in modules.items():
                if full == name or full.endswith("." + name):
                    module.requires_grad_(True)
        return model

    def merge(self, model: nn.Module) -> nn.Module:
        return model
