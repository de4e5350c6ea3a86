"""Several processes, after ``adapt``: the process count, whether the sharding can be saved, gathering to save.
What each guard refuses and why: docs/distributed.md."""

from __future__ import annotations

from typing import Any

import torch
from torch.distributed.tensor import DTensor

from adaptkit.core import is_quantized, save, strategy_of
from adaptkit.errors import ConfigError, ProcessCountError, UnsupportedError
from adaptkit.names import CPU_LAUNCH, EXPECTED_ENV, OWNED
from adaptkit.placement import env_flag, env_int, fsdp_requested, launched_world_size
from adaptkit.quantization import quantized_linears


def require_processes(accelerator: Any = None, expected: int | None = None) -> int:
    """Raise ProcessCountError unless this run is ``expected`` processes (None reads ``ADAPTKIT_PROCESSES``), counted
    by ``accelerator``, else a torch.distributed group, else 1, and ``WORLD_SIZE`` agrees. Returns the count."""
    if accelerator is not None:
        running = int(accelerator.num_processes)
        seen = f"Accelerate sees {running}"
    elif torch.distributed.is_available() and torch.distributed.is_initialized():  # torchrun without Accelerate
        running = torch.distributed.get_world_size()
        seen = f"the torch.distributed group has {running}"
    else:
        running, seen = 1, "no Accelerator or process group joins them"
    expected = env_int(EXPECTED_ENV) if expected is None else expected
    if expected is not None and (isinstance(expected, bool) or not isinstance(expected, int) or expected < 1):
        raise ConfigError("expected processes", expected, "must be a positive integer", "pass e.g. 2")
    world = launched_world_size()
    cpu_hint = f"on CPU launch with `{CPU_LAUNCH.format(n=expected or world or 2)}`"
    if world is not None and world != running:
        raise ProcessCountError("WORLD_SIZE", world, f"the launcher started {world} processes but {seen}: each "
                                "process would train alone", f"{cpu_hint} (or Accelerator(cpu=True)); on GPUs make "
                                f"{world} visible")
    if expected is not None and expected != running:
        fix = (f"{cpu_hint} (`--cpu` starts one); on GPUs make {expected} visible" if expected > running
               else f"launch with --num_processes {expected}, or ask for {running}")
        raise ProcessCountError("processes", running, f"{expected} process(es) were asked for but this run is "
                                f"{running}", fix)
    return running


def _kind(accelerator: Any) -> str:
    return str(getattr(getattr(accelerator, "distributed_type", None), "value", ""))


def check_sharding(accelerator: Any) -> None:
    """Before any weights load: accept DDP, DeepSpeed ZeRO-1/2 and FSDP2; refuse FSDP or DeepSpeed that Accelerate
    runs as DDP (a CPU launch, where rank 1 then builds on meta and fails), FSDP1, cpu_ram_efficient_loading, ZeRO-3."""
    kind, state = _kind(accelerator), getattr(accelerator, "state", None)
    running, plugin = f"running as {kind or 'one process'}", getattr(state, "fsdp_plugin", None)
    for flag, name, asked in (("fsdp", "FSDP", fsdp_requested()),
                              ("deepspeed", "DeepSpeed", env_flag("ACCELERATE_USE_DEEPSPEED"))):
        if asked and kind != name.upper():
            fix = f"on CPU drop --use_{flag} (`{CPU_LAUNCH.format(n=2)}`)"
            raise UnsupportedError(f"accelerate launch --use_{flag}", running, f"Accelerate enables {name} on GPUs "
                                   "only and runs a CPU launch as DDP", fix)
    if kind == "FSDP" and (version := getattr(plugin, "fsdp_version", 1)) != 2:
        raise UnsupportedError("fsdp_version", version, "FSDP1 flattens parameters under other names",
                               "launch with `--fsdp_version 2`")
    if kind == "FSDP" and getattr(plugin, "cpu_ram_efficient_loading", False):
        raise UnsupportedError("fsdp_cpu_ram_efficient_loading", True, "processes other than the first build on meta "
                               "(untested)", "launch with `--fsdp_cpu_ram_efficient_loading false`")
    if kind == "DEEPSPEED" and getattr(getattr(state, "deepspeed_plugin", None), "zero_stage", None) == 3:
        raise UnsupportedError("distributed_type", "DEEPSPEED ZeRO-3", "shards parameters adaptkit cannot gather",
                               "use FSDP2 (`--use_fsdp --fsdp_version 2`), ZeRO-2 or DDP")


def check_sharded_model(accelerator: Any, model: Any) -> None:
    """Under FSDP2, after ``adapt`` and before ``prepare``: refuse what cannot be sharded or saved whole."""
    if _kind(accelerator) != "FSDP":
        return
    strategy, peft_config = strategy_of(model), getattr(model, "peft_config", {}) or {}
    if any(getattr(c, "is_prompt_learning", False) for c in peft_config.values()):
        raise UnsupportedError("strategy", strategy.label if strategy else "prompt learning", "under FSDP; PEFT saves "
                               "prompt encoders from one shard", "use lora or bottleneck, or DDP for prefix tuning")
    quant = is_quantized(model)
    if quant == "8bit":
        raise UnsupportedError("quantization", "8bit", "under FSDP: 8-bit weights cannot be sharded",
                               "use quantization='4bit' (FSDP + QLoRA) or DDP")
    storage = sorted({str(m.weight.dtype) for m in quantized_linears(model).values()
                      if not m.weight.dtype.is_floating_point}) if quant == "4bit" else []
    if storage:
        raise UnsupportedError("bnb_4bit_quant_storage", storage, "under FSDP, integer 4-bit weights are left "
                               "unsharded", "load with adaptkit.load_model(..., quantization='4bit') under the launch")


def gather_trained(model: Any) -> dict[str, torch.Tensor] | None:
    """torch's full state dict of a sharded model, on the CPU of process 0 (None if nothing is sharded): every
    process must call it. Frozen base weights stay out unless something ``save`` writes is frozen (a native strategy
    writes what it trained even if frozen since; ``full`` the whole model)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict  # heavy; sharded only

    if not any(isinstance(p, DTensor) for p in model.parameters()):
        return None
    owned = set(model.__dict__.get(OWNED, ()))
    frozen_owned = any(name in owned and not p.requires_grad for name, p in model.named_parameters())
    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=not frozen_owned)
    return get_model_state_dict(model, options=options)


def save_adapter(accelerator: Any, model: Any, directory: Any) -> None:
    """``adaptkit.save`` for a multi-process run: every process calls it (FSDP2 gathers), the main one writes."""
    unwrapped = accelerator.unwrap_model(model)
    tensors = gather_trained(unwrapped)
    if accelerator.is_main_process:
        save(unwrapped, directory, _gathered=tensors)
    accelerator.wait_for_everyone()
