"""Where this process's model goes, decided before any weights load: under DDP a whole copy on its own device
(``device_map={"": local process index}``; "auto" in N processes would be N overlapping shardings, refused); under
FSDP the whole model on the CPU, and FSDP places the shards."""

from __future__ import annotations

import os
from typing import Any

import torch

from adaptkit.errors import ConfigError, UnsupportedError


def env_int(name: str) -> int | None:
    if not (value := os.environ.get(name, "")).strip():
        return None
    try:
        return int(value)
    except ValueError:
        raise ConfigError(name, value, "is not an integer", f"unset it or set a whole number, e.g. {name}=2") from None


def launched_world_size() -> int | None:  # the process count accelerate launch / torchrun started
    return env_int("WORLD_SIZE")


def local_process_index() -> int:  # this process's index on this machine
    return env_int("LOCAL_RANK") or 0


def process_device() -> int | str:
    """Where this process's copy of the model belongs: its local GPU index, or ``"cpu"``."""
    return local_process_index() if torch.cuda.is_available() and not env_flag("ACCELERATE_USE_CPU") else "cpu"


def device_map(requested: Any = None) -> Any:
    """``from_pretrained``'s ``device_map``: the user's, checked (copies must be whole), or this process's device."""
    if fsdp_requested():  # FSDP (and FSDP + QLoRA) loads on the CPU and shards from there
        if requested is not None:
            raise UnsupportedError("device_map", requested, "under FSDP the model must load whole on the CPU",
                                   "leave device_map unset")
        return None
    if requested is None:
        return {"": process_device()}
    world = launched_world_size() or 1
    if world > 1:
        devices = set(requested.values()) if isinstance(requested, dict) else {requested}
        if requested in ("auto", "balanced", "balanced_low_0", "sequential") or len(devices) != 1:
            raise UnsupportedError("device_map", requested, f"shards one model, but the {world} data-parallel "
                                   "processes each need a whole copy", "leave device_map unset, or use FSDP")
        if _same_device(next(iter(devices)), process_device()) is False:
            raise UnsupportedError("device_map", requested, f"puts this process's model (local rank "
                                   f"{local_process_index()}) on another process's device", "leave device_map unset")
    return requested  # "auto", "cpu", 0 or a dict: from_pretrained reads them all


def _same_device(a: Any, b: Any) -> bool | None:
    """Whether two device_map values name one device (None when one of them is not a device, e.g. "disk")."""
    try:
        a, b = (torch.device("cuda", x) if isinstance(x, int) else torch.device(x) for x in (a, b))
    except (RuntimeError, TypeError):
        return None
    return a.type == b.type and (a.type == "cpu" or (a.index or 0) == (b.index or 0))


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes"}


def fsdp_requested() -> bool:  # accelerate launch --use_fsdp, or an FSDP config
    return env_flag("ACCELERATE_USE_FSDP")
