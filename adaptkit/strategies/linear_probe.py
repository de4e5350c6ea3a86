"""Linear probe: the pretrained model is a fixed feature map; only the task head learns."""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch
from torch import nn

from adaptkit import targets
from adaptkit.errors import NotMergeableError, UnsupportedError
from adaptkit.strategies import register
from adaptkit.strategies.base import Strategy


@register
@dataclasses.dataclass
class LinearProbe(Strategy):
    """Freeze everything except the task head (found from the model's structure, or named).

    ``pooling`` says which features the head reads:

    * ``"head"`` (default): whatever the model's own head reads. On BERT-style models that is the
      pooler, a dense layer over the first token, trained by BERT's next-sentence objective.
    * ``"mean"``: the attention-masked mean of the last hidden states, the sentence embedding that
      sentence-transformers checkpoints (all-MiniLM-L6-v2 among them) are trained to produce. Their
      first-token pooler was never trained for anything, so probing it wastes the model (SST-2 with
      MiniLM: see benchmarks/results/REPORT.md). Needs a backbone with a pooler layer to replace
      (BERT, MiniLM, ALBERT, ...); other models are refused. The result is not a transformers
      architecture any more, so ``merge`` refuses it: save and load it with adaptkit.

    On a causal LM the head is ``lm_head``, which is usually tied to the input embeddings: probing it
    trains the embedding matrix too, because they are one tensor.
    """

    name = "linear_probe"

    heads: list[str] | None = None
    pooling: Literal["head", "mean"] = "head"

    @property
    def mergeable(self) -> bool:  # nothing to fold: merge() returns the plain model, unless the pooling changed
        return self.pooling == "head"

    def apply(self, model: nn.Module) -> nn.Module:
        heads = (targets.match_targets(model, self.heads, "LinearProbe.heads") if self.heads
                 else targets.head_names(model))
        if not heads:
            raise UnsupportedError(
                field="LinearProbe.heads", value=None,
                problem=f"{type(model).__name__} has no task head to train",
                fix="load a task model (e.g. AutoModelForSequenceClassification) or name the head modules")
        if self.pooling == "mean":
            _pool_by_mean(model)
        model.requires_grad_(False)
        modules = dict(model.named_modules())
        for name in heads:
            # PEFT-style suffix match: "classifier" names model.classifier
            for full, module in modules.items():
                if full == name or full.endswith("." + name):
                    module.requires_grad_(True)
        return model

    def merge(self, model: nn.Module) -> nn.Module:
        if self.pooling != "head":
            raise NotMergeableError(
                field="LinearProbe.pooling", value=self.pooling,
                problem="a merged model must be a plain transformers model, and from_pretrained would put the "
                        "first-token pooler back in place of the mean pooling the head was trained on",
                fix="keep the adapted model: adaptkit.save(model, dir) and adaptkit.load(dir, base) restore it")
        return model


class MaskedMeanPool(nn.Module):
    """Stands in for a backbone's pooler: the mean of the hidden states over the real (unmasked) tokens.

    A pooler is called with the hidden states only, so the backbone's attention mask reaches it through
    a forward pre-hook on the backbone (set for the duration of one forward pass, then dropped). Without
    the mask, padded positions would enter the mean and a sentence's features would depend on how
    long the other sentences in its batch are.
    """

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self._mask: torch.Tensor | None = None
        backbone.register_forward_pre_hook(self._remember_mask, with_kwargs=True)
        backbone.register_forward_hook(self._forget_mask)

    def _remember_mask(self, module, args, kwargs):
        mask = kwargs.get("attention_mask")
        if mask is None and len(args) > 1 and isinstance(args[1], torch.Tensor):
            mask = args[1]  # BertModel.forward(input_ids, attention_mask, ...)
        self._mask = mask

    def _forget_mask(self, module, args, output):
        self._mask = None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        mask = self._mask
        if mask is None:
            return hidden_states.mean(dim=1)
        if mask.dim() != 2 or mask.shape != hidden_states.shape[:2]:
            raise UnsupportedError(field="attention_mask", value=tuple(mask.shape),
                                   problem=f"mean pooling needs a (batch, tokens) mask matching the hidden states "
                                           f"{tuple(hidden_states.shape[:2])}",
                                   fix="pass the tokenizer's 2-D attention_mask, or use LinearProbe(pooling='head')")
        weights = mask.to(hidden_states.dtype).unsqueeze(-1)
        return (hidden_states * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)


def _pool_by_mean(model: nn.Module) -> None:
    backbone = targets.base_module(model)
    pooler = getattr(backbone, "pooler", None) if backbone is not None else None
    if not isinstance(pooler, nn.Module) or isinstance(pooler, MaskedMeanPool):
        raise UnsupportedError(
            field="LinearProbe.pooling", value="mean",
            problem=f"{type(model).__name__} has no pooler layer between its encoder and its head to replace "
                    "(RoBERTa's and DistilBERT's heads read the first token themselves)",
            fix="use pooling='head', or a BERT-style model (BERT, MiniLM, ALBERT, ...)")
    backbone.pooler = MaskedMeanPool(backbone)
