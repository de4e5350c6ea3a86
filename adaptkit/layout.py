"""What an adapter folder holds, how it is written (through ``folders.commit``) and read back, and the checks
``load`` makes before any tensor lands in a model. The format, and loading it with transformers alone:
docs/folder-format.md.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
import transformers
from peft import PeftConfig, PeftType
from peft.utils import get_peft_model_state_dict
from peft.utils.other import _prepare_prompt_learning_config
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn
from torch.distributed.tensor import DTensor

from adaptkit import card, folders, strategies, targets, versions
from adaptkit.errors import AdapterFormatError, BaseMismatchError, ConfigError, ConfigTypeError, UnsupportedError
from adaptkit.names import ADAPTKIT_MODEL_TYPE, CONFIG_NAME, FORMAT, FROM_CONFIG_SEED, MARKER, OWNED, WEIGHTS_NAME
from adaptkit.strategies.base import PeftStrategy, Strategy, weights_file
from adaptkit.strategies.peft_method import PeftMethod

FILE_KEYS = {"format", "adaptkit_version", "base_model", "base", "labels", "strategy", "adapters", "files"}
FINGERPRINT = ("model_type", "hidden_size", "vocab_size", "num_hidden_layers")  # what saved tensors must fit
# config.json of a native partial folder (bottleneck, linear_probe): without one, transformers builds a concrete
# class's default config and would load the few saved tensors into a random BERT-base; with sizes null (this is
# no whole model), its strict config refuses, and an Auto class refuses the unknown model type
REFUSE = {"model_type": ADAPTKIT_MODEL_TYPE, **dict.fromkeys(("vocab_size", "hidden_size", "d_model", "n_embd", "dim"))}
NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]{0,63}")  # an adapter's name: a module key and a sub-folder name
SAMPLE = 8  # values of the input embeddings recorded: a base with other weights (another seed) is refused


def unwrap(model: nn.Module) -> nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def adapter_name(name: Any, field: str = "name") -> str:
    if not isinstance(name, str):
        raise ConfigTypeError(field, name, f"expected a str, got {type(name).__name__}", "pass a name like 'sst2'")
    if not NAME.fullmatch(name):
        raise ConfigError(field, name, "is not an adapter name (letters, digits, _, -)", "use a name like 'sst2'")
    return name


def _embedding_sample(model: nn.Module, adapted: bool = False) -> list[float] | None:
    """A sample of the input embeddings; None without them, or (``adapted``) when they train: a causal LM's probed
    ``lm_head`` is tied to them, and a fresh base would not match the trained values."""
    try:  # a model without input embeddings (or one that does not say) records no sample
        weight = getattr(unwrap(model).get_input_embeddings(), "weight", None)
    except (AttributeError, NotImplementedError):
        return None
    if not isinstance(weight, torch.Tensor) or weight.is_meta or type(weight) not in (torch.Tensor, nn.Parameter):
        return None
    owned = set(model.__dict__.get(OWNED, ()))
    if adapted and any(p.data_ptr() == weight.data_ptr() for n, p in model.named_parameters(remove_duplicate=False)
                       if p.requires_grad or n in owned):
        return None
    flat = weight.detach().reshape(-1)
    return [float(flat[i * (flat.numel() - 1) // (SAMPLE - 1)]) for i in range(SAMPLE)]


def base_record(model: nn.Module) -> dict[str, Any]:
    """Where the base came from (absolute if local), its class, the config fields saved tensors depend on, and a
    sample of its frozen input embeddings (a model built from a config also records the seed it was built with)."""
    base, strategy = unwrap(model), model.__dict__.get(MARKER)
    config = getattr(base, "config", None)
    name = getattr(config, "name_or_path", None) or None
    if name and Path(name).exists():
        name = str(Path(name).resolve())
    plain = {k: v if v is None or isinstance(v, (int, str, float)) else str(v)
             for k in FINGERPRINT for v in [getattr(config, k, None)]}
    sample = _embedding_sample(model, strategy is not None) if strategy is None or strategy.freezes_base else None
    return {"name_or_path": name, "class": type(base).__name__, "config": plain, "embedding_sample": sample,
            "seed": base.__dict__.get(FROM_CONFIG_SEED)}


def label_names(model: nn.Module) -> dict[str, dict] | None:
    base = unwrap(model)
    config = getattr(base, "config", None)
    if not targets.new_head_names(base) or not getattr(config, "id2label", None):
        return None
    return {"id2label": {str(i): str(n) for i, n in config.id2label.items()},
            "label2id": {str(n): int(i) for n, i in config.label2id.items()}}


def save(model: nn.Module, directory: Any, state_dict: dict | None = None, field: str = "directory") -> Path:
    if state_dict is None and any(isinstance(p, DTensor) for p in model.parameters()):  # save_pretrained's too
        raise UnsupportedError("model", "sharded by FSDP (DTensor)", "this process holds only its shard",
                               "call adaptkit.distributed.save_adapter(accelerator, model, directory) on every process")
    return folders.commit(directory, lambda tmp: write_folder(model, tmp, state_dict), field)


def write_folder(model: nn.Module, directory: Path, state_dict: dict | None = None) -> dict[str, Any]:
    """Write the adapter's files into ``directory`` (empty); return adaptkit_config.json's contents."""
    strategy = model.__dict__[MARKER]
    strategy.save(model, directory, state_dict=state_dict)
    base, version = base_record(model), versions.installed("adaptkit") or "unknown"
    data = {"format": FORMAT, "adaptkit_version": version, "base_model": base["name_or_path"], "base": base,
            "labels": label_names(model), "strategy": strategy.to_dict()}
    if len(getattr(model, "peft_config", None) or {}) > 1:  # named adapters: PEFT writes each in <name>/
        data["adapters"] = {"names": sorted(model.peft_config), "active": model.active_adapter}
    for path in directory.rglob("adapter_config.json"):  # PEFT records the base as typed (often relative)
        config = json.loads(path.read_text())
        if base["name_or_path"] and config.get("base_model_name_or_path") != base["name_or_path"]:
            path.write_text(json.dumps({**config, "base_model_name_or_path": base["name_or_path"]}, indent=2) + "\n")
    if strategy.freezes_base and not isinstance(strategy, PeftStrategy):  # see REFUSE below
        (directory / "config.json").write_text(json.dumps(REFUSE | {"transformers_version": transformers.__version__}))
    card.write(model, directory, data)
    return data


# ---- reading ------------------------------------------------------------------------------------------
def read_file(directory: Path) -> tuple[Strategy, dict[str, Any]]:
    """``adaptkit_config.json``, validated: unknown keys or wrong types raise, nothing executes."""
    path = directory / CONFIG_NAME
    data = folders.read_json(path)
    if not isinstance(data, dict) or set(data) - FILE_KEYS or data.get("format") != FORMAT:
        raise AdapterFormatError(str(path), sorted(data) if isinstance(data, dict) else type(data).__name__,
                                 f"is not an {FORMAT} file", "pass a folder this adaptkit's save wrote")
    for key, kind in (("strategy", dict), ("base", (dict, type(None))), ("labels", (dict, type(None)))):
        inner = (data.get(key) or {}).get("config", {}) if key == "base" and isinstance(data.get(key), dict) else {}
        if not isinstance(data.get(key), kind) or not isinstance(inner, dict):
            raise AdapterFormatError(f"{path}:{key}", data.get(key), "must be an object", "save the adapter again")
    spec = data["strategy"]
    cls = strategies.get(str(spec.get("strategy")))
    # an option added since the folder was saved takes the value the folder was trained with, not today's default
    return cls.from_dict({**cls.saved_before, **spec}), data


def read_adapters(data: dict[str, Any], path: Path) -> dict[str, Any]:
    spec = data.get("adapters") or {"names": ["default"], "active": "default"}
    names = spec.get("names") if isinstance(spec, dict) else None
    if not (isinstance(names, list) and "default" in names and spec.get("active") in names
            and all(isinstance(n, str) and NAME.fullmatch(n) for n in names)):
        raise AdapterFormatError(f"{path}:adapters", spec, "must list names, 'default' and the active one",
                                 "save the adapter again")
    return spec


def read_peft_config(folder: Path, base_model: nn.Module) -> PeftConfig:
    """``adapter_config.json`` as a peft.PeftConfig: not JSON, an unknown method, fields PEFT refuses, a task type
    other than the base's, or a prompt sized for another base is a typed error naming the file."""
    path = folder / "adapter_config.json"
    data = folders.read_json(path)
    known = sorted(t.value for t in PeftType)
    if not isinstance(data, dict) or data.get("peft_type") not in known:
        raise AdapterFormatError(f"{path}:peft_type", data.get("peft_type") if isinstance(data, dict) else
                                 type(data).__name__, "is not a PEFT method", f"name one of {known}")
    try:
        config = PeftConfig.from_pretrained(str(folder))
        PeftMethod.from_peft_config(config)  # field types: PEFT keeps r="8" and fails deep inside a layer
    except (TypeError, ValueError, KeyError, AttributeError, RecursionError) as exc:
        raise AdapterFormatError(str(path), data.get("peft_type"), f"refused by PEFT: {type(exc).__name__}: "
                                 f"{exc}"[:400], "restore it, or save the adapter again") from None
    check_task_type(f"{path}:task_type", config, base_model, AdapterFormatError)
    model_config = getattr(unwrap(base_model), "config", None)
    if not config.is_prompt_learning or model_config is None:
        return config
    # PEFT builds a prefix from the sizes in adapter_config.json, not the model's: one trained on another width or
    # depth loads, then fails at the first forward. PEFT's own sizing gives the base's (a grouped-query model's
    # prefix, Llama's, is as wide as its key/value heads, not hidden)
    expected = type(config)(task_type=config.task_type)
    try:
        _prepare_prompt_learning_config(expected, model_config)
    except ValueError:  # PEFT cannot size it either (no head count in the config): nothing to compare against
        return config
    for field in ("token_dim", "num_layers"):
        here, saved = getattr(expected, field), getattr(config, field, None)
        if saved is not None and here is not None and saved != here:
            raise AdapterFormatError(f"{path}:{field}", saved, f"this base has {here}",
                                     "load it onto the base model it was trained on")
    return config


def check_task_type(field: str, config: PeftConfig, model: nn.Module | None, error: type) -> None:
    want = targets.peft_task_type(unwrap(model)) if model is not None else None
    if config.task_type is not None and want is not None and str(config.task_type) != str(want):
        raise error(field, str(config.task_type), f"does not match {type(unwrap(model)).__name__} ({want})",
                    f"use task_type={str(want)!r} (or none), or the model it was trained on")


def check_agreement(directory: Path, strategy: Strategy, peft_config: PeftConfig, base_model: nn.Module) -> None:
    """adaptkit_config.json and adapter_config.json must say the same (PEFT would load with its own values)."""
    expected = strategy.peft_config(base_model).to_dict()
    saved = peft_config.to_dict()
    wrong = {k: (v, saved[k]) for k, v in expected.items() if k in saved and isinstance(v, (int, float))
             and isinstance(saved[k], (int, float)) and k != "inference_mode" and v != saved[k]}
    if wrong:
        ours, theirs = ", ".join(f"{k}={e}" for k, (e, _) in wrong.items()), {k: s for k, (_, s) in wrong.items()}
        raise AdapterFormatError(str(directory / "adapter_config.json"), theirs, f"contradicts {CONFIG_NAME} ({ours})",
                                 "restore it from a good copy")


def check_base(directory: Path, saved: dict[str, Any], base_model: nn.Module) -> None:
    """Refuse a base whose architecture, sizes or weights differ from the one the adapter was trained on."""
    record, actual = saved.get("base") or {}, base_record(base_model)
    wrong = {k: (v, actual["config"].get(k)) for k, v in (record.get("config") or {}).items()
             if v is not None and actual["config"].get(k) is not None and actual["config"][k] != v}
    detail = ", ".join(f"{k} {a!r} != saved {s!r}" for k, (s, a) in wrong.items())
    sample, here = record.get("embedding_sample"), _embedding_sample(base_model)
    if not wrong and isinstance(sample, list) and here is not None and len(sample) == len(here):
        if not torch.allclose(torch.tensor(here), torch.tensor(sample, dtype=torch.float32), rtol=1e-2, atol=1e-3):
            detail = "its input embeddings hold other values (other weights, e.g. another seed)"
    if not detail:
        return
    named = lambda cls, path: f"{cls} ({path})" if path else str(cls)  # noqa: E731
    seed = record.get("seed")
    fix = (f"build the base as it was: transformers.set_seed({seed}), then from_config(config)" if seed is not None
           else f"load the base recorded in {directory / CONFIG_NAME} and pass it to adaptkit.load")
    was = named(record.get("class"), record.get("name_or_path"))
    raise BaseMismatchError("base_model", named(actual["class"], actual["name_or_path"]),
                            f"is not the base this adapter was trained on, {was}: {detail}", fix)


def restore_labels(saved: dict[str, Any], base_model: nn.Module) -> None:
    """Put the saved label names on the base's config, so outputs and pipelines name the classes."""
    labels, config = saved.get("labels"), getattr(unwrap(base_model), "config", None)
    if not labels or config is None:
        return
    try:
        id2label = {int(i): str(n) for i, n in labels["id2label"].items()}
        label2id = {str(n): int(i) for n, i in labels["label2id"].items()}
    except (KeyError, TypeError, ValueError, AttributeError):
        raise AdapterFormatError(f"{CONFIG_NAME}:labels", labels, "must map id2label, label2id", "save again") from None
    if len(id2label) == config.num_labels:  # else the head-shape check names the mismatch
        config.id2label, config.label2id = id2label, label2id


def fill_task_type(directory: Path, config: PeftConfig, base_model: nn.Module, saved_keys: list[str]) -> None:
    """A PEFT folder saved without ``task_type`` would load onto a classifier as a plain PeftModel and leave its
    head as the base has it (random when freshly added). Fill in the task type and the head when the saved
    tensors hold the head; refuse when they do not."""
    base = unwrap(base_model)
    heads = targets.new_head_names(base)
    if config.task_type is not None or not heads:
        return
    if not all(any(k.startswith(f"base_model.model.{h}.") for k in saved_keys) for h in heads):
        raise AdapterFormatError(f"{directory / 'adapter_config.json'}:task_type", None, "the folder holds no trained "
                                 f"{heads} for this {type(base).__name__}: its head would stay untrained",
                                 "save it again with task_type set (PEFT saves the head), or load onto AutoModel")
    config.task_type = targets.peft_task_type(base)
    config.modules_to_save = sorted(set(config.modules_to_save or []) | set(heads))


def check_peft_keys(model: nn.Module, name: str, folder: Path, saved_keys: list[str]) -> None:
    """Every tensor in the file must have been loaded into an adapter module, and every adapter module must
    have come from the file (PEFT only warns about either)."""
    saved, expected = set(saved_keys), set(get_peft_model_state_dict(model, adapter_name=name))
    missing, unexpected = sorted(expected - saved), sorted(saved - expected)
    if missing or unexpected:
        raise AdapterFormatError(str(folder / WEIGHTS_NAME), {"missing": missing[:3], "unexpected": unexpected[:3]},
                                 f"the weights do not match the model's adapter modules ({len(missing)} missing, "
                                 f"{len(unexpected)} unexpected)", "load onto the base (task class too) it trained on")


def check_weights(directory: Path, base_model: nn.Module, strategy: Strategy) -> list[str]:
    """Safetensors only (never unpickle), readable, finite floating-point tensors, and a saved task head must fit
    the base's. Returns the saved tensor names."""
    weights = weights_file(directory, strategy)
    if not weights.is_file():
        pickled = sorted(p.name for p in directory.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl", ".ckpt"))
        raise AdapterFormatError("directory", str(directory), f"has no {weights.name}" + (f", only pickle files "
                                 f"{pickled} (unpickling runs code)" if pickled else ""), "save as safetensors")
    try:
        saved = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as exc:
        raise AdapterFormatError(str(weights), f"{weights.stat().st_size} bytes", "is not a readable safetensors file "
                                 f"(truncated?): {exc}", "restore the folder from a good copy") from None
    for k, t in saved.items():
        bad = "is not floating point" if not (t.is_floating_point() or not strategy.freezes_base) else \
            "holds NaN or infinite values" if t.is_floating_point() and not torch.isfinite(t).all() else None
        if bad:
            raise AdapterFormatError(f"{weights}:{k}", str(t.dtype), bad, "restore the folder from a good copy")
    base = unwrap(base_model)
    for head in targets.new_head_names(base):
        for name, p in getattr(base, head).named_parameters():
            key, want = f"{head}.{name}", tuple(p.shape)
            match = next((k for k in saved if k == key or k.endswith("." + key)), None)
            got = tuple(saved[match].shape) if match else want
            labels = len(got) == len(want) and got[1:] == want[1:]  # only the output rows differ: the label count
            if got != want:
                problem, fix = ((f"the saved head has {got[0]} outputs, this base's {key} has {want[0]}",
                                 f"load the base model with num_labels={got[0]}") if labels else
                                (f"does not fit {key} {want}: another hidden size",
                                 "load it onto the base it was trained on"))
                raise AdapterFormatError(f"{weights.name}:{match}", got, problem, fix)
    return list(saved)
