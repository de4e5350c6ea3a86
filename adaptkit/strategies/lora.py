"""LoRA through PEFT: low-rank updates ``W + (alpha/r) B A`` on chosen linear layers, B zero at init. A fresh task
head trains in full (``modules_to_save``), and by default so does the pooler it reads (docs/strategies.md: why)."""

from __future__ import annotations

import dataclasses
import re
import typing

from torch import nn

from adaptkit import targets
from adaptkit.errors import ConfigError
from adaptkit.strategies import register
from adaptkit.strategies.base import PeftStrategy, pooler_if, type_ok

# initialisations whose adapter load() cannot rebuild on a fresh base from the saved tensors
NO_ROUND_TRIP = {
    "pissa_niter_": "its randomized SVD takes other residual base weights each time, so the base load() rebuilds "
                    "is not the one the adapter trained on",
    "corda": "it needs peft's preprocess_corda on data first, and changes base weights load() cannot rebuild",
    "loftq": "it replaces the base weights by quantized ones that load() cannot rebuild from the base",
}


def refuse_init(init, field: str) -> None:
    """Refuse an initialisation whose saved adapter would not load back as trained (see NO_ROUND_TRIP)."""
    if reason := next((why for key, why in NO_ROUND_TRIP.items() if str(init).startswith(key)), None):
        raise ConfigError(field, init, f"cannot round-trip through save and load: {reason}",
                          "use 'default', 'gaussian', 'pissa', 'olora', 'orthogonal' or 'eva'")


def backbone_targets(model: nn.Module, trained_whole: list[str] = ()) -> tuple[list[str], str | None]:
    """Short names matching every backbone linear layer and nothing else, plus a regex keeping the heads out
    (PEFT would otherwise wrap a head that is also in ``modules_to_save``). Found from the module tree.
    ``trained_whole``: backbone modules (the pooler) that train in full, so get no update as well."""
    inside = lambda name: any(name == m or name.startswith(m + ".") for m in trained_whole)  # noqa: E731
    leaves = targets.unique_suffixes(model, [n for n in targets.linear_names(model) if not inside(n)])
    heads = [*targets.head_names(model), *trained_whole]
    return leaves, (rf"({'|'.join(map(re.escape, heads))})(\..*)?" if heads else None)


def head_modules(model: nn.Module, given: list[str] | None, field: str) -> list[str] | None:
    """modules_to_save: the user's list, else the new (non-LM) heads, so they train and get saved."""
    if given is not None:
        return targets.match_targets(model, list(given), field) or None
    return targets.new_head_names(model) or None


@register
@dataclasses.dataclass
class LoRA(PeftStrategy):
    """Low-rank adapters; ``targets=None`` adapts every linear layer of the backbone, found from the module tree."""

    name = "lora"
    mergeable = True
    saved_before = {"train_pooler": False}  # folders saved before the option trained no pooler
    aliases = {"target_modules": "targets", "lora_alpha": "alpha", "lora_dropout": "dropout",
               "modules_to_save": "heads", "init_lora_weights": "init"}
    alias_values = {"init_lora_weights": lambda v: "default" if v is True else v}

    r: int = 8
    alpha: int = 16
    # 0, as in PEFT: LoRA dropout keeps a dropped copy of every adapted layer's input for backward, which on
    # MiniLM costs more activation memory than full fine-tuning saves in optimizer state (benchmarks/ratios.py)
    dropout: float = 0.0
    # names or dotted suffixes (a list), or, as in PEFT, one regex full-matched against whole module names
    targets: list[str] | str | None = None
    heads: list[str] | None = None  # trained + saved in full; None = the task head(s) found automatically
    train_pooler: bool = True       # with heads=None: the pooler a fresh head reads trains in full too
    use_dora: bool = False
    init: str = "default"  # PEFT's init_lora_weights: "default" (B = 0), "gaussian", "pissa", "eva", ...

    def validate(self) -> None:
        if self.r <= 0 or self.alpha <= 0:
            field, value = ("LoRA.r", self.r) if self.r <= 0 else ("LoRA.alpha", self.alpha)
            raise ConfigError(field, value, "must be positive", "use r=8 (typical 4-64), alpha=2*r")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError("LoRA.dropout", self.dropout, "must be in [0, 1)", "use 0.0 (or 0.05-0.1)")
        if isinstance(self.targets, str):
            try:
                re.compile(self.targets)
            except re.error as exc:
                raise ConfigError("LoRA.targets", self.targets, f"is not a regex: {exc}", "pass names") from None
        if self.targets is not None and not self.targets:
            raise ConfigError("LoRA.targets", self.targets, "is empty", "name modules, or None for every linear")
        from peft import LoraConfig
        inits = typing.get_args(typing.get_args(typing.get_type_hints(LoraConfig)["init_lora_weights"])[-1])
        if self.init != "default" and not type_ok(self.init, typing.Literal[inits]):
            raise ConfigError("LoRA.init", self.init, "is unknown to PEFT", f"use one of {['default', *inits]}")
        refuse_init(self.init, "LoRA.init")

    def peft_config(self, model: nn.Module):
        from peft import LoraConfig
        heads = head_modules(model, self.heads, "LoRA.heads")
        heads = heads and heads + pooler_if(self.train_pooler and self.heads is None, heads, model, "LoRA.train_pooler")
        # a backbone module trained in full (the pooler; a user's) gets no low-rank update on top
        whole = [h for h in heads or [] if h not in targets.head_names(model)]
        leaves, exclude = backbone_targets(model, whole)
        if self.targets is None:
            target_modules = leaves
        elif isinstance(self.targets, str):
            target_modules = targets.match_regex(model, self.targets, "LoRA.targets")
        else:
            target_modules = targets.match_targets(model, self.targets, "LoRA.targets", candidates=targets.linear_names(model))
            exclude = exclude if whole else None
        # GPT-2's Conv1D stores weights transposed; PEFT only warns and flips the flag itself
        fan_in_fan_out = any(isinstance(m, targets.Conv1D) for m in model.modules())
        config = LoraConfig(fan_in_fan_out=fan_in_fan_out, r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout,
                            target_modules=target_modules, exclude_modules=exclude, modules_to_save=heads,
                            task_type=targets.peft_task_type(model), use_dora=self.use_dora,
                            init_lora_weights=True if self.init == "default" else self.init)
        # an update B A of an (in x out) layer has rank <= min(in, out): a larger r only adds parameters (and, far
        # larger, allocates them until memory runs out). PEFT accepts it; refuse it before anything is built.
        from peft.tuners.tuners_utils import check_target_module_exists
        sizes = [(min(f), name, f) for name, m in model.named_modules() if targets.is_linear(m)
                 and check_target_module_exists(config, name) for f in [targets.linear_features(m)]]
        if sizes and self.r > min(sizes)[0]:
            rank, name, features = min(sizes)
            raise ConfigError("LoRA.r", self.r, f"exceeds the rank an update of {name} {features} can have ({rank})",
                              f"use r <= {rank}, or 'full'")
        return config
