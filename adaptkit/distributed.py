"""Several processes: is this run really as many processes as asked, and where does this one's model go?

Two launch mistakes train "fine" and give a wrong result without any error (measured with
Accelerate 1.15 on CPU, see FACTS.md):

* ``accelerate launch --cpu --num_processes 2 script.py`` starts ONE process. Nothing in its
  environment says that two were asked for, so the user has to say it once more:
  ``require_processes(accelerator, 2)``, a recipe's ``--processes 2`` or ``ADAPTKIT_PROCESSES=2``.
* ``accelerate launch --multi_gpu --num_processes 2`` on a machine without GPUs (and without
  ``ACCELERATE_USE_CPU=1`` / ``Accelerator(cpu=True)``) starts two processes that each train alone on
  all the data. The launcher did set ``WORLD_SIZE=2``; Accelerate reports one process. That mismatch
  is checked without being asked.

After ``adapt``: FSDP2 setups are checked (:func:`check_sharding`, :func:`check_sharded_model`) and a sharded
adapter is gathered whole for saving (:func:`save_adapter`). Where the model goes before it loads is
``adaptkit.placement``.
"""

from __future__ import annotations

from typing import Any

import torch

from adaptkit.core import is_quantized, save, strategy_of
from adaptkit.errors import ConfigError, ProcessCountError, UnsupportedError
from adaptkit.names import CPU_LAUNCH, EXPECTED_ENV, OWNED
from adaptkit.placement import env_flag, env_int, fsdp_requested, launched_world_size
from adaptkit.quantization import quantized_linears

def require_processes(accelerator: Any = None, expected: int | None = None) -> int:
    """Raise ProcessCountError unless this run is as many processes as were asked for; return the count.

    ``accelerator`` is an ``accelerate.Accelerator`` (or anything with ``num_processes``); without
    one, an initialised ``torch.distributed`` group's size counts, else the run is one process.
    ``expected`` is the count the user asked for; None reads ``ADAPTKIT_PROCESSES``. Independently
    of ``expected``, a launcher's ``WORLD_SIZE`` that differs from the running count is refused:
    those processes would each train alone.
    """
    if accelerator is not None:
        running = int(accelerator.num_processes)
        seen = f"Accelerate sees {running}"
    elif torch.distributed.is_available() and torch.distributed.is_initialized():  # torchrun without Accelerate
        running = torch.distributed.get_world_size()
        seen = f"the torch.distributed group has {running}"
    else:
        running, seen = 1, "no Accelerator or process group joins them"
    if expected is None:
        expected = env_int(EXPECTED_ENV)
    if expected is not None and (isinstance(expected, bool) or not isinstance(expected, int) or expected < 1):
        raise ConfigError(field="expected processes", value=expected, problem="must be a positive integer",
                          fix="pass the --num_processes value given to the launcher, e.g. 2")
    world = launched_world_size()
    cpu_hint = f"on CPU launch with `{CPU_LAUNCH.format(n=expected or world or 2)}`"
    if world is not None and world != running:
        raise ProcessCountError(
            field="WORLD_SIZE", value=world,
            problem=f"the launcher started {world} processes but {seen}: each process "
                    "would train alone on all the data",
            fix=f"{cpu_hint} (or create Accelerator(cpu=True)); on GPUs check that {world} GPUs are visible")
    if expected is not None and expected != running:
        raise ProcessCountError(
            field="processes", value=running,
            problem=f"{expected} process(es) were asked for but this run is {running}",
            fix=f"{cpu_hint}, since `accelerate launch --cpu --num_processes {expected}` silently starts one; "
                f"on GPUs use `accelerate launch --num_processes {expected}` with {expected} visible GPUs"
                if expected > running else
                f"launch with --num_processes {expected}, or ask for {running} (--processes {running} or "
                f"{EXPECTED_ENV}={running}) if that is what you want")
    return running


def _kind(accelerator: Any) -> str:
    return str(getattr(getattr(accelerator, "distributed_type", None), "value", ""))


def check_sharding(accelerator: Any) -> None:
    """Refuse the sharded setups that crash or could not be saved correctly, each with its fix; accept FSDP2.

    Called before any weights load. Accepted: DDP, DeepSpeed ZeRO-1/2 (whole parameter copies on every
    process) and FSDP2 (``fully_shard``: every parameter a ``DTensor`` under its own name, which
    :func:`save_adapter` gathers). Refused:

    * FSDP or DeepSpeed asked for where Accelerate does not run it: Accelerate 1.15 enables them only on GPU-like
      devices; with ``ACCELERATE_USE_CPU=1`` it silently runs DDP (every process a whole copy), while
      transformers, reading the same ``ACCELERATE_USE_FSDP``, builds the model on the meta device in
      processes > 0, which then fails with ``Cannot copy out of meta tensor; no data!`` on rank 1.
    * FSDP1: it flattens parameters into buffers with other names; only FSDP2 is handled here.
    * FSDP2 with ``cpu_ram_efficient_loading`` (GPU only): untested here, so refused with the fix.
    * DeepSpeed ZeRO-3: shards parameters in a way :func:`save_adapter` does not gather, and
      ``deepspeed`` could not be tested here.
    """
    kind = _kind(accelerator)
    state = getattr(accelerator, "state", None)
    if fsdp_requested() and kind != "FSDP":
        raise UnsupportedError(
            field="accelerate launch --use_fsdp", value=f"running as {kind or 'one process'}",
            problem="Accelerate enables FSDP on GPUs only and runs a CPU launch as DDP (every process a whole "
                    "copy), while transformers still builds the model on the meta device in processes > 0 "
                    "(`Cannot copy out of meta tensor; no data!`)",
            fix="on CPU drop --use_fsdp (DDP: `ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 "
                "...`) or apply torch's fully_shard yourself and save with adaptkit.distributed.save_adapter; "
                "on GPUs launch without ACCELERATE_USE_CPU")
    if env_flag("ACCELERATE_USE_DEEPSPEED") and kind != "DEEPSPEED":
        raise UnsupportedError(
            field="accelerate launch --use_deepspeed", value=f"running as {kind or 'one process'}",
            problem="Accelerate enables DeepSpeed on GPUs only and runs a CPU launch as DDP: no ZeRO sharding",
            fix="on CPU drop --use_deepspeed (DDP: `ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu "
                "--num_processes 2 ...`); on GPUs launch without ACCELERATE_USE_CPU")
    if kind == "FSDP":
        plugin = getattr(state, "fsdp_plugin", None)
        version = getattr(plugin, "fsdp_version", 1)
        if version != 2:
            raise UnsupportedError(
                field="fsdp_version", value=version,
                problem="FSDP1 flattens parameters into buffers under other names; adaptkit gathers and saves "
                        "adapters from FSDP2's per-parameter shards only",
                fix="launch with `--fsdp_version 2` (or fsdp_version: 2 in the accelerate config)")
        if getattr(plugin, "cpu_ram_efficient_loading", False):
            raise UnsupportedError(
                field="fsdp_cpu_ram_efficient_loading", value=True,
                problem="processes other than the first then build the model and its adapter on the meta device "
                        "and get their weights broadcast at prepare; adaptkit has not tested that path",
                fix="launch with `--fsdp_cpu_ram_efficient_loading false` "
                    "(or fsdp_cpu_ram_efficient_loading: false in the accelerate config)")
    if kind == "DEEPSPEED":
        stage = getattr(getattr(state, "deepspeed_plugin", None), "zero_stage", None)
        if stage == 3:
            raise UnsupportedError(
                field="distributed_type", value=f"DEEPSPEED ZeRO-{stage}",
                problem="shards parameters in a way adaptkit does not gather for saving (untested: "
                        "deepspeed could not be tested here)",
                fix="use FSDP2 (`accelerate launch --use_fsdp --fsdp_version 2`), DeepSpeed ZeRO-2, or DDP")


def check_sharded_model(accelerator: Any, model: Any) -> None:
    """Under FSDP2, refuse an adapted model whose pieces cannot be sharded or saved; else do nothing.

    Call it after ``adaptkit.adapt`` and before ``accelerator.prepare``.

    * Prompt-learning methods (``prefix``, prompt tuning, P-tuning): PEFT saves their prompt encoder
      from the module itself, not from the state dict adaptkit gathers, so a sharded run would save
      this process's shard.
    * 8-bit weights: bitsandbytes' ``Int8Params`` cannot be sharded by FSDP.
    * 4-bit weights stored as integers: Accelerate leaves them unsharded (every process keeps all of
      them), which defeats FSDP; :func:`adaptkit.load_model` stores them in the model's float dtype
      under FSDP (``bnb_4bit_quant_storage``), as FSDP + QLoRA needs.
    """
    if _kind(accelerator) != "FSDP":
        return
    strategy = strategy_of(model)
    peft_config = getattr(model, "peft_config", {}) or {}
    if any(getattr(c, "is_prompt_learning", False) for c in peft_config.values()):
        raise UnsupportedError(
            field="strategy", value=strategy.label if strategy else "a prompt-learning PEFT method",
            problem="under FSDP; PEFT saves prompt encoders from the module, which holds only this process's shard",
            fix="use lora or bottleneck under FSDP, or DDP (`accelerate launch --multi_gpu`) for prefix tuning")
    quant = is_quantized(model)
    if quant == "8bit":
        raise UnsupportedError(field="quantization", value="8bit", problem="under FSDP: 8-bit weights cannot be sharded",
                               fix="use quantization='4bit' (FSDP + QLoRA) or DDP for 8-bit")
    if quant == "4bit":
        storage = sorted({str(m.weight.dtype) for m in quantized_linears(model).values()
                          if not m.weight.dtype.is_floating_point})
        if storage:
            raise UnsupportedError(
                field="bnb_4bit_quant_storage", value=storage,
                problem="under FSDP, 4-bit weights stored as integers are left unsharded on every process",
                fix="load with adaptkit.load_model(..., quantization='4bit') under the FSDP launch (it sets "
                    "bnb_4bit_quant_storage to the model's dtype), or pass "
                    "quantization_options={'bnb_4bit_quant_storage': torch.bfloat16} and dtype=torch.bfloat16")


def gather_trained(model: Any) -> dict[str, torch.Tensor] | None:
    """Every tensor ``adaptkit.save`` writes, whole, on the CPU; None when nothing is sharded.

    Under FSDP2 a parameter is a ``DTensor`` holding this process's shard. Every process must call
    this (it all-gathers): trainable parameters only for strategies that freeze the base (an adapter
    is small), the whole state dict for full fine-tuning. Names are the model's own (FSDP2 keeps them).
    """
    from torch.distributed.tensor import DTensor

    if not any(isinstance(p, DTensor) for p in model.parameters()):
        return None
    strategy = strategy_of(model)
    if strategy is not None and not strategy.freezes_base:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    owned = set(model.__dict__.get(OWNED, ()))  # what a native strategy trains, even if frozen since
    out = {}
    for name, p in model.named_parameters():  # the same order on every process: the all-gathers pair up
        if p.requires_grad or name in owned:
            t = p.detach()
            out[name] = (t.full_tensor() if isinstance(t, DTensor) else t).cpu().contiguous()
    return out


def save_adapter(accelerator: Any, model: Any, directory: Any) -> None:
    """``adaptkit.save`` for a multi-process run: every process calls it, the main process writes once.

    Under DDP the main process's copy is whole; under FSDP2 the adapter (or, for ``full``, the whole
    model) is first gathered from the shards of every process, so the folder holds whole tensors.
    """
    unwrapped = accelerator.unwrap_model(model)
    tensors = gather_trained(unwrapped)
    if accelerator.is_main_process:
        save(unwrapped, directory, _gathered=tensors)
    accelerator.wait_for_everyone()
