"""What an adapter folder records besides its tensors, how ``load`` reads it, and the checks it makes first.

Every folder ``adaptkit.save`` (or an adapted model's ``save_pretrained``) writes holds:

* ``adaptkit_config.json``: the strategy and its options, the base model (an absolute path or a hub
  id with its revision, its class, and a fingerprint of its config) and the label names;
* the trained tensors: PEFT's ``adapter_model.safetensors`` (+ ``adapter_config.json``) for PEFT
  strategies, ``model.safetensors`` for native ones (the name the stock ``Trainer`` reloads
  checkpoints and the best model from; for ``bottleneck`` and ``linear_probe`` it holds only the trained
  tensors, for ``full`` the whole model);
* ``config.json``: for ``full`` the model's own (``from_pretrained`` loads the folder exactly); for the
  other native strategies and PEFT prompt learning (prefix) a config of model type ``adaptkit``, so
  ``from_pretrained`` refuses the folder (naming ``adaptkit.load``), through an ``Auto`` class or a
  concrete one, instead of filling a base model with a few tensors or failing inside PEFT; LoRA-family
  folders have none, and transformers' PEFT integration loads them onto the recorded base exactly;
* ``README.md``: the model card (``adaptkit.card``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from adaptkit import card, folders, strategies, targets
from adaptkit.errors import AdapterFormatError, BaseMismatchError
from adaptkit.strategies.base import CONFIG_NAME, MARKER, WEIGHTS_NAME, PeftStrategy, Strategy, weights_file, write_config

FORMAT = "adaptkit-adapter/1"
FILE_KEYS = {"format", "adaptkit_version", "base_model", "base", "labels", "strategy", "adapters", "files"}
ADAPTKIT_MODEL_TYPE = "adaptkit"  # config.json's model_type in native partial folders
# the base config's fields that decide whether saved tensors can fit it
FINGERPRINT = ("model_type", "hidden_size", "vocab_size", "num_hidden_layers")


def unwrap(model: nn.Module) -> nn.Module:
    from peft import PeftModel
    return model.get_base_model() if isinstance(model, PeftModel) else model


def base_record(model: nn.Module) -> dict[str, Any]:
    """Where the base came from (absolute if local, so the folder works from any working directory),
    its revision, its class, and the fields of its config that saved tensors depend on."""
    base = unwrap(model)
    config = getattr(base, "config", None)
    name = getattr(config, "name_or_path", None) or None
    if name and Path(name).exists():
        name = str(Path(name).resolve())
    return {"name_or_path": name, "revision": getattr(config, "_commit_hash", None),
            "class": type(base).__name__,
            "config": {key: _plain(getattr(config, key, None)) for key in FINGERPRINT}}


def _plain(value: Any) -> Any:
    return value if value is None or isinstance(value, (int, str, float)) else str(value)


def label_names(model: nn.Module) -> dict[str, dict] | None:
    """id2label / label2id of a model with a new task head (a classifier), else None."""
    base = unwrap(model)
    config = getattr(base, "config", None)
    if not targets.new_head_names(base) or not getattr(config, "id2label", None):
        return None
    return {"id2label": {str(i): str(n) for i, n in config.id2label.items()},
            "label2id": {str(n): int(i) for n, i in config.label2id.items()}}


def version() -> str:
    from importlib.metadata import PackageNotFoundError, version as installed
    try:
        return installed("adaptkit")
    except PackageNotFoundError:
        return "unknown"


def metadata(model: nn.Module) -> dict[str, Any]:
    strategy = model.__dict__[MARKER]
    record = base_record(model)
    return {"format": FORMAT, "adaptkit_version": version(), "base_model": record["name_or_path"], "base": record,
            "labels": label_names(model), "strategy": strategy.to_dict()}


def write_folder(model: nn.Module, directory: Path, state_dict: dict | None = None) -> None:
    """Write every file of an adapter folder into ``directory`` (an empty temporary folder); the last is
    adaptkit_config.json, whose ``files`` list (the manifest) names every file this save owns."""
    strategy = model.__dict__[MARKER]
    strategy.save(model, directory, state_dict=state_dict)
    data = metadata(model)
    if len(getattr(model, "peft_config", None) or {}) > 1:  # named adapters: PEFT writes each in <name>/
        data["adapters"] = {"names": sorted(model.peft_config), "active": model.active_adapter}
    if isinstance(strategy, PeftStrategy):
        _absolute_peft_base(directory, data["base_model"])
    if _refuse_from_pretrained(model, strategy):
        import transformers
        write_config(refusing_config(transformers.__version__), directory / "config.json")
    (directory / "README.md").write_text(card.model_card(model, data))
    data["files"] = sorted({*folders.files_under(directory), CONFIG_NAME})
    write_config(data, directory / CONFIG_NAME)


def refusing_config(transformers_version: str) -> dict[str, Any]:
    """config.json of a folder that from_pretrained must refuse.

    ``AutoModel*`` reads model type ``adaptkit`` and reaches ``adaptkit.hf``'s stand-in, which raises the fix. A
    concrete class (``BertForSequenceClassification.from_pretrained(folder)``) skips the model type: it
    builds its own config class from these keys with defaults for the rest, and on a base of default sizes
    (BERT-base) it would load the few saved tensors into a randomly initialised model. transformers' configs
    are strict dataclasses, so the size fields every architecture has under one of these names hold the
    fix as text: the concrete class's config refuses the folder and its error shows that text.
    """
    fix = "an adaptkit adapter, not a whole model: load it with adaptkit.load(folder, base_model)"
    return {"model_type": ADAPTKIT_MODEL_TYPE, "transformers_version": transformers_version, "adaptkit": fix,
            **{key: fix for key in _SIZE_FIELDS}}


# size fields, named as the config classes name them (BERT/ViT/Llama, T5/BART, GPT-2)
_SIZE_FIELDS = ("vocab_size", "hidden_size", "d_model", "n_embd")


def _refuse_from_pretrained(model: nn.Module, strategy) -> bool:
    """Folders that transformers' from_pretrained cannot load exactly: native partial ones, and prompt
    learning (prefix, prompt tuning), which its PEFT integration cannot inject. A config.json beside
    adapter_config.json also keeps from_pretrained from switching to the recorded base."""
    if isinstance(strategy, PeftStrategy):
        config = model.peft_config[model.active_adapter]
        return bool(getattr(config, "is_prompt_learning", False))
    return strategy.freezes_base


def _absolute_peft_base(directory: Path, base: str | None) -> None:
    """PEFT records the base as it was typed (often relative); from_pretrained of the folder elsewhere
    would then look for it on the hub. Record the resolved path."""
    for path in directory.rglob("adapter_config.json"):
        config = json.loads(path.read_text())
        if base and config.get("base_model_name_or_path") != base:
            config["base_model_name_or_path"] = base
            path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


# ---- reading ------------------------------------------------------------------------------------------
def check_base(directory: Path, saved: dict[str, Any], base_model: nn.Module) -> None:
    """Refuse a base whose architecture, hidden size, vocabulary or depth differs from the saved one."""
    record = saved.get("base") or {}
    expected = record.get("config") or {}
    actual = base_record(base_model)
    wrong = {k: (v, actual["config"].get(k)) for k, v in expected.items()
             if v is not None and actual["config"].get(k) is not None and actual["config"][k] != v}
    if wrong:
        detail = ", ".join(f"{k} {a!r} != saved {s!r}" for k, (s, a) in wrong.items())
        def named(cls, path):
            return f"{cls} ({path})" if path else str(cls)
        raise BaseMismatchError(
            field="base_model", value=named(actual["class"], actual["name_or_path"]),
            problem=f"is not the base this adapter was trained on, "
                    f"{named(record.get('class'), record.get('name_or_path'))}: {detail}",
            fix=f"load the base recorded in {directory / CONFIG_NAME} and pass it to adaptkit.load")


def restore_labels(saved: dict[str, Any], base_model: nn.Module) -> None:
    """Put the saved label names on the base's config, so outputs and pipelines name the classes."""
    labels = saved.get("labels")
    config = getattr(unwrap(base_model), "config", None)
    if not labels or config is None:
        return
    try:
        id2label = {int(i): str(n) for i, n in labels["id2label"].items()}
        label2id = {str(n): int(i) for n, i in labels["label2id"].items()}
    except (KeyError, TypeError, ValueError, AttributeError):
        raise AdapterFormatError(field=f"{CONFIG_NAME}:labels", value=labels,
                                 problem="must hold id2label and label2id maps",
                                 fix="re-save the adapter with adaptkit.save") from None
    if len(id2label) != config.num_labels:
        return  # the head-shape check names the mismatch; no half-renamed labels here
    config.id2label, config.label2id = id2label, label2id


def fill_task_type(directory: Path, options: dict[str, Any], base_model: nn.Module, saved_keys: list[str]) -> None:
    """A PEFT folder saved without ``task_type`` would load onto a classifier as a plain PeftModel and
    leave its head as the base has it (random when freshly added). Fill the task type (and the head in
    ``modules_to_save``) in ``options`` when the saved tensors hold the head; refuse when they do not."""
    base = unwrap(base_model)
    heads = targets.new_head_names(base)
    if options.get("task_type") is not None or not heads:
        return
    def saved(head: str) -> bool:
        return any(k.startswith(f"base_model.model.{head}.") for k in saved_keys)
    if all(saved(h) for h in heads):
        options["task_type"] = targets.peft_task_type(base)
        options["modules_to_save"] = sorted(set(options.get("modules_to_save") or []) | set(heads))
        return
    raise AdapterFormatError(
        field=f"{directory / 'adapter_config.json'}:task_type", value=None,
        problem=f"the folder holds no trained {heads} for this {type(base).__name__}; loaded, its head would "
                "stay as the base has it (random if freshly added)",
        fix="re-save the adapter with task_type set (e.g. 'SEQ_CLS'; PEFT then saves the head), or load it "
            "onto a model without a task head (AutoModel)")


def read_config(directory: Path) -> Strategy:
    """Read and validate ``adaptkit_config.json``: unknown keys or wrong types raise, nothing executes."""
    return read_file(directory)[0]


def read_file(directory: Path) -> tuple[Strategy, dict[str, Any]]:
    path = directory / CONFIG_NAME
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise AdapterFormatError(field=str(path), value=type(exc).__name__, problem=f"cannot be read: {exc}",
                                 fix="pass a folder written by adaptkit.save") from None
    if not isinstance(data, dict) or set(data) - FILE_KEYS or data.get("format") != FORMAT:
        raise AdapterFormatError(field=str(path), value=sorted(data) if isinstance(data, dict) else data,
                                 problem=f"is not an {FORMAT} file",
                                 fix="pass a folder written by adaptkit.save of this version")
    spec = data.get("strategy")
    if not isinstance(spec, dict):
        raise AdapterFormatError(field=f"{path}:strategy", value=spec, problem="must be an object",
                                 fix="re-save the adapter with adaptkit.save")
    cls = strategies.get(str(spec.get("strategy")))
    # an option added since the folder was saved takes the value the folder was trained with, not today's default
    return cls.from_dict({**cls.saved_before, **spec}), data


def read_peft_config(folder: Path):
    """``adapter_config.json`` as a peft.PeftConfig; a file that is not JSON, names an unknown PEFT
    method or holds fields PEFT refuses is a typed error naming the file."""
    from peft import PeftConfig, PeftType
    path = folder / "adapter_config.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise AdapterFormatError(field=str(path), value=type(exc).__name__, problem=f"cannot be read: {exc}",
                                 fix="restore the folder from a good copy, or save the adapter again") from None
    known = sorted(t.value for t in PeftType)
    if not isinstance(data, dict) or data.get("peft_type") not in known:
        value = data.get("peft_type") if isinstance(data, dict) else type(data).__name__
        raise AdapterFormatError(field=f"{path}:peft_type", value=value, problem="is not a PEFT method",
                                 fix=f"the file must name one of {known}; restore it or save the adapter again")
    from adaptkit.strategies.peft_method import PeftMethod
    try:
        config = PeftConfig.from_pretrained(str(folder))
        PeftMethod.from_peft_config(config)  # field types: PEFT keeps r="8" and fails deep inside a layer
    except (TypeError, ValueError, KeyError, AttributeError) as exc:
        raise AdapterFormatError(field=str(path), value=data.get("peft_type"),
                                 problem=f"refused by PEFT: {type(exc).__name__}: {exc}",
                                 fix="restore the file from a good copy, or save the adapter again") from None
    return config


def read_adapters(directory: Path) -> dict[str, Any]:
    path = directory / CONFIG_NAME
    spec = json.loads(path.read_text()).get("adapters") or {"names": ["default"], "active": "default"}
    names, active = spec.get("names") if isinstance(spec, dict) else None, spec.get("active") if isinstance(spec, dict) else None
    if (not isinstance(names, list) or "default" not in names or active not in names
            or not all(isinstance(n, str) and n and "/" not in n and not n.startswith(".") for n in names)):
        raise AdapterFormatError(field=f"{path}:adapters", value=spec,
                                 problem="must list the adapter names (including 'default') and the active one",
                                 fix="save the adapter again with adaptkit.save")
    return {"names": names, "active": active}


def check_prompt_shape(folder: Path, base_model: nn.Module) -> None:
    """PEFT builds a prefix from the sizes in adapter_config.json, not the model's: a prefix trained on
    another width or depth loads, then fails at the first forward. Compare them up front."""
    from peft.utils.other import _prepare_prompt_learning_config
    config = read_peft_config(folder)
    if not config.is_prompt_learning:
        return
    model_config = getattr(unwrap(base_model), "config", None)
    if model_config is None:
        return
    fresh = type(config)(num_virtual_tokens=config.num_virtual_tokens, task_type=config.task_type)
    try:
        fresh = _prepare_prompt_learning_config(fresh, model_config)
    except ValueError:
        return
    for field in ("token_dim", "num_layers", "num_attention_heads"):
        saved, here = getattr(config, field, None), getattr(fresh, field, None)
        if saved is not None and here is not None and saved != here:
            raise AdapterFormatError(
                field=f"{folder / 'adapter_config.json'}:{field}", value=saved,
                problem=f"the prefix was trained on a model with {field}={saved}; this base model has {here}",
                fix="load it onto the base model it was trained on (same width and depth)")


def check_peft_keys(model: nn.Module, name: str, folder: Path) -> None:
    """Every tensor in the file must have been loaded into an adapter module, and every adapter module
    must have come from the file (PEFT only warns about either)."""
    from peft.utils import get_peft_model_state_dict
    from safetensors import safe_open
    with safe_open(str(folder / WEIGHTS_NAME), "pt") as f:
        saved = set(f.keys())
    expected = set(get_peft_model_state_dict(model, adapter_name=name))
    missing, unexpected = sorted(expected - saved), sorted(saved - expected)
    if missing or unexpected:
        raise AdapterFormatError(
            field=str(folder / WEIGHTS_NAME), value={"missing": missing[:3], "unexpected": unexpected[:3]},
            problem=f"the weights do not match the model's adapter modules ({len(missing)} missing, "
                    f"{len(unexpected)} unexpected): adapter_config.json and the weights disagree, or this is "
                    "another base model",
            fix="load onto the base model (task class and architecture) the adapter was trained on, with the "
                "adapter_config.json saved beside the weights")


def check_weights(directory: Path, base_model: nn.Module, strategy: Strategy) -> list[str]:
    """Safetensors only (never unpickle), readable, and a saved task head must fit the base's.
    Returns the saved tensor names."""
    from safetensors import SafetensorError, safe_open
    weights = weights_file(directory, strategy)
    if not weights.is_file():
        pickled = sorted(p.name for p in directory.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl", ".ckpt"))
        raise AdapterFormatError(field="directory", value=str(directory), problem=f"has no {weights.name}" + (
            f"; it holds pickle files {pickled}, which adaptkit never loads (unpickling can run code)" if pickled
            else ""), fix="save adapters as safetensors (adaptkit.save does; PEFT: safe_serialization=True)")
    try:
        with safe_open(str(weights), "pt") as f:
            saved = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise AdapterFormatError(field=str(weights), value=f"{weights.stat().st_size} bytes",
                                 problem=f"is not a readable safetensors file (truncated or corrupt?): {exc}",
                                 fix="restore the folder from a good copy, or save the adapter again") from None
    base = unwrap(base_model)
    for head in targets.new_head_names(base):
        for name, p in getattr(base, head).named_parameters():
            key = f"{head}.{name}"
            match = next((k for k in saved if k == key or k.endswith("." + key)), None)
            if match is None or saved[match] == tuple(p.shape):
                continue
            got, want = saved[match], tuple(p.shape)
            if len(got) == len(want) and got[1:] == want[1:]:  # only the output rows differ: the label count
                raise AdapterFormatError(
                    field=f"{weights.name}:{match}", value=got,
                    problem=f"the saved task head has {got[0]} outputs; this base model's {key} has {want[0]} "
                            "(trained with another num_labels)",
                    fix=f"load the base model with num_labels={got[0]}, the count the adapter was trained with")
            raise AdapterFormatError(
                field=f"{weights.name}:{match}", value=got,
                problem=f"the saved task head does not fit this base model's {key} {want}: the adapter was "
                        "trained on a model of another hidden size",
                fix="load it onto the base checkpoint it was trained on (same hidden size)")
    return list(saved)
