"""What trains stays fp32 on a bf16/fp16 base (docs/precision.md: why, and what is not upcast). New task heads are
upcast before the strategy is applied (PEFT then copies an fp32 head), anything else that trains after; an upcast
module casts its inputs to fp32."""

from __future__ import annotations

import torch
from torch import nn

from adaptkit import targets

LOW_PRECISION = (torch.bfloat16, torch.float16)


def _to_fp32(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    # a module-level function (not a closure): a deep-copied model keeps a working hook
    cast = lambda x: x.float() if isinstance(x, torch.Tensor) and x.dtype in LOW_PRECISION else x  # noqa: E731
    return tuple(cast(a) for a in args), {k: cast(v) for k, v in kwargs.items()}


def fp32_new_heads(model: nn.Module) -> list[str]:
    """Upcast the new task heads (``targets.new_head_names``: classifier, score, ...) of a bf16/fp16 model."""
    heads = tuple(targets.new_head_names(model))
    return _upcast(model, lambda name, p: any(name == h or name.startswith(h + ".") for h in heads))


def fp32_modules(model: nn.Module, names: list[str]) -> list[str]:
    """Upcast the modules a PEFT folder trains whole (``modules_to_save``, matched as in PEFT) before PEFT copies."""
    return _upcast(model, lambda name, p: any(f".{n}." in f".{name}" for n in names))


def keep_trainable_fp32(model: nn.Module) -> list[str]:
    """Upcast every bf16/fp16 parameter that trains, except one tied to the input embedding."""
    return _upcast(model, lambda name, p: p.requires_grad)


def _upcast(model: nn.Module, wanted) -> list[str]:
    """Upcast the low-precision parameters ``wanted`` selects (never a tied one) and cast their inputs to fp32."""
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    tied = {id(p) for p in embedding.parameters()} if isinstance(embedding, nn.Module) else set()
    upcast = []
    for module_name, module in model.named_modules():
        mine = [(n, p) for n, p in module.named_parameters(recurse=False)
                if p.dtype in LOW_PRECISION and id(p) not in tied
                and wanted(f"{module_name}.{n}" if module_name else n, p)]
        if not mine:
            continue
        for name, p in mine:
            p.data = p.data.float()
            upcast.append(f"{module_name}.{name}" if module_name else name)
        if not getattr(module, "_adaptkit_fp32_inputs", False):
            module.register_forward_pre_hook(_to_fp32, with_kwargs=True)
            module._adaptkit_fp32_inputs = True
    return upcast
