"""Linear probe: the pretrained model is a fixed feature map; only the task head learns."""

from __future__ import annotations

import dataclasses
import json
import os
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
    """Freeze everything except the task head (found from the model's structure, or named).

    ``pooling`` says which features the head reads:

    * ``"auto"`` (default): what the checkpoint was trained to produce. A sentence-transformers folder
      says it (``modules.json`` -> its Pooling module's ``config.json``): ``pooling_mode_mean_tokens``
      gives ``"mean"``; any other folder, or another pooling mode, gives ``"head"``. The choice is
      recorded in the strategy (so ``save`` writes ``"head"`` or ``"mean"``, never ``"auto"``).
    * ``"head"``: whatever the model's own head reads. On BERT-style models that is the
      pooler, a dense layer over the first token, trained by BERT's next-sentence objective.
    * ``"mean"``: the attention-masked mean of the last hidden states, the sentence embedding that
      sentence-transformers checkpoints (all-MiniLM-L6-v2 among them) are trained to produce. Their
      first-token pooler was never trained for anything, so probing it wastes the model (SST-2 with
      MiniLM: 0.70 with the CLS pooler vs 0.78 mean-pooled, benchmarks/results/v1/REPORT.md). Needs a
      backbone with a pooler layer to replace (BERT, MiniLM, ALBERT, ...); other models are refused. The result is not a transformers
      architecture any more, so ``merge`` refuses it: save and load it with adaptkit.

    On a causal LM the head is ``lm_head``, which is usually tied to the input embeddings: probing it
    trains the embedding matrix too, because they are one tensor.
    """

    name = "linear_probe"
    aliases = {"modules_to_save": "heads"}

    heads: list[str] | None = None
    pooling: Literal["auto", "head", "mean"] = "auto"

    @property
    def mergeable(self) -> bool:  # nothing to fold: merge() returns the plain model, unless the pooling changed
        return self.pooling != "mean"  # "auto" is resolved by apply, before a merge can be asked for

    def apply(self, model: nn.Module) -> nn.Module:
        heads = (targets.match_targets(model, self.heads, "LinearProbe.heads") if self.heads
                 else targets.head_names(model))
        if not heads:
            raise UnsupportedError(
                field="LinearProbe.heads", value=None,
                problem=f"{type(model).__name__} has no task head to train",
                fix="load a task model (e.g. AutoModelForSequenceClassification) or name the head modules")
        if self.pooling == "auto":
            self.pooling, source = checkpoint_pooling(model)
            if self.pooling == "mean" and not _has_pooler(model):
                raise UnsupportedError(
                    field="LinearProbe.pooling", value="auto",
                    problem=f"the checkpoint ({source}) pools by the mean of its tokens, but "
                            f"{type(model).__name__} has no pooler layer to replace with that mean",
                    fix="pass pooling='head' to probe the model's own head features, or use 'lora'")
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
        if self.pooling == "mean":
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


def checkpoint_pooling(model: nn.Module) -> tuple[str, str]:
    """("mean" or "head", where that was read) from the sentence-transformers files beside the checkpoint.

    Read from the folder the model was loaded from, or from the local hub cache for a hub id; nothing is
    downloaded. A folder without ``modules.json`` is a plain transformers checkpoint: its head is "head".
    """
    source = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", "")
    modules = _checkpoint_file(source, "modules.json")
    if modules is None:
        return "head", f"{source or 'the model'} has no sentence-transformers modules.json"
    try:
        entries = json.loads(Path(modules).read_text())
        (pooling_dir,) = [e.get("path", "") for e in entries if str(e.get("type", "")).endswith(".Pooling")]
        config_file = _checkpoint_file(source, f"{pooling_dir}/config.json" if pooling_dir else "config.json")
        mean = bool(config_file and json.loads(Path(config_file).read_text()).get("pooling_mode_mean_tokens"))
    except (OSError, ValueError, AttributeError, TypeError) as exc:
        raise UnsupportedError(
            field="LinearProbe.pooling", value="auto",
            problem=f"cannot read the pooling of {modules} ({type(exc).__name__}: {exc})",
            fix="pass pooling='mean' or pooling='head'") from exc
    return ("mean" if mean else "head"), str(modules)


def _checkpoint_file(source: str, name: str) -> str | None:
    if not source:
        return None
    folder = Path(os.path.expanduser(source))
    if folder.is_dir():
        path = folder / name
        return str(path) if path.is_file() else None
    try:  # a hub id: only what is already in the local cache
        from huggingface_hub import try_to_load_from_cache
        cached = try_to_load_from_cache(source, name)
    except Exception:  # not a valid repo id: a path that does not exist (any more)
        return None
    return cached if isinstance(cached, str) else None


def _has_pooler(model: nn.Module) -> bool:
    # a mean pool already in place holds no parameters, so targets does not count it as a pooler
    return targets.pooler_name(model) is not None


def _pool_by_mean(model: nn.Module) -> None:
    backbone = targets.base_module(model)
    if not _has_pooler(model):
        raise UnsupportedError(
            field="LinearProbe.pooling", value="mean",
            problem=f"{type(model).__name__} has no pooler layer between its encoder and its head to replace "
                    "(RoBERTa's and DistilBERT's heads read the first token themselves)",
            fix="use pooling='head', or a BERT-style model (BERT, MiniLM, ALBERT, ...)")
    backbone.pooler = MaskedMeanPool(backbone)
