"""``load_model``: ``from_pretrained`` for adapter training, full precision, 8-bit or 4-bit, with what users get wrong
done right (docs/big-models.md): task heads and the pooler they read unquantized, one whole copy per process, no
fp32 upcast, non-reentrant checkpointing, no CPU inference repack of 4-bit weights."""

from __future__ import annotations

import difflib
import inspect
from typing import Any

import torch
import transformers
from safetensors import SafetensorError
from torch import nn
from transformers import AutoConfig, BitsAndBytesConfig

from adaptkit import placement, targets
from adaptkit.errors import ConfigError, ConfigTypeError, MissingDependencyError, UnknownOptionError, UnsupportedError
from adaptkit.names import QUANTIZATIONS, TASKS
from adaptkit.skeleton import refuse_remote_code, remote_code_error

def _dtype_arg(hf_kwargs: dict[str, Any]) -> torch.dtype:
    """The dtype ``from_pretrained`` will load the unquantized weights in (``dtype``/``torch_dtype``; fp32 default)."""
    value = hf_kwargs.get("dtype", hf_kwargs.get("torch_dtype"))
    if isinstance(value, str) and value != "auto":
        value = getattr(torch, value, None)
    return value if isinstance(value, torch.dtype) else torch.float32


# from_pretrained arguments that also decide which config (and so which head names) a model has
_CONFIG_KWARGS = ("revision", "trust_remote_code", "cache_dir", "token", "subfolder", "local_files_only")


def _auto_class(task: Any):
    if isinstance(task, type):  # a transformers Auto class or model class, used as given
        if not hasattr(task, "from_pretrained"):
            raise ConfigTypeError("task", task.__name__, "has no from_pretrained", "pass a task name or an Auto class")
        return task
    if not isinstance(task, str) or task not in TASKS:
        close = difflib.get_close_matches(str(task), TASKS, n=1)
        raise ConfigError("task", task, "is not a task load_model knows", (f"did you mean {close[0]!r}? " if close
                          else "") + f"choose one of {sorted(TASKS)} or pass an Auto class")
    return getattr(transformers, TASKS[task])


def unquantized_modules(name_or_path: str, auto_class: Any, hf_kwargs: dict[str, Any]) -> list[str]:
    """Task heads + output embedding of the model ``auto_class.from_pretrained`` would build (on meta, no weights)."""
    config = hf_kwargs.get("config")
    if config is None:
        config = AutoConfig.from_pretrained(name_or_path, **{k: hf_kwargs[k] for k in _CONFIG_KWARGS if k in hf_kwargs})
    with torch.device("meta"):
        skeleton = auto_class.from_config(config, trust_remote_code=False)  # load_model refused remote code
    names = set(targets.head_names(skeleton))
    # the pooler a head reads counts as part of it: BERT's pooler plays the part of the dense layer RoBERTa's
    # head owns, and bottleneck adapters train it (strategies/bottleneck.py); it is one hidden x hidden layer
    if names and (pooler := targets.pooler_name(skeleton)):
        names.add(pooler)
    out = skeleton.get_output_embeddings() if hasattr(skeleton, "get_output_embeddings") else None
    names.update(n for n, m in skeleton.named_modules() if out is not None and m is out)
    return sorted(names)


def bnb_config(quantization: str, skip_modules: list[str], options: dict[str, Any] | None = None,
               storage: torch.dtype | None = None):
    """The BitsAndBytesConfig for ``quantization``, ``skip_modules`` in full precision; ``storage``: the float
    dtype 4-bit weights are packed into (FSDP + QLoRA needs the model's dtype)."""
    options = dict(options or {})
    user_skips = options.pop("llm_int8_skip_modules", None) or []
    for key in {"load_in_8bit", "load_in_4bit"} & set(options):
        raise ConfigError(f"quantization_options[{key!r}]", options[key], "is decided by the quantization argument",
                          "remove it")
    # BitsAndBytesConfig only logs unknown keys at info level: a typo would be dropped silently
    known = set(inspect.signature(BitsAndBytesConfig.__init__).parameters) - {"self", "kwargs"}
    unknown = sorted(set(options) - known)
    if unknown:
        hints = [f"{u!r} -> did you mean {m[0]!r}?" for u in unknown if (m := difflib.get_close_matches(u, known, n=1))]
        raise UnknownOptionError("quantization_options", unknown, "not BitsAndBytesConfig fields",
                                 "; ".join([*hints, "see transformers.BitsAndBytesConfig"]))
    defaults = {}
    if quantization == "4bit":  # QLoRA's defaults, which quantization_options override
        # compute in bf16 where native (CPUs, Ampere+); fp16 on GPUs that emulate bf16
        emulated = torch.cuda.is_available() and not torch.cuda.is_bf16_supported(False)
        defaults = {"bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True,
                    "bnb_4bit_compute_dtype": torch.float16 if emulated else torch.bfloat16}
        if storage is not None:  # FSDP shards 4-bit weights only when they are stored in its float dtype
            defaults["bnb_4bit_quant_storage"] = storage
    fields = {**defaults, **options,
              "llm_int8_skip_modules": sorted(set(skip_modules) | set(user_skips)) or None}
    try:
        return BitsAndBytesConfig(load_in_8bit=quantization == "8bit", load_in_4bit=quantization == "4bit", **fields)
    except (TypeError, ValueError) as exc:  # BitsAndBytesConfig checks the values' types itself
        raise ConfigError("quantization_options", options, str(exc), "see transformers.BitsAndBytesConfig") from None


def load_model(name_or_path: str, task: Any = "seq_cls", quantization: str | None = None, *,
               gradient_checkpointing: bool = False, quantization_options: dict[str, Any] | None = None,
               **hf_kwargs: Any) -> nn.Module:
    """A transformers model ready for ``adaptkit.adapt``, quantized or not, placed for this process. ``task``: one of
    ``TASKS`` or an Auto class; ``quantization``: "8bit", "4bit" or None, with extra ``BitsAndBytesConfig`` fields in
    ``quantization_options``; ``hf_kwargs`` go to ``from_pretrained`` (``num_labels=3``, ``dtype=...``)."""
    auto_class = _auto_class(task)
    if quantization is not None and quantization not in QUANTIZATIONS:
        raise ConfigError("quantization", quantization, "is not a quantization adaptkit loads",
                          f"use one of {list(QUANTIZATIONS)} or None")
    refuse_remote_code(name_or_path, hf_kwargs.get("trust_remote_code"))
    hf_kwargs["trust_remote_code"] = False  # None would let transformers ask at a terminal, and "y" runs the code
    if "quantization_config" in hf_kwargs:
        raise ConfigError("quantization_config", type(hf_kwargs["quantization_config"]).__name__, "is built by "
                          "load_model (task heads unquantized)", "pass quantization='8bit' or '4bit' instead")
    if quantization_options and quantization is None:
        raise ConfigError("quantization_options", sorted(quantization_options), "given without a quantization",
                          "add quantization='8bit' or '4bit'")
    hf_kwargs["device_map"] = placement.device_map(hf_kwargs.get("device_map"))
    if quantization is not None:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError as exc:
            raise MissingDependencyError("quantization", quantization, f"needs bitsandbytes, which cannot be imported "
                                         f"({exc})", "pip install 'adaptkit[bitsandbytes]'") from None
        skips = unquantized_modules(name_or_path, auto_class, hf_kwargs)
        # FSDP + QLoRA: 4-bit weights packed in the dtype of the other weights, so FSDP can shard them
        storage = _dtype_arg(hf_kwargs) if placement.fsdp_requested() and quantization == "4bit" else None
        hf_kwargs["quantization_config"] = bnb_config(quantization, skips, quantization_options, storage)
    try:
        model = auto_class.from_pretrained(name_or_path, **hf_kwargs)
    except ValueError as exc:
        if "trust_remote_code" in str(exc) or "custom code" in str(exc):
            raise remote_code_error(name_or_path, "its files reference custom code") from None
        raise
    except SafetensorError as exc:  # a truncated or corrupt checkpoint: safetensors' raw error names no file
        raise ConfigError("model", str(name_or_path), f"its weights are not a readable safetensors file (truncated "
                          f"or corrupt?): {exc}", "copy or download the checkpoint again") from None
    if quantization is not None:
        prepare_kbit(model)
    if gradient_checkpointing:
        enable_checkpointing(model)
    return model


def quantized_linears(model: nn.Module) -> dict[str, nn.Module]:
    """Every bitsandbytes linear layer, by name (empty for an unquantized model or without bitsandbytes)."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return {}
    kinds = (bnb.nn.Linear8bitLt, bnb.nn.Linear4bit)
    return {n: m for n, m in model.named_modules() if isinstance(m, kinds)}


def _refuse_repacked(module: nn.Module, args: tuple) -> None:
    state = getattr(module.weight, "quant_state", None)
    if module.training and torch.is_grad_enabled() and getattr(state, "packing_format_for_cpu", False):
        raise UnsupportedError("4-bit weights", "repacked for CPU inference", "an eval pass before adaptkit prepared "
                               "the model repacked them, a layout without backward", "load with adaptkit.load_model")


def prepare_kbit(model: nn.Module) -> nn.Module:
    """Freeze a bitsandbytes model without changing dtypes; refuse a quantized head; stop the 4-bit CPU repack."""
    layers = quantized_linears(model)
    heads = targets.head_names(model)
    bad = sorted(n for n in layers if any(n == h or n.startswith(h + ".") for h in heads))
    if bad:
        raise UnsupportedError("quantized task head", bad, "bitsandbytes quantized a task head: it cannot train",
                               f"load with adaptkit.load_model, or pass llm_int8_skip_modules={heads}")
    model.requires_grad_(False)
    for module in layers.values():
        if hasattr(module, "support_avx512bf16_for_cpu"):  # Linear4bit only
            module.support_avx512bf16_for_cpu = False
            if not getattr(module, "_adaptkit_repack_check", False):
                module.register_forward_pre_hook(_refuse_repacked)
                module._adaptkit_repack_check = True
    return model


def enable_checkpointing(model: nn.Module) -> nn.Module:
    """Non-reentrant activation checkpointing: adapters inside checkpointed blocks still get gradients."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise UnsupportedError("gradient_checkpointing", True, f"{type(model).__name__} does not support it",
                               "load without gradient_checkpointing=True")
    # the name in every transformers adaptkit supports (>= 5.23); gradient_checkpointing_enable is a deprecated alias
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if getattr(model.config, "use_cache", None):
        model.config.use_cache = False  # a KV cache is useless while recomputing and transformers warns
    return model


def quantization_report(model: nn.Module) -> dict[str, Any]:
    """Bytes of the quantized linears: weights, their row scales / block statistics, and bytes per weight."""
    layers = [m.weight for m in quantized_linears(model).values()]
    packed = lambda w: w.quant_state.as_dict(packed=True).values() if getattr(w, "quant_state", None) else ()
    extra = [t for w in layers for t in (getattr(w, "SCB", None), *packed(w)) if isinstance(t, torch.Tensor)]
    weights, weight_bytes = sum(targets.numel(w) for w in layers), sum(w.numel() * w.element_size() for w in layers)
    state_bytes = sum(t.numel() * t.element_size() for t in extra)
    return {"quantized_linears": len(layers), "weights": weights, "weight_bytes": weight_bytes, "state_bytes":
            state_bytes, "bytes_per_weight": (weight_bytes + state_bytes) / weights if weights else None}
