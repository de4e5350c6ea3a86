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

Placement: under data parallelism (DDP) every process holds a whole copy of the model on its own
device, so a model is loaded with ``device_map={"": local process index}``. ``device_map="auto"``
shards one copy over all GPUs of the machine: in N processes that is N overlapping shardings, and
Accelerate refuses to wrap a multi-device quantized model in DDP. It is refused here, with the fix.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from adaptkit.errors import ConfigError, ProcessCountError, UnsupportedError

EXPECTED_ENV = "ADAPTKIT_PROCESSES"  # "I asked for N processes", for launchers that drop the count

# the launch line that really starts N CPU processes (`accelerate launch --cpu --num_processes 2` runs one)
CPU_LAUNCH = ("ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes {n} --num_machines 1 "
              "--mixed_precision no --dynamo_backend no <script> ...")


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value.strip() == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ConfigError(field=name, value=value, problem="is not an integer",
                          fix=f"unset it or set it to a whole number, e.g. {name}=2") from None


def launched_world_size() -> int | None:
    """The process count the launcher (accelerate launch, torchrun) started, or None without one."""
    return _env_int("WORLD_SIZE")


def local_process_index() -> int:
    """This process's index on this machine (0 when not launched as several processes)."""
    return _env_int("LOCAL_RANK") or 0


def _cpu_requested() -> bool:
    return os.environ.get("ACCELERATE_USE_CPU", "").strip().lower() in {"1", "true", "yes"}


def process_device() -> int | str:
    """Where this process's copy of the model belongs: its local GPU index, or ``"cpu"``."""
    if torch.cuda.is_available() and not _cpu_requested():
        return local_process_index()
    return "cpu"


def device_map(requested: Any = None) -> Any:
    """The ``device_map`` for ``from_pretrained``: the user's, checked, or the whole model on this process's device.

    Under several processes only a single-device map is accepted; ``"auto"``, ``"balanced"`` and
    maps over several devices are refused (one sharded copy per process cannot be data-parallel).
    """
    if requested is None:
        return {"": process_device()}
    world = launched_world_size() or 1
    if world > 1:
        devices = set(requested.values()) if isinstance(requested, dict) else {requested}
        if (isinstance(requested, str) and requested in {"auto", "balanced", "balanced_low_0", "sequential"}) \
                or len(devices) != 1:
            raise UnsupportedError(
                field="device_map", value=requested,
                problem=f"shards one model over several devices, but this run is {world} data-parallel processes "
                        "that each need a whole copy",
                fix=f"leave device_map unset (adaptkit places the model with device_map={{'': {process_device()!r}}}), "
                    "or for a model too big for one device use FSDP or DeepSpeed through `accelerate config`")
        (device,) = devices
        if _same_device(device, process_device()) is False:
            raise UnsupportedError(
                field="device_map", value=requested,
                problem=f"puts this process's model (local rank {local_process_index()}) on another process's device",
                fix="leave device_map unset, or use device_map={'': accelerator.local_process_index}")
    return requested  # "auto", "cpu", 0 or a dict: from_pretrained reads them all


def _same_device(a: Any, b: Any) -> bool | None:
    """Whether two device_map values name one device (None when one of them is not a device, e.g. "disk")."""
    try:
        a, b = (torch.device("cuda", x) if isinstance(x, int) else torch.device(x) for x in (a, b))
    except (RuntimeError, TypeError):
        return None
    return a.type == b.type and (a.type == "cpu" or (a.index or 0) == (b.index or 0))


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
        expected = _env_int(EXPECTED_ENV)
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


def require_whole_copies(accelerator: Any) -> None:
    """Refuse FSDP and DeepSpeed ZeRO-3, where each process holds only a shard of every parameter.

    ``adaptkit.save`` from the main process writes that process's parameters; under these sharded
    modes it would write a shard (or empty placeholders) as if it were the adapter. DDP and
    DeepSpeed ZeRO-1/2 keep whole parameter copies on every process and are accepted.
    """
    kind = str(getattr(getattr(accelerator, "distributed_type", None), "value", ""))
    stage = None
    if kind == "DEEPSPEED":
        stage = getattr(getattr(getattr(accelerator, "state", None), "deepspeed_plugin", None), "zero_stage", None)
    if kind == "FSDP" or stage == 3:
        raise UnsupportedError(
            field="distributed_type", value=kind if stage is None else f"DEEPSPEED ZeRO-{stage}",
            problem="shards every parameter over the processes, so the main process alone cannot save the adapter",
            fix="use DDP (`accelerate launch --multi_gpu`) or DeepSpeed ZeRO-2 for adapters; "
                "the adapter is small, so sharding it saves little")
