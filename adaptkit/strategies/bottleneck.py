"""Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2021) as plain torch modules.

PEFT has no bottleneck adapters and AdapterHub's ``adapters`` cannot be installed beside transformers 5,
so they live here. An adapter is ``x + up(act(down(x)))`` with ``up`` zero-initialised, so an adapted
model computes exactly what its base computes until the first optimizer step.

Where adapters go is read from the model's structure, not from a table of architectures:

* an *attention module* is the outermost module whose own name matches ``/att/i`` (``attention``,
  ``attn``, ``self_attn``, ``SelfAttention``, ``EncDecAttention``) and that holds linear layers; its
  output projection is its last linear (registration order) whose output width is the hidden size;
* a *feed-forward down projection* is a linear outside every attention module that maps a wider input
  back to the hidden size (BERT ``output.dense``, T5 ``wo``, Llama ``down_proj``, GPT-2 ``mlp.c_proj``).

``pfeiffer`` adapts every feed-forward down projection; ``houlsby`` also every attention output
projection (T5's decoder has two per block: self- and cross-attention). Task heads are never adapted.

A fresh task head trains, and so does the backbone's pooler where the head reads one (BERT, MiniLM,
ALBERT: dense + tanh over the first token). RoBERTa's and DistilBERT's heads carry that layer
themselves and train it whole; left frozen, BERT's would put a fixed projection, for
all-MiniLM-L6-v2 one never trained on anything, between the adapters and the head. Measured with
that frozen pooler: CoLA MCC 0.000 at every rate from 1e-4 to 3e-2; with it trained, 0.268 (validation)
at 3e-3 (benchmarks/README.md). ``train_pooler=False`` keeps it frozen.

Each adapter is attached as a child of the linear it follows, plus a forward hook adding its output.
That keeps every base state-dict name unchanged and works the same on bitsandbytes' quantized linears
(``nn.Linear`` subclasses), since the quantized weight is never touched.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Literal

import torch
from torch import nn

from adaptkit import targets
from adaptkit.errors import AlreadyAdaptedError, ConfigError, UnsupportedError
from adaptkit.strategies import register
from adaptkit.strategies.base import MARKER, Strategy

ADAPTER_ATTR = "bottleneck_adapter"  # child name under the host linear -> "...dense.bottleneck_adapter.up.weight"
_ATTENTION = re.compile("att", re.IGNORECASE)


class BottleneckAdapter(nn.Module):
    """``h -> up(act(down(h)))``; the caller adds the residual. ``up`` starts at zero (exact identity)."""

    def __init__(self, hidden: int, bottleneck: int, activation: str, device: torch.device | None = None):
        super().__init__()
        from transformers.activations import ACT2FN
        # fp32 whatever the host's dtype: a quantized or bf16 base still trains fp32 adapters stably
        self.down = nn.Linear(hidden, bottleneck, device=device, dtype=torch.float32)
        self.act = ACT2FN[activation]
        self.up = nn.Linear(bottleneck, hidden, device=device, dtype=torch.float32)
        # down keeps nn.Linear's weight init but no bias: a random bias can switch every ReLU unit of a
        # narrow bottleneck off at once (a dead adapter that never learns) when the host's outputs are small
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.up(self.act(self.down(hidden)))


def _adapter_hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    # A module-level function (not a closure) that finds the adapter through ``module``: a deep-copied
    # or pickled model then calls its own adapter, not the original's.
    adapter = getattr(module, ADAPTER_ATTR)
    delta = adapter(output.to(adapter.up.weight.dtype))
    return output + delta.to(output.dtype)


def adapter_hosts(model: nn.Module, variant: str) -> list[str]:
    """Dotted names of the linears that get an adapter, in model order (see the module docstring)."""
    hidden = _hidden_size(model)
    heads = tuple(targets.head_names(model))
    attention_out: dict[str, str] = {}  # attention module name -> its output projection (last one wins)
    ffn_down: list[str] = []
    for name, module in model.named_modules():
        if not targets.is_linear(module) or any(name == h or name.startswith(h + ".") for h in heads):
            continue
        fan_in, fan_out = targets.linear_features(module)
        if fan_out != hidden:
            continue
        parts = name.split(".")
        inside = next((i for i, part in enumerate(parts[:-1]) if _ATTENTION.search(part)), None)
        if inside is not None:
            attention_out[".".join(parts[: inside + 1])] = name
        elif fan_in > fan_out:
            ffn_down.append(name)
    if not ffn_down:
        raise UnsupportedError(
            field="model", value=type(model).__name__,
            problem=f"no feed-forward down projection (a linear mapping a wider input to hidden size {hidden}, "
                    "outside attention and task heads) was found, so there is nowhere to put a bottleneck adapter",
            fix="use strategy 'lora' (with explicit targets) or 'linear_probe' for this model")
    if variant == "houlsby" and not attention_out:
        raise UnsupportedError(
            field="Bottleneck.variant", value=variant,
            problem=f"{type(model).__name__} has no module named like 'attention'/'attn' holding a linear "
                    f"with {hidden} outputs, so Houlsby's attention adapters have no place",
            fix="use variant='pfeiffer' (feed-forward adapters only)")
    hosts = ffn_down + (list(attention_out.values()) if variant == "houlsby" else [])
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    return sorted(hosts, key=order.__getitem__)


def _hidden_size(model: nn.Module) -> int:
    try:
        return targets.hidden_size(model)
    except AttributeError:  # not a transformers model: no config, no input embeddings
        raise UnsupportedError(field="model", value=type(model).__name__,
                               problem="its hidden size cannot be read (no config.hidden_size/d_model/n_embd/dim "
                                       "and no input embeddings)",
                               fix="pass a transformers model (AutoModel*.from_pretrained)") from None


def has_adapters(model: nn.Module) -> bool:
    return any(isinstance(m, BottleneckAdapter) for m in model.modules())


def remove_adapters(model: nn.Module) -> nn.Module:
    """Take every bottleneck adapter and its hook out again (in place); the base stays frozen as it is."""
    for module in list(model.modules()):
        if isinstance(getattr(module, ADAPTER_ATTR, None), BottleneckAdapter):
            delattr(module, ADAPTER_ATTR)
            for key, hook in list(module._forward_hooks.items()):
                if hook is _adapter_hook:
                    del module._forward_hooks[key]
    if hasattr(model, MARKER):
        delattr(model, MARKER)
    return model


@register
@dataclasses.dataclass
class Bottleneck(Strategy):
    """Bottleneck adapters after feed-forward (``pfeiffer``) or attention + feed-forward (``houlsby``) blocks.

    Bottleneck width is ``hidden // reduction_factor`` unless ``bottleneck_size`` is given. Trains the
    adapters, any freshly initialised task head and, with ``train_pooler`` (the default), the pooler such
    a head reads (module docstring); everything else is frozen.
    """

    name = "bottleneck"
    mergeable = False        # the activation makes an adapter nonlinear: nothing to fold into a weight
    supports_quantized = True

    saved_before = {"train_pooler": False}  # folders saved before the option trained no pooler

    variant: Literal["pfeiffer", "houlsby"] = "pfeiffer"
    reduction_factor: int = 16
    bottleneck_size: int | None = None
    activation: str = "relu"
    train_pooler: bool = True

    def validate(self) -> None:
        if self.reduction_factor < 1:
            raise ConfigError(field="Bottleneck.reduction_factor", value=self.reduction_factor,
                              problem="must be a positive integer", fix="use reduction_factor=16 (the default)")
        if self.bottleneck_size is not None and self.bottleneck_size < 1:
            raise ConfigError(field="Bottleneck.bottleneck_size", value=self.bottleneck_size,
                              problem="must be a positive integer or None",
                              fix="use bottleneck_size=None to size it from reduction_factor, or e.g. 64")
        from transformers.activations import ACT2FN
        if self.activation not in ACT2FN:
            raise ConfigError(field="Bottleneck.activation", value=self.activation,
                              problem="is not an activation transformers knows",
                              fix=f"choose one of {sorted(ACT2FN)}")

    def size_for(self, hidden: int) -> int:
        size = self.bottleneck_size if self.bottleneck_size is not None else hidden // self.reduction_factor
        if size < 1:
            raise ConfigError(field="Bottleneck.reduction_factor", value=self.reduction_factor,
                              problem=f"leaves no bottleneck for hidden size {hidden} ({hidden} // "
                                      f"{self.reduction_factor} = 0)",
                              fix=f"use a reduction_factor <= {hidden}, or set bottleneck_size")
        if size > hidden:  # refused before anything is allocated: 10**9 would ask for terabytes
            raise ConfigError(field="Bottleneck.bottleneck_size", value=size, problem=f"is wider than the hidden size "
                              f"{hidden}: not a bottleneck", fix=f"use a bottleneck_size <= {hidden}, e.g. {max(1, hidden // 16)}")
        return size

    def apply(self, model: nn.Module) -> nn.Module:
        if has_adapters(model):
            raise AlreadyAdaptedError(field="model", value=type(model).__name__,
                                      problem="already carries bottleneck adapters",
                                      fix="apply to a freshly loaded base model (adapters do not stack)")
        hosts = adapter_hosts(model, self.variant)  # raises before anything is changed
        hidden = _hidden_size(model)
        size = self.size_for(hidden)
        heads = targets.new_head_names(model)
        pooler = targets.pooler_to_train(model, "Bottleneck.train_pooler") if self.train_pooler and heads else None
        for p in model.parameters():
            p.requires_grad_(False)
        for name in hosts:
            host = model.get_submodule(name)
            device = next(host.parameters()).device
            adapter = BottleneckAdapter(hidden, size, self.activation, device=device)
            setattr(host, ADAPTER_ATTR, adapter.train(host.training))  # follow the model's train/eval mode
            host.register_forward_hook(_adapter_hook)
        # a fresh classifier left random would make the adapters learn around noise: train it too
        for head in heads:
            for p in getattr(model, head).parameters():
                p.requires_grad_(True)
        if pooler:
            model.get_submodule(pooler).requires_grad_(True)
        return model
