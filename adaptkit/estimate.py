"""``adaptkit.estimate``: peak training memory and relative step cost of every strategy, from the config alone.

Two training steps run on the ``meta`` device (docs/check-and-estimate.md): a dispatch mode follows every tensor
torch creates and frees, so the peak of live bytes in step 2 is counted, not guessed. 8-bit weights count 1 byte +
an fp32 scale per row, 4-bit 0.5 byte + one per 64 weights. Attention is traced as the device runs it (fused on
CUDA, and on CPU without dropout or a trained bias); bitsandbytes kernels are not. A model whose Python code needs
real values (``.item()``, ``nonzero``: BART's attention masks, DeBERTa-v2's classification loss, T5's sequence
classifier) gets a BERT-calibrated formula instead, and its row says ``method="formula"``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import weakref
from typing import Any
from unittest import mock

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count
from transformers import PreTrainedModel

from adaptkit import lengths, targets
from adaptkit.check import quantization_of
from adaptkit.core import adapt, resolve, summary
from adaptkit.errors import AdaptkitError, ConfigError
from adaptkit.skeleton import Skeleton, dtype_of, skeleton
from adaptkit.strategies.full import Full

DEFAULT_STRATEGIES = ("full", "lora", "bottleneck", "prefix", "linear_probe")
DEVICES = ("cpu", "cuda")
_QUANT_BYTES = {"8bit": (1.0, "row"), "4bit": (0.5, 64)}  # bytes per weight, and what one fp32 scale covers


@dataclasses.dataclass
class Row:
    strategy: str
    trainable: int = 0
    total: int = 0
    weights: int = 0          # bytes of parameters + buffers
    gradients: int = 0        # bytes of one gradient per trainable parameter
    optimizer: int = 0        # AdamW: two states per trainable parameter
    activations: int = 0      # bytes saved for backward
    peak: int = 0             # weights + simulated peak of everything else (they do not all coexist)
    flops: int = 0            # forward + backward of one step
    step_cost: float | None = None  # flops / flops of full fine-tuning
    method: str = "traced"    # "traced" (meta-device simulation) or "formula"
    problem: str | None = None  # why this strategy cannot run on this model (then no numbers)


@dataclasses.dataclass
class Estimate:
    model: str
    model_class: str
    batch_size: int
    seq_len: int
    dtype: str
    quantization: str | None
    device: str
    rows: list[Row]

    def row(self, strategy: str) -> Row:
        return next(r for r in self.rows if r.strategy == strategy)

    def __str__(self) -> str:
        mb = lambda n: f"{n / 1e6:,.0f}"  # noqa: E731
        row = lambda cells: "  ".join(f"{c:>12}" for c in cells)  # noqa: E731
        lines = [f"{self.model_class} ({self.model}), batch {self.batch_size} x seq {self.seq_len}, {self.dtype}"
                 f"{', ' + self.quantization if self.quantization else ''}, AdamW, {self.device}",
                 row(["strategy", "trainable", "weights MB", "grads MB", "AdamW MB", "activ. MB", "peak MB", "step cost",
                      "method"])]
        lines += [f"{r.strategy:>12}  n/a: {r.problem}" if r.problem else row(
            [r.strategy, f"{r.trainable:,}", mb(r.weights), mb(r.gradients), mb(r.optimizer), mb(r.activations),
             mb(r.peak), f"{r.step_cost:.2f}" if r.step_cost is not None else "?", r.method]) for r in self.rows]
        lines.append("peak = weights + the simulated peak of activations, gradients, AdamW states and temporaries; "
                     "step cost = forward+backward FLOPs relative to full fine-tuning")
        if self.device == "cpu":  # benchmarks/estimate_vs_measured.py
            lines.append("glibc keeps freed buffers: measured RSS on MiniLM is 31-64% above peak, 1-6% with "
                         "MALLOC_MMAP_THRESHOLD_=65536")
        return "\n".join(lines)


def estimate(model: Any, strategies: Any = DEFAULT_STRATEGIES, *, batch_size: int = 32, seq_len: int = 128,
             dtype: Any = "float32", quantization: str | None = None, task: str = "auto",
             num_labels: int | None = None, device: str = "cpu") -> Estimate:
    """Predicted peak training memory and relative step cost of each strategy (see the module docstring).
    ``model``: a folder, hub id, config or loaded model; ``strategies``: names, Strategy configs or dicts.
    Image models ignore ``seq_len`` (the patch count comes from the config)."""
    for field, value in (("batch_size", batch_size), ("seq_len", seq_len)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(field, value, "must be a positive integer", "pass e.g. 32")
    if device not in DEVICES:
        raise ConfigError("device", device, "is not a device estimate knows", f"choose one of {list(DEVICES)}")
    quantization = quantization_of(quantization)
    torch_dtype = dtype_of(dtype)
    sk = skeleton(model, task, num_labels)
    if getattr(sk.config, "pad_token_id", None) is None:
        sk.config.pad_token_id = 0  # decoder classifiers need one for batches > 1; memory does not depend on it
    configs = [resolve(s) for s in ([strategies] if isinstance(strategies, str) else strategies)]
    lengths.check_length(sk.build(), seq_len, field="seq_len")  # the meta trace would not notice an overrun
    rows = [_estimate_one(sk, config, batch_size, seq_len, torch_dtype, quantization, device) for config in configs]
    full_flops = next((r.flops for c, r in zip(configs, rows) if c.name == "full" and not r.problem), None)
    if full_flops is None and any(r.method == "traced" and not r.problem for r in rows):
        full_flops = _estimate_one(sk, Full(), batch_size, seq_len, torch_dtype, None, device).flops
    for r in rows:
        if full_flops and r.flops and not r.problem:
            r.step_cost = r.flops / full_flops
    return Estimate(sk.source, sk.model_class.__name__, batch_size, seq_len, str(torch_dtype).replace("torch.", ""),
                    quantization, device, rows)


def _estimate_one(sk: Skeleton, config, batch: int, seq: int, dtype: torch.dtype, quantization: str | None,
                  device: str) -> Row:
    row = Row(getattr(config, "label", None) or config.name)  # PEFT methods by their own name ("ia3")
    base = sk.build(dtype)
    if quantization and not config.supports_quantized:
        row.problem = f"{config.name} cannot train a {quantization} model"
    elif error := lengths.length_error(base, seq, config, field="seq_len"):  # with the strategy's virtual tokens
        row.problem = str(error)
    if row.problem:
        return row
    quant_saving = _quantization_saving(base, quantization) if quantization else 0
    base_linear_params = sum(base.get_submodule(n).weight.numel() for n in targets.linear_names(base))
    try:
        model = adapt(base, config)
    except AdaptkitError as exc:
        row.problem = str(exc)
        return row
    counts, trainable = summary(model), [p for p in model.parameters() if p.requires_grad]
    row.total, row.trainable, row.weights = counts.total, counts.trainable, counts.footprint_bytes - quant_saving
    row.gradients = sum(p.numel() * p.element_size() for p in trainable)
    row.optimizer = 2 * row.gradients
    try:
        saved, live_peak, row.flops = _trace(model, sk, batch, seq, device, trainable)
        row.activations, row.peak = saved, row.weights + live_peak
    except Exception:  # the model's Python code needs real values somewhere: fall back to the formula
        row.method = "formula"
        row.activations = _formula_activations(sk.config, config.name, batch, seq, dtype)
        row.flops = _formula_flops(sk.config, base_linear_params, config, batch, seq)
        row.peak = row.weights + row.gradients + row.optimizer + row.activations
    return row


def _quantization_saving(model: nn.Module, quantization: str) -> int:
    """Bytes saved by storing every backbone linear weight quantized (heads stay unquantized)."""
    per_weight, scale_unit = _QUANT_BYTES[quantization]
    weights = [model.get_submodule(name).weight for name in targets.linear_names(model)]
    return sum(int(w.numel() * (w.element_size() - per_weight))
               - 4 * (w.shape[0] if scale_unit == "row" else -(-w.numel() // scale_unit)) for w in weights)


def _inputs(sk: Skeleton, batch: int, seq: int) -> dict[str, torch.Tensor]:
    meta = dict(device="meta")
    ids = lambda *shape: torch.zeros(*shape, dtype=torch.long, **meta)  # noqa: E731
    if sk.task == "image_cls" or getattr(sk.model_class, "main_input_name", "") == "pixel_values":
        c = sk.config
        inputs = {"pixel_values": torch.zeros(batch, getattr(c, "num_channels", 3), c.image_size, c.image_size, **meta)}
        if sk.task == "image_cls":
            inputs["labels"] = ids(batch)
        return inputs
    labels = {"seq_cls": {"labels": torch.zeros(batch, **meta) if sk.config.num_labels == 1 else ids(batch)},
              "qa": {"start_positions": ids(batch), "end_positions": ids(batch)}}
    return {"input_ids": ids(batch, seq), **labels.get(sk.task, {"labels": ids(batch, seq)} if sk.task in
                                                       ("token_cls", "causal_lm", "seq2seq") else {})}


def _trace(model: nn.Module, sk: Skeleton, batch: int, seq: int, device: str,
           trainable: list[nn.Parameter]) -> tuple[int, int, int]:
    """Two meta-device training steps: (bytes saved for backward, peak live bytes of step 2, FLOPs)."""
    inputs = _inputs(sk, batch, seq)
    model.train()
    optimizer = torch.optim.AdamW(trainable, lr=1e-4, foreach=(device == "cuda")) if trainable else None
    live, saved = _LiveBytes(), _SavedBytes({p.untyped_storage()._cdata for p in model.parameters()})
    flop_map = {  # the fused CPU kernel, which torch's counter does not know
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: lambda q, k, v, *a, **kw: sdpa_flop_count(q, k, v),
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward:
            lambda g, q, k, v, *a, **kw: sdpa_backward_flop_count(g, q, k, v)}
    flops = FlopCounterMode(display=False, custom_mapping=flop_map)
    # transformers warns about padding by reading token values; meta tensors have none
    quiet = mock.patch.object(PreTrainedModel, "warn_if_padding_and_no_attention_mask", lambda *a, **k: None)
    attention = mock.patch.object(F, "scaled_dot_product_attention", _fused_attention(device))
    with quiet, attention, live:
        for step in range(2):
            if step == 1:  # step 2 has AdamW states: that is the steady state
                live.peak = live.live
            with (saved if step == 1 else contextlib.nullcontext()), (flops if step == 1 else contextlib.nullcontext()):
                outputs = model(**inputs)
                loss = outputs.loss if getattr(outputs, "loss", None) is not None else _any_loss(outputs)
                loss.backward()
            del outputs, loss
            if optimizer is not None:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
    return saved.total, live.peak, flops.get_total_flops()


def _any_loss(outputs) -> torch.Tensor:  # a bare backbone has no loss: the mean of its first output
    return (outputs[0] if isinstance(outputs, tuple) else next(iter(outputs.values()))).float().mean()


def _fused_attention(device: str):
    """scaled_dot_product_attention as the target device runs it (see the module docstring)."""
    original = F.scaled_dot_product_attention

    def attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        fused = device == "cuda" or dropout_p == 0.0
        if not fused or (attn_mask is not None and attn_mask.requires_grad):  # e.g. T5's trained position bias
            return original(q, k, v, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa)
        if attn_mask is not None and attn_mask.dtype == torch.bool:  # torch makes it additive, once per call
            attn_mask = torch.zeros((), dtype=q.dtype, device=q.device).where(attn_mask, float("-inf"))
        # the CPU kernel takes fewer key/value heads (grouped-query attention) as they are
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, is_causal and attn_mask is None, attn_mask=attn_mask, scale=scale)[0]

    return attention


class _LiveBytes(torch.utils._python_dispatch.TorchDispatchMode):
    """Bytes of every storage created inside the mode and still referenced; and their peak."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.refs: dict[int, int] = {}

    def _release(self, key: int, nbytes: int) -> None:
        self.refs[key] -= 1
        if not self.refs[key]:
            del self.refs[key]
            self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        leaves = torch.utils._pytree.tree_leaves
        inputs = {t.untyped_storage()._cdata for t in leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key, nbytes = storage._cdata, storage.nbytes()
                if key not in self.refs:
                    if key in inputs:  # in place on / a view of a tensor made outside (a weight): not new
                        continue
                    self.refs[key] = 0
                    self.live += nbytes
                    self.peak = max(self.peak, self.live)
                self.refs[key] += 1
                # torch keeps a tensor's Python object alive while autograd still holds the tensor,
                # so this fires when the storage is really released, not when user code drops it
                weakref.finalize(t, self._release, key, nbytes)
        return out


class _SavedBytes(torch.autograd.graph.saved_tensors_hooks):
    """Bytes autograd saves for backward (each storage once; parameters excluded: they are weights)."""

    def __init__(self, parameter_storages: set[int]):
        self.total, self.seen = 0, set(parameter_storages)
        super().__init__(self._pack, lambda t: t)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        if (storage := t.untyped_storage())._cdata not in self.seen:
            self.seen.add(storage._cdata)
            self.total += storage.nbytes()
        return t


def _formula_activations(config, strategy: str, batch: int, seq: int, dtype: torch.dtype) -> int:
    """BERT-calibrated, 0 for linear_probe: layers x batch x seq x bytes x (10.3 x hidden + 2 x intermediate)
    + layers x batch x heads x seq^2 x bytes x 3 (then peak = weights + gradients + AdamW + activations)."""
    if strategy == "linear_probe":
        return 0
    hidden, heads, layers = int(config.hidden_size), int(config.num_attention_heads), _layers(config)
    inter = next((int(v) for a in ("intermediate_size", "n_inner", "d_ff", "ffn_dim", "hidden_dim")
                  if isinstance(v := getattr(config, a, None), int)), 4 * hidden)
    size = torch.empty(0, dtype=dtype).element_size()
    return int(layers * batch * seq * size * (10.3 * hidden + 2 * inter) + layers * batch * heads * seq * seq * size * 3)


def _layers(config) -> int:
    """Encoder plus decoder layers: num_hidden_layers is only the encoder's in BART and T5 configs."""
    decoder = (getattr(config, "decoder_layers", None) or getattr(config, "num_decoder_layers", None) or 0
               if getattr(config, "is_encoder_decoder", False) else 0)
    return int(config.num_hidden_layers) + int(decoder)


def _formula_flops(config, linear_params: int, strategy, batch: int, seq: int) -> int:
    """2 FLOPs per weight per token forward, + attention 4·seq²·hidden per layer; backward computes input
    gradients (1× forward) unless nothing below the head trains, and weight gradients (1×) for full."""
    forward = 2 * linear_params * batch * seq + 4 * batch * seq * seq * int(config.hidden_size) * _layers(config)
    return forward if strategy.name == "linear_probe" else forward * (3 if not strategy.freezes_base else 2)


__all__ = ["estimate", "Estimate", "Row", "DEFAULT_STRATEGIES"]
