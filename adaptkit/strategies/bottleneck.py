"""Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2021) as plain torch modules (docs/strategies.md: why
ours, and why the pooler a fresh head reads trains too). ``pfeiffer`` follows every feed-forward down projection (a
linear outside attention from a wider input to the hidden size: BERT ``output.dense``, T5 ``wo``, GPT-2
``mlp.c_proj``); ``houlsby`` also each attention module's last linear of hidden-size output. Each adapter is a child
of its linear, run by a forward hook: state-dict names stay, quantized linears work unchanged.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
from typing import Literal

import torch
from torch import nn
from transformers.activations import ACT2FN

from adaptkit import targets
from adaptkit.errors import AlreadyAdaptedError, ConfigError, UnsupportedError
from adaptkit.strategies import register
from adaptkit.strategies.base import Strategy, pooler_if

ADAPTER_ATTR = "bottleneck_adapter"  # child name under the host linear -> "...dense.bottleneck_adapter.up.weight"


class BottleneckAdapter(nn.Module):
    """``h -> up(act(down(h)))``; the caller adds the residual. ``up`` starts at zero (exact identity)."""

    def __init__(self, hidden: int, bottleneck: int, activation: str, device: torch.device | None = None):
        super().__init__()
        # fp32 whatever the host's dtype: a quantized or bf16 base still trains fp32 adapters stably
        self.down = nn.Linear(hidden, bottleneck, device=device, dtype=torch.float32)
        self.act = ACT2FN[activation]
        self.up = nn.Linear(bottleneck, hidden, device=device, dtype=torch.float32)
        # no random bias on down: it can switch every ReLU unit of a narrow bottleneck off at once (a dead adapter)
        for tensor in (self.down.bias, self.up.weight, self.up.bias):
            nn.init.zeros_(tensor)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.up(self.act(self.down(hidden)))


def _adapter_hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    # module-level and found through ``module``: a deep-copied or pickled model calls its own adapter
    adapter = getattr(module, ADAPTER_ATTR)
    return output + adapter(output.to(adapter.up.weight.dtype)).to(output.dtype)


def adapter_hosts(model: nn.Module, variant: str) -> list[str]:
    """Dotted names of the linears that get an adapter, in model order (see the module docstring)."""
    hidden, heads = targets.hidden_size(model), tuple(h + "." for h in targets.head_names(model))
    attention_out: dict[str, str] = {}  # attention module -> its output projection (the last one wins)
    ffn_down: list[str] = []
    for name, module in model.named_modules():
        if not targets.is_linear(module) or (name + ".").startswith(heads):
            continue
        fan_in, fan_out = targets.linear_features(module)
        parts = name.split(".")
        inside = next((i for i, part in enumerate(parts[:-1]) if re.search("att", part, re.IGNORECASE)), None)
        if fan_out == hidden and inside is not None:
            attention_out[".".join(parts[: inside + 1])] = name
        elif fan_out == hidden and fan_in > fan_out:
            ffn_down.append(name)
    if not ffn_down:
        raise UnsupportedError("model", type(model).__name__, "no feed-forward down projection (a linear from a wider "
                               f"input to hidden size {hidden}) to follow", "use 'lora' or 'linear_probe'")
    if variant == "houlsby" and not attention_out:
        raise UnsupportedError("Bottleneck.variant", variant, f"{type(model).__name__} has no module named like "
                               f"'attention'/'attn' with a linear of {hidden} outputs", "use variant='pfeiffer'")
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    return sorted(ffn_down + (list(attention_out.values()) if variant == "houlsby" else []), key=order.__getitem__)


def has_adapters(model: nn.Module) -> bool:
    return any(isinstance(m, BottleneckAdapter) for m in model.modules())


@contextlib.contextmanager
def adapters_off(model: nn.Module):
    """Run ``model`` without its bottleneck adapters inside the ``with`` (their hooks detached, then put back)."""
    removed = [(m, key, m._forward_hooks.pop(key)) for m in model.modules()  # torch: no public hook lookup
               for key, hook in list(m._forward_hooks.items()) if hook is _adapter_hook]
    try:
        yield
    finally:
        for module, key, hook in removed:
            module._forward_hooks[key] = hook


@register
@dataclasses.dataclass
class Bottleneck(Strategy):
    """Adapters of width ``hidden // reduction_factor`` (or ``bottleneck_size``). Trains them, any fresh task head
    and, with ``train_pooler``, the pooler it reads; everything else is frozen."""

    name = "bottleneck"
    mergeable = False        # the activation makes an adapter nonlinear: nothing to fold into a weight
    saved_before = {"train_pooler": False}  # folders saved before the option trained no pooler

    variant: Literal["pfeiffer", "houlsby"] = "pfeiffer"
    reduction_factor: int = 16
    bottleneck_size: int | None = None
    activation: str = "relu"
    train_pooler: bool = True

    def validate(self) -> None:
        for key in ("reduction_factor", "bottleneck_size"):
            if (value := getattr(self, key)) is not None and value < 1:
                raise ConfigError(f"Bottleneck.{key}", value, "must be a positive integer", "use e.g. 16 (or None)")
        if self.activation not in ACT2FN:
            raise ConfigError("Bottleneck.activation", self.activation, "is unknown", f"choose one of {sorted(ACT2FN)}")

    def size_for(self, hidden: int) -> int:
        size = self.bottleneck_size if self.bottleneck_size is not None else hidden // self.reduction_factor
        if size < 1:
            raise ConfigError("Bottleneck.reduction_factor", self.reduction_factor, "leaves no bottleneck for hidden "
                              f"size {hidden}", f"use a reduction_factor <= {hidden}")
        if size > hidden:  # refused before anything is allocated: 10**9 would ask for terabytes
            raise ConfigError("Bottleneck.bottleneck_size", size, f"is wider than the hidden size {hidden}",
                              f"use a bottleneck_size <= {hidden}")
        return size

    def apply(self, model: nn.Module) -> nn.Module:
        if has_adapters(model):
            raise AlreadyAdaptedError("model", type(model).__name__, "already carries bottleneck adapters", "reload it")
        hosts, hidden = adapter_hosts(model, self.variant), targets.hidden_size(model)  # raise before anything changes
        size, heads = self.size_for(hidden), targets.new_head_names(model)
        # a fresh classifier left random would make the adapters learn around noise: it trains too
        trained = heads + pooler_if(self.train_pooler, heads, model, "Bottleneck.train_pooler")
        model.requires_grad_(False)
        for name in hosts:
            host = model.get_submodule(name)
            adapter = BottleneckAdapter(hidden, size, self.activation, device=next(host.parameters()).device)
            setattr(host, ADAPTER_ATTR, adapter.train(host.training))  # follow the model's train/eval mode
            host.register_forward_hook(_adapter_hook)
        for module in trained:
            model.get_submodule(module).requires_grad_(True)
        return model
