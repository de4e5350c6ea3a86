"""Several processes, after ``adapt``: is this run as many processes as asked, can its sharding be saved, and
the gathering of a sharded adapter for saving. (Where a model goes before it loads is ``adaptkit.placement``.)

Two launch mistakes train "fine" and give a wrong result without an error (Accelerate 1.15 on CPU, FACTS.md):
``accelerate launch --cpu --num_processes 2`` starts ONE process, with nothing in its environment saying two
were asked for (so the user says it again: ``require_processes(accelerator, 2)``, ``--processes 2`` or
``ADAPTKIT_PROCESSES=2``); ``--multi_gpu --num_processes 2`` without GPUs or ``ACCELERATE_USE_CPU=1`` starts two
processes that each train alone (``WORLD_SIZE=2`` while Accelerate sees one: checked without being asked).
"""

from __future__ import annotations

from typing import Any

import torch

from adaptkit.core import is_quantized, save, strategy_of
from adaptkit.errors import ConfigError, ProcessCountError, UnsupportedError
from adaptkit.names import CPU_LAUNCH, EXPECTED_ENV, OWNED
from adaptkit.placement import env_flag, env_int, fsdp_requested, launched_world_size
from adaptkit.quantization import quantized_linears

_ON_CPU = "`ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 ...`"


def require_processes(accelerator: Any = None, expected: int | None = None) -> int:
    """Raise ProcessCountError unless this run is as many processes as asked for (``expected``; None reads
    ``ADAPTKIT_PROCESSES``), counted by ``accelerator.num_processes``, else an initialised torch.distributed
    group, else 1. A launcher's ``WORLD_SIZE`` that differs from that count is refused too. Returns the count."""
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
        raise ConfigError(field="expected processes", value=expected, problem="must be a positive integer",
                          fix="pass the --num_processes value given to the launcher, e.g. 2")
    world = launched_world_size()
    cpu_hint = f"on CPU launch with `{CPU_LAUNCH.format(n=expected or world or 2)}`"
    if world is not None and world != running:
        raise ProcessCountError(field="WORLD_SIZE", value=world, problem=f"the launcher started {world} processes but "
                                f"{seen}: each process would train alone on all the data",
                                fix=f"{cpu_hint} (or create Accelerator(cpu=True)); on GPUs check that {world} GPUs are visible")
    if expected is not None and expected != running:
        raise ProcessCountError(
            field="processes", value=running, problem=f"{expected} process(es) were asked for but this run is {running}",
            fix=f"{cpu_hint}, since `accelerate launch --cpu --num_processes {expected}` silently starts one; on GPUs use "
                f"`accelerate launch --num_processes {expected}` with {expected} visible GPUs" if expected > running else
                f"launch with --num_processes {expected}, or ask for {running} (--processes {running} or "
                f"{EXPECTED_ENV}={running}) if that is what you want")
    return running


def _kind(accelerator: Any) -> str:
    return str(getattr(getattr(accelerator, "distributed_type", None), "value", ""))


def check_sharding(accelerator: Any) -> None:
    """Before any weights load: accept DDP, DeepSpeed ZeRO-1/2 and FSDP2 (every parameter a DTensor under its own
    name, which :func:`save_adapter` gathers); refuse, with the fix, FSDP or DeepSpeed asked for where Accelerate
    runs DDP instead (a CPU launch: transformers then builds rank 1's model on the meta device and fails), FSDP1
    (parameters flattened under other names), FSDP2's untested cpu_ram_efficient_loading, and ZeRO-3."""
    kind, state = _kind(accelerator), getattr(accelerator, "state", None)
    running = f"running as {kind or 'one process'}"
    if fsdp_requested() and kind != "FSDP":
        raise UnsupportedError(
            field="accelerate launch --use_fsdp", value=running,
            problem="Accelerate enables FSDP on GPUs only and runs a CPU launch as DDP (every process a whole copy), "
                    "while transformers still builds the model on the meta device in processes > 0 "
                    "(`Cannot copy out of meta tensor; no data!`)",
            fix=f"on CPU drop --use_fsdp (DDP: {_ON_CPU}) or apply torch's fully_shard yourself and save with "
                "adaptkit.distributed.save_adapter; on GPUs launch without ACCELERATE_USE_CPU")
    if env_flag("ACCELERATE_USE_DEEPSPEED") and kind != "DEEPSPEED":
        raise UnsupportedError(field="accelerate launch --use_deepspeed", value=running,
                               problem="Accelerate enables DeepSpeed on GPUs only and runs a CPU launch as DDP: no ZeRO sharding",
                               fix=f"on CPU drop --use_deepspeed (DDP: {_ON_CPU}); on GPUs launch without ACCELERATE_USE_CPU")
    plugin = getattr(state, "fsdp_plugin", None)
    if kind == "FSDP" and (version := getattr(plugin, "fsdp_version", 1)) != 2:
        raise UnsupportedError(field="fsdp_version", value=version, problem="FSDP1 flattens parameters into buffers "
                               "under other names; adaptkit gathers and saves adapters from FSDP2's per-parameter shards only",
                               fix="launch with `--fsdp_version 2` (or fsdp_version: 2 in the accelerate config)")
    if kind == "FSDP" and getattr(plugin, "cpu_ram_efficient_loading", False):
        raise UnsupportedError(
            field="fsdp_cpu_ram_efficient_loading", value=True,
            problem="processes other than the first then build the model and its adapter on the meta device and get "
                    "their weights broadcast at prepare; adaptkit has not tested that path",
            fix="launch with `--fsdp_cpu_ram_efficient_loading false` (or false in the accelerate config)")
    if kind == "DEEPSPEED" and getattr(getattr(state, "deepspeed_plugin", None), "zero_stage", None) == 3:
        raise UnsupportedError(field="distributed_type", value="DEEPSPEED ZeRO-3", problem="shards parameters in a way "
                               "adaptkit does not gather for saving (untested: deepspeed could not be tested here)",
                               fix="use FSDP2 (`accelerate launch --use_fsdp --fsdp_version 2`), DeepSpeed ZeRO-2, or DDP")


def check_sharded_model(accelerator: Any, model: Any) -> None:
    """Under FSDP2 (call it after ``adapt``, before ``accelerator.prepare``), refuse what cannot be sharded or
    saved: prompt learning (PEFT saves its encoder from the module, which holds one shard), 8-bit weights, and
    4-bit weights stored as integers (left whole on every process; ``load_model`` stores them as floats)."""
    if _kind(accelerator) != "FSDP":
        return
    strategy, peft_config = strategy_of(model), getattr(model, "peft_config", {}) or {}
    if any(getattr(c, "is_prompt_learning", False) for c in peft_config.values()):
        raise UnsupportedError(
            field="strategy", value=strategy.label if strategy else "a prompt-learning PEFT method",
            problem="under FSDP; PEFT saves prompt encoders from the module, which holds only this process's shard",
            fix="use lora or bottleneck under FSDP, or DDP (`accelerate launch --multi_gpu`) for prefix tuning")
    quant = is_quantized(model)
    if quant == "8bit":
        raise UnsupportedError(field="quantization", value="8bit", problem="under FSDP: 8-bit weights cannot be sharded",
                               fix="use quantization='4bit' (FSDP + QLoRA) or DDP for 8-bit")
    storage = sorted({str(m.weight.dtype) for m in quantized_linears(model).values()
                      if not m.weight.dtype.is_floating_point}) if quant == "4bit" else []
    if storage:
        raise UnsupportedError(
            field="bnb_4bit_quant_storage", value=storage,
            problem="under FSDP, 4-bit weights stored as integers are left unsharded on every process",
            fix="load with adaptkit.load_model(..., quantization='4bit') under the FSDP launch (it sets bnb_4bit_quant_"
                "storage to the model's dtype), or pass quantization_options={'bnb_4bit_quant_storage': torch.bfloat16} "
                "and dtype=torch.bfloat16")


def gather_trained(model: Any) -> dict[str, torch.Tensor] | None:
    """Every tensor ``adaptkit.save`` writes, whole and on the CPU; None when nothing is sharded. Every process
    must call it (it all-gathers): the trained tensors, or for ``full`` the whole state dict."""
    from torch.distributed.tensor import DTensor  # torch.distributed's heavy submodules: only for a sharded save

    if not any(isinstance(p, DTensor) for p in model.parameters()):
        return None
    strategy = strategy_of(model)
    if strategy is not None and not strategy.freezes_base:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    owned = set(model.__dict__.get(OWNED, ()))  # what a native strategy trains, even if frozen since
    # the same order on every process: the all-gathers pair up
    return {name: (p.detach().full_tensor() if isinstance(p, DTensor) else p.detach()).cpu().contiguous()
            for name, p in model.named_parameters() if p.requires_grad or name in owned}


def save_adapter(accelerator: Any, model: Any, directory: Any) -> None:
    """``adaptkit.save`` for a multi-process run: every process calls it (under FSDP2 the adapter is gathered
    from every process's shard), the main process writes once."""
    unwrapped = accelerator.unwrap_model(model)
    tensors = gather_trained(unwrapped)
    if accelerator.is_main_process:
        save(unwrapped, directory, _gathered=tensors)
    accelerator.wait_for_everyone()
