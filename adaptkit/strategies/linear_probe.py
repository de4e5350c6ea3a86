"""Linear probe: the pretrained model is a fixed feature map; only the task head learns.

It trains no pooler, by definition; instead ``pooling`` says which features the head reads:

* ``"head"``: whatever the model's own head reads (on BERT-style models the first-token pooler);
* ``"mean"``: the attention-masked mean of the last hidden states, the embedding sentence-transformers
  checkpoints (all-MiniLM-L6-v2) are trained to produce; their pooler was never trained, so probing it wastes
  the model (SST-2 with MiniLM: 0.70 with it vs 0.78 mean-pooled, benchmarks/results/v1/REPORT.md). Needs a
  pooler layer to replace (BERT, MiniLM, ALBERT); the result is no transformers architecture, so no merge;
* ``"auto"`` (default): what the checkpoint says (``modules.json`` -> its Pooling config's
  ``pooling_mode_mean_tokens``: ``"mean"``; anything else ``"head"``), recorded as the choice made.

On a causal LM the head is ``lm_head``, usually tied to the input embeddings: probing it trains them too.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
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
            raise UnsupportedError(field="LinearProbe.heads", value=None, problem=f"{type(model).__name__} has no task "
                                   "head to train", fix="load a task model (e.g. AutoModelForSequenceClassification) "
                                   "or name the head modules")
        asked = self.pooling
        if asked == "auto":
            self.pooling, source = checkpoint_pooling(model)
        if self.pooling == "mean":
            if targets.pooler_name(model) is None:  # a mean pool in place holds no parameters: not counted as one
                raise UnsupportedError(field="LinearProbe.pooling", value=asked, problem=f"{type(model).__name__} has no"
                                       " pooler layer between its encoder and its head to replace" + (f"; the checkpoint"
                                       f" ({source}) pools by the mean of its tokens" if asked == "auto" else ""),
                                       fix="pass pooling='head', or use a BERT-style model (BERT, MiniLM, ALBERT, ...)")
            backbone = targets.base_module(model)
            backbone.pooler = MaskedMeanPool(backbone)
        model.requires_grad_(False)
        for full, module in model.named_modules():  # PEFT-style suffix match: "classifier" names model.classifier
            if any(full == name or full.endswith("." + name) for name in heads):
                module.requires_grad_(True)
        return model

    def merge(self, model: nn.Module) -> nn.Module:
        if self.pooling == "mean":
            raise NotMergeableError(field="LinearProbe.pooling", value=self.pooling, problem="a merged model must be a "
                                    "plain transformers model, and from_pretrained would put the first-token pooler back "
                                    "in place of the mean pooling the head was trained on", fix="keep the adapted "
                                    "model: adaptkit.save(model, dir) and adaptkit.load(dir, base) restore it")
        return model


class MaskedMeanPool(nn.Module):
    """Stands in for a backbone's pooler: the mean of the hidden states over the real (unmasked) tokens. A pooler
    gets the hidden states only, so the backbone's attention mask reaches it through a forward pre-hook (kept for
    one forward pass): without it padding would enter the mean, and features depend on the batch's lengths."""

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
            raise UnsupportedError(field="attention_mask", value=tuple(mask.shape), problem="mean pooling needs a "
                                   f"(batch, tokens) mask matching the hidden states {tuple(hidden_states.shape[:2])}",
                                   fix="pass the tokenizer's 2-D attention_mask, or use LinearProbe(pooling='head')")
        weights = mask.to(hidden_states.dtype).unsqueeze(-1)
        return (hidden_states * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)


def checkpoint_pooling(model: nn.Module) -> tuple[str, str]:
    """("mean" or "head", where that was read) from the sentence-transformers files of the folder the model was
    loaded from, or of the local hub cache for a hub id (nothing is downloaded). No ``modules.json``: "head"."""
    source = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", "")
    modules = _checkpoint_file(source, "modules.json")
    if modules is None:
        return "head", f"{source or 'the model'} has no sentence-transformers modules.json"
    try:
        (folder,) = [e.get("path", "") for e in json.loads(Path(modules).read_text())
                     if str(e.get("type", "")).endswith(".Pooling")]
        config = _checkpoint_file(source, f"{folder}/config.json" if folder else "config.json")
        mean = bool(config and json.loads(Path(config).read_text()).get("pooling_mode_mean_tokens"))
    except (OSError, ValueError, AttributeError, TypeError) as exc:
        raise UnsupportedError(field="LinearProbe.pooling", value="auto", problem=f"cannot read the pooling of "
                               f"{modules} ({type(exc).__name__}: {exc})", fix="pass pooling='mean' or 'head'") from exc
    return ("mean" if mean else "head"), str(modules)


def _checkpoint_file(source: str, name: str) -> str | None:
    folder = Path(source).expanduser() if source else None
    if folder is None or folder.is_dir():
        return str(folder / name) if folder is not None and (folder / name).is_file() else None
    from huggingface_hub import try_to_load_from_cache
    try:  # a hub id: only what is already in the local cache
        cached = try_to_load_from_cache(source, name)
    except Exception:  # noqa: BLE001 - not a valid repo id: a path that does not exist (any more)
        return None
    return cached if isinstance(cached, str) else None
