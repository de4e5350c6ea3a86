"""Finding task heads, linear layers and user-given targets (PEFT-style dotted-name suffixes, with "did you mean")
from a model's module tree, not from a table of known architectures."""

from __future__ import annotations

import difflib
import re

import torch
from torch import nn

from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils.other import ModulesToSaveWrapper
from transformers.pytorch_utils import Conv1D

from adaptkit.errors import TargetNotFoundError, UnsupportedError
from adaptkit.skeleton import task_of_class

LINEAR_TYPES = (nn.Linear, Conv1D)  # transformers' GPT-2 style Conv1D is a linear layer with a transposed weight


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, LINEAR_TYPES)


def linear_features(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) for nn.Linear and Conv1D (which stores (in, out)) alike."""
    linear = isinstance(module, nn.Linear)
    return (module.in_features, module.out_features) if linear else tuple(module.weight.shape[:2])


def base_module(model: nn.Module) -> nn.Module | None:
    """The backbone of a task model (``model.bert``, ``model.transformer``, ...), or None."""
    prefix = getattr(model, "base_model_prefix", "")
    inner = getattr(model, prefix, None) if prefix else None
    return inner if isinstance(inner, nn.Module) and inner is not model else None


def pooler_name(model: nn.Module) -> str | None:
    """Dotted name of the backbone's pooler (BERT's, which its head reads), or None (RoBERTa's head pools itself)."""
    pooler = getattr(base_module(model), "pooler", None)
    if not isinstance(pooler, nn.Module) or not any(True for _ in pooler.parameters()):
        return None
    return f"{model.base_model_prefix}.pooler"


def pooler_to_train(model: nn.Module, field: str) -> str | None:
    """:func:`pooler_name`, refused (``field``: the strategy's option) when it is quantized and so cannot train."""
    name = pooler_name(model)
    if name and not all(p.is_floating_point() for p in model.get_submodule(name).parameters()):
        raise UnsupportedError(field, True, f"the head reads {name}, which is quantized", "load with adaptkit."
                               "load_model (it keeps the pooler unquantized), or pass train_pooler=False")
    return name


def head_names(model: nn.Module) -> list[str]:
    """Top-level names of the task head(s), the children with parameters outside the backbone: ``["classifier"]``,
    DistilBERT's ``["pre_classifier", "classifier"]``, ``["lm_head"]``; ``[]`` for a bare backbone. T5 has no
    single backbone attribute: there the output embedding is the head."""
    backbone = base_module(model)
    if backbone is not None:
        names = [n for n, child in model.named_children()
                 if child is not backbone and any(True for _ in child.parameters())]
        if names:
            return names
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [n for n, child in model.named_children() if out is not None and child is out]


def new_head_names(model: nn.Module) -> list[str]:
    """Every head but a language-model head: those ``from_pretrained(num_labels=...)`` initialises freshly."""
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [n for n in head_names(model) if getattr(model, n) is not out]


def linear_names(model: nn.Module, exclude_heads: bool = True) -> list[str]:
    """Dotted names of every linear layer but the heads'; a PEFT-wrapped layer counts as the linear it wraps."""
    heads = tuple(head_names(model)) if exclude_heads else ()
    names, inside = [], ()
    for name, m in model.named_modules():
        if inside and any(name.startswith(p + ".") for p in inside):
            continue
        if isinstance(m, (BaseTunerLayer, ModulesToSaveWrapper)):
            inside += (name,)
            if isinstance(m, ModulesToSaveWrapper) or not is_linear(m.get_base_layer()):
                continue
        elif not is_linear(m):
            continue
        if not any(name == h or name.startswith(h + ".") for h in heads):
            names.append(name)
    return names


def unique_suffixes(model: nn.Module, names: list[str]) -> list[str]:
    """The shortest dotted suffixes that match exactly ``names`` among all module names (``query``, ``dense``,
    lengthened where it would also match something else, such as a head's ``dense``). Linear in the module count."""
    owners: dict[str, set[str]] = {}  # dotted suffix -> the module names it matches
    for n, _ in model.named_modules():
        parts = n.split(".") if n else []
        for k in range(1, len(parts) + 1):
            owners.setdefault(".".join(parts[-k:]), set()).add(n)
    wanted, exact, chosen = set(names), {}, set()
    for name in names:
        parts = name.split(".")
        for k in range(1, len(parts) + 1):
            suffix = ".".join(parts[-k:])
            if exact.get(suffix) or (suffix not in exact and exact.setdefault(suffix, owners[suffix] <= wanted)):
                chosen.add(suffix)
                break
    return sorted(chosen)


def hidden_size(model: nn.Module) -> int:
    values = (getattr(getattr(model, "config", None), a, None) for a in ("hidden_size", "d_model", "n_embd", "dim"))
    try:
        return next((v for v in values if isinstance(v, int)), None) or model.get_input_embeddings().embedding_dim
    except AttributeError:  # not a transformers model: no config, no input embeddings
        raise UnsupportedError("model", type(model).__name__, "its hidden size cannot be read",
                               "pass a transformers model") from None


def match_targets(model: nn.Module, names: list[str], field: str, candidates: list[str] | None = None) -> list[str]:
    """Refuse a target that matches no module (as PEFT matches: a dotted-name suffix), naming the closest."""
    all_names = [n for n, _ in model.named_modules() if n]
    pool = candidates if candidates is not None else all_names
    suffixes = sorted({".".join(n.split(".")[-k:]) for n in pool for k in (1, 2)})
    for target in names:
        if not any(n == target or n.endswith("." + target) for n in all_names):
            close = difflib.get_close_matches(target, suffixes, n=3, cutoff=0.5)
            leaf = sorted({n.split(".")[-1] for n in pool if not re.fullmatch(r"\d+", n.split(".")[-1])})
            hint = f"did you mean {' or '.join(map(repr, close))}? " if close else ""
            raise TargetNotFoundError(field, target, "matches no module in this model",
                                      f"{hint}its names include {leaf[:12]}")
    return list(names)


def numel(p: torch.Tensor) -> int:
    """How many weights a parameter holds (bitsandbytes 4-bit packs two per byte; quant_state has the shape)."""
    state = getattr(p, "quant_state", None)
    return int(torch.Size(state.shape).numel()) if state is not None and hasattr(state, "shape") else p.numel()


# adaptkit's task names (adaptkit.skeleton.TASKS) -> PEFT's TaskType
_PEFT_TASK_TYPES = {"seq_cls": "SEQ_CLS", "token_cls": "TOKEN_CLS", "qa": "QUESTION_ANS", "causal_lm": "CAUSAL_LM",
                    "seq2seq": "SEQ_2_SEQ_LM"}


def match_regex(model: nn.Module, pattern: str, field: str, linear: bool = True) -> str:
    """A string target, a regex PEFT full-matches against whole names: refused when it matches no linear layer (with
    ``linear=False``, no module at all: some methods adapt norms). PEFT's "No modules were targeted", with names."""
    names = linear_names(model) if linear else [n for n, _ in model.named_modules() if n]
    if any(re.fullmatch(pattern, n) for n in names):
        return pattern
    suffix = [n for n in names if n == pattern or n.endswith("." + pattern)]
    raise TargetNotFoundError(field, pattern, "a string is a regex full-matched against whole module names (as in "
                              f"PEFT) and matches no {'linear layer' if linear else 'module'}", f"pass a list "
                              f"({field}=[{pattern!r}] matches {len(suffix)} layers) or a regex like {'.*' + pattern!r}")


def peft_task_type(model: nn.Module) -> str | None:
    """PEFT's TaskType for a transformers model, from its class and config (None: plain backbone)."""
    return _PEFT_TASK_TYPES.get(task_of_class(type(model).__name__, getattr(model, "config", None)))
