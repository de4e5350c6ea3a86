"""Linear probe: the pretrained model is a fixed feature map; only the task head learns (no pooler, by definition).
``pooling`` ("head", "mean" or "auto": what the checkpoint's sentence-transformers ``modules.json`` says) and why
mean pooling matters for MiniLM: docs/strategies.md."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Literal

import torch
from torch import nn
from transformers.utils import cached_file

from adaptkit import targets
from adaptkit.errors import NotMergeableError, UnsupportedError
from adaptkit.strategies import register
from adaptkit.strategies.base import Strategy


@register
@dataclasses.dataclass
class LinearProbe(Strategy):
    """Freeze everything except the task head (found from the model's structure, or named)."""

    name = "linear_probe"
    aliases = {"modules_to_save": "heads"}

    heads: list[str] | None = None
    pooling: Literal["auto", "head", "mean"] = "auto"

    @property
    def mergeable(self) -> bool:  # nothing to fold: merge() returns the plain model, unless the pooling changed
        return self.pooling != "mean"  # "auto" is resolved by apply, before a merge can be asked for

    def apply(self, model: nn.Module) -> nn.Module:
        heads = targets.match_targets(model, self.heads, "LinearProbe.heads") if self.heads else targets.head_names(model)
        if not heads:
            raise UnsupportedError("LinearProbe.heads", None, f"{type(model).__name__} has no task head to train",
                                   "load a task model (AutoModelFor...) or name the heads")
        asked = self.pooling
        if asked == "auto":
            self.pooling, source = checkpoint_pooling(model)
        if self.pooling == "mean":
            if targets.pooler_name(model) is None:  # a mean pool in place holds no parameters: not counted as one
                raise UnsupportedError("LinearProbe.pooling", asked, f"{type(model).__name__} has no pooler to replace"
                                       + (f"; {source} pools by the mean" if asked == "auto" else ""),
                                       "pass pooling='head', or use a BERT-style model")
            backbone = targets.base_module(model)
            backbone.pooler = MaskedMeanPool(backbone)
        model.requires_grad_(False)
        for full, module in model.named_modules():  # PEFT-style suffix match: "classifier" names model.classifier
            if any(full == name or full.endswith("." + name) for name in heads):
                module.requires_grad_(True)
        return model

    def merge(self, model: nn.Module) -> nn.Module:
        if self.pooling == "mean":
            raise NotMergeableError("LinearProbe.pooling", self.pooling, "a plain transformers model would pool the "
                                    "first token", "keep the adapted model (adaptkit.save and adaptkit.load)")
        return model


class MaskedMeanPool(nn.Module):
    """A backbone's pooler replaced by the mean over the real tokens. The backbone's attention mask reaches it
    through a forward pre-hook (for one pass): unmasked, padding enters the mean and features depend on the batch."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self._mask: torch.Tensor | None = None
        backbone.register_forward_pre_hook(self._remember_mask, with_kwargs=True)
        backbone.register_forward_hook(self._forget_mask)

    def _remember_mask(self, module, args, kwargs):
        mask = kwargs.get("attention_mask")  # or BertModel.forward(input_ids, attention_mask, ...)
        self._mask = args[1] if mask is None and len(args) > 1 and isinstance(args[1], torch.Tensor) else mask

    def _forget_mask(self, module, args, output):
        self._mask = None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        mask = self._mask
        if mask is None:
            return hidden_states.mean(dim=1)
        if mask.dim() != 2 or mask.shape != hidden_states.shape[:2]:
            raise UnsupportedError("attention_mask", tuple(mask.shape), f"is not {tuple(hidden_states.shape[:2])}",
                                   "pass the tokenizer's 2-D attention_mask")
        weights = mask.to(hidden_states.dtype).unsqueeze(-1)
        return (hidden_states * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)


def checkpoint_pooling(model: nn.Module) -> tuple[str, str]:
    """("mean" or "head", where read): the Pooling module's ``pooling_mode_mean_tokens`` in the sentence-transformers
    ``modules.json`` of the model's folder or local hub cache (nothing is downloaded); none: "head"."""
    source = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", "")

    def find(name: str) -> str | None:
        try:
            return cached_file(source, name, local_files_only=True) if source else None
        except (OSError, ValueError):  # not there, or not a folder nor a valid repo id
            return None

    if (modules := find("modules.json")) is None:
        return "head", f"{source or 'the model'} has no sentence-transformers modules.json"
    try:
        (folder,) = [e.get("path", "") for e in json.loads(Path(modules).read_text())
                     if str(e.get("type", "")).endswith(".Pooling")]
        config = find(f"{folder}/config.json" if folder else "config.json")
        mean = bool(config and json.loads(Path(config).read_text()).get("pooling_mode_mean_tokens"))
    except (OSError, ValueError, AttributeError, TypeError) as exc:
        raise UnsupportedError("LinearProbe.pooling", "auto", f"cannot read the pooling of {modules} "
                               f"({type(exc).__name__}: {exc})", "pass pooling='mean' or 'head'") from exc
    return ("mean" if mean else "head"), str(modules)
