"""What every strategy is: a typed, validated config that knows how to apply, save, load and merge itself.

A strategy is one dataclass. Its fields are the user's options (with defaults that work), its class
variables say what it can do. Two families exist:

* PEFT-backed strategies (``lora``, ``prefix``, any other PEFT method) subclass :class:`PeftStrategy`:
  they only build a ``peft.PeftConfig``; applying, saving (PEFT's folder format), loading and merging
  are PEFT's own.
* Native strategies (``bottleneck``, ``linear_probe``, ``full``) subclass :class:`Strategy` and change
  the model in place; saving writes exactly the tensors that train (plus ``adaptkit_config.json``).

Adding a strategy is one new file in this folder with a class decorated by ``@register``.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from adaptkit.errors import AdapterFormatError, ConfigError, ConfigTypeError, NotMergeableError, UnknownOptionError

CONFIG_NAME = "adaptkit_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"  # PEFT's name: PEFT strategies' tensors (and older native folders)
# native strategies' tensors: the name the stock transformers Trainer reloads checkpoints and the best model
# from (it would look for pytorch_model.bin beside an adapter_model.safetensors of a non-PEFT model)
NATIVE_WEIGHTS_NAME = "model.safetensors"
MARKER = "_adaptkit_strategy"  # attribute set on every model adapt() returns
# names of the tensors a native strategy trains, recorded when it is applied or loaded: a model loaded
# frozen (or frozen by the user) still saves them, instead of writing an empty adapter
OWNED = "_adaptkit_owned"


def type_ok(value: Any, hint: Any) -> bool:
    """A small runtime check for the annotation shapes strategy configs use."""
    origin = typing.get_origin(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(type_ok(value, arg) for arg in typing.get_args(hint))
    if origin is typing.Literal:
        return value in typing.get_args(hint)
    if hint is type(None):
        return value is None
    if origin in (list, tuple):
        (item,) = typing.get_args(hint)[:1] or (Any,)
        return isinstance(value, (list, tuple)) and all(type_ok(v, item) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True


def describe_type(hint: Any) -> str:
    """An annotation in words, for error messages (``Literal`` as its choices)."""
    if typing.get_origin(hint) is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    return hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")


@dataclasses.dataclass
class Strategy:
    """Base class of every strategy config. Subclasses are dataclasses and set the class variables."""

    name: ClassVar[str] = ""
    mergeable: ClassVar[bool] = False          # can merge() fold it into the base weights?
    supports_quantized: ClassVar[bool] = True  # can it train on an 8-bit / 4-bit base?
    freezes_base: ClassVar[bool] = True        # False only for full fine-tuning
    weights_name: ClassVar[str] = NATIVE_WEIGHTS_NAME
    aliases: ClassVar[dict[str, str]] = {}   # PEFT's option name -> this config's field
    alias_values: ClassVar[dict[str, Any]] = {}  # PEFT's option name -> converts its value, where they differ
    # option -> the value a folder saved before the option existed behaved as (read_file fills it in)
    saved_before: ClassVar[dict[str, Any]] = {}

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, tuple):  # accept tuples where lists are declared, store lists (JSON-able)
                value = list(value)
                setattr(self, f.name, value)
            hint = hints[f.name]
            literal = typing.get_origin(hint) is typing.Literal
            if literal and isinstance(value, tuple({type(a) for a in typing.get_args(hint)})) \
                    and value not in typing.get_args(hint):
                allowed = ", ".join(repr(a) for a in typing.get_args(hint))
                raise ConfigError(field=f"{type(self).__name__}.{f.name}", value=value,
                                  problem=f"must be one of {allowed}", fix=f"use one of {allowed} (default: {f.default!r})")
            if not type_ok(value, hint):
                raise ConfigTypeError(
                    field=f"{type(self).__name__}.{f.name}", value=value,
                    problem=f"expected {describe_type(hints[f.name])}, got {type(value).__name__}",
                    fix=f"pass a {describe_type(hints[f.name])} (default: {f.default!r})")
        self.validate()

    @property
    def label(self) -> str:
        """What tables print: the strategy name (the PEFT method for the pass-through)."""
        return self.name

    # ---- options -------------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise ConfigError for values of the right type that still cannot work."""

    def to_dict(self) -> dict[str, Any]:
        return {"strategy": self.name, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Strategy":
        data = dict(data)
        given = data.pop("strategy", cls.name)
        if given != cls.name:
            raise UnknownOptionError(field="strategy", value=given, problem=f"this dict is not a {cls.name} config",
                                     fix=f"use the config class registered as {given!r}")
        return cls(**data)  # unknown keys and PEFT's names: see resolve_options()

    @classmethod
    def resolve_options(cls, given: dict[str, Any]) -> dict[str, Any]:
        """``given`` with PEFT's option names (``aliases``) renamed to this config's; unknown names refused
        with "did you mean". Every way of building a config passes through here (``register`` wraps
        ``__init__``), so ``LoRA(rank=8)`` fails the way ``from_dict({"rank": 8})`` does."""
        out: dict[str, Any] = {}
        for key, value in given.items():
            name = cls.aliases.get(key, key)
            if name in out or (name != key and name in given):
                raise ConfigError(field=f"{cls.__name__}.{name}", value=value,
                                  problem=f"given twice (as {name!r} and as PEFT's {key!r})", fix="pass it once")
            convert = cls.alias_values.get(key)
            out[name] = convert(value) if convert is not None else value
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(out) - known)
        if unknown:
            import difflib
            names = known | set(cls.aliases)
            hints = [f"{u!r} -> did you mean {m[0]!r}?" for u in unknown
                     if (m := difflib.get_close_matches(u, names, n=1, cutoff=0.4))]
            raise UnknownOptionError(
                field=f"{cls.__name__} options", value=unknown, problem="unknown option(s)",
                fix=("; ".join(hints) + "; " if hints else "") + f"valid options are {sorted(known)}"
                    + (f" (or PEFT's names {sorted(cls.aliases)})" if cls.aliases else ""))
        return out

    # ---- behaviour -----------------------------------------------------------------------------
    def apply(self, model: nn.Module) -> nn.Module:
        """Return the adapted model (may be the same object, changed in place). Base must not be adapted."""
        raise NotImplementedError

    def save(self, model: nn.Module, directory: Path, state_dict: dict | None = None) -> None:
        """Write what this strategy trained into ``directory`` (an empty temporary folder). ``state_dict``
        is a gathered one (FSDP, DeepSpeed) to take the tensors from instead of the model's own."""
        save_tensors(owned_tensors(model, state_dict), directory / self.weights_name)

    def load(self, directory: Path, base_model: nn.Module) -> nn.Module:
        """Apply this config to ``base_model`` and load the saved tensors into it."""
        model = self.apply(base_model)
        if self.freezes_base:  # as adapt: what trains is fp32 on a bf16 base, so saved fp32 values load unrounded
            from adaptkit.precision import keep_trainable_fp32
            keep_trainable_fp32(model)
        load_tensors_into(model, weights_file(directory, self))
        return model

    def merge(self, model: nn.Module) -> nn.Module:
        raise NotMergeableError(field="strategy", value=self.name,
                                problem="its trained pieces cannot be folded into the base weights",
                                fix="keep the adapted model as it is, or use a mergeable strategy such as 'lora'")


# ---- tensors ------------------------------------------------------------------------------------
def trained_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter that requires grad, by state-dict name, once (tied weights are kept once)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, p in model.named_parameters():  # named_parameters() already drops tied duplicates
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            out[name] = p.detach().cpu().contiguous()
    return out


def owned_tensors(model: nn.Module, state_dict: dict | None = None) -> dict[str, torch.Tensor]:
    """What ``save`` writes for a native strategy: the tensors it trains when applied (recorded then,
    so freezing them later does not drop them) plus anything the user made trainable since; taken
    from ``state_dict`` where one is given."""
    out = trained_tensors(model)
    recorded = model.__dict__.get(OWNED, ())
    if recorded:
        params = dict(model.named_parameters())
        out = {name: params[name].detach().cpu().contiguous() for name in recorded if name in params} | out
    if state_dict is not None:
        out = {name: state_dict[name].detach().cpu().contiguous() for name in out}
    return dict(sorted(out.items()))


def weights_file(directory: Path, strategy: "Strategy") -> Path:
    """The strategy's weights file in ``directory``. Native folders written before the native name
    existed used PEFT's."""
    path = directory / strategy.weights_name
    legacy = directory / WEIGHTS_NAME
    return legacy if not path.is_file() and legacy.is_file() else path


def save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file
    save_file({k: v.clone() for k, v in tensors.items()}, str(path), metadata={"format": "pt"})


def load_tensors_into(model: nn.Module, path: Path) -> None:
    """Load a safetensors file of trained tensors; every trainable tensor must be in it and fit."""
    from safetensors.torch import load_file
    if not path.is_file():
        raise AdapterFormatError(field="weights file", value=str(path), problem="does not exist",
                                 fix="pass the folder written by adaptkit.save")
    saved = load_file(str(path))
    expected = trained_tensors(model)
    missing = sorted(set(expected) - set(saved))
    unexpected = sorted(set(saved) - set(expected))
    if missing or unexpected:
        raise AdapterFormatError(
            field=str(path), value={"missing": missing[:5], "unexpected": unexpected[:5]},
            problem=f"tensors do not match the strategy ({len(missing)} missing, {len(unexpected)} unexpected)",
            fix="load with the same base model architecture and strategy options that were saved")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in saved.items():
            target = params[name]
            if target.shape != tensor.shape:
                raise AdapterFormatError(field=f"{path.name}:{name}", value=tuple(tensor.shape),
                                         problem=f"shape differs from the model's {tuple(target.shape)}",
                                         fix="load into the same base model (same sizes and num_labels)")
            target.copy_(tensor.to(dtype=target.dtype, device=target.device))


def write_config(config: dict[str, Any], path: Path) -> None:
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


class PeftStrategy(Strategy):
    """A strategy that PEFT implements: subclasses only build the ``peft.PeftConfig``.

    Saving writes PEFT's own folder (``adapter_config.json`` + ``adapter_model.safetensors``), so the
    folder loads with plain ``peft.PeftModel.from_pretrained``. New task heads go into
    ``modules_to_save`` so they are trained and saved with the adapter instead of staying random.
    """

    def peft_config(self, model: nn.Module):  # -> peft.PeftConfig
        raise NotImplementedError

    def apply(self, model: nn.Module) -> nn.Module:
        from peft import get_peft_model

        from adaptkit import lengths
        config = self.peft_config(model)
        # virtual tokens (prefix, prompt tuning, P-tuning) take positions: as many as the model has fail only at
        # the first forward, deep in the embeddings
        limit, extra = lengths.max_positions(model), lengths.virtual_tokens(self)
        if limit is not None and extra >= limit:
            raise ConfigError(field=f"{type(self).__name__}.num_virtual_tokens", value=extra,
                              problem=f"leaves no room for text in {type(model).__name__}'s {limit} positions",
                              fix=f"use num_virtual_tokens < {limit} (typically 10-100)")
        return get_peft_model(model, config)

    weights_name: ClassVar[str] = WEIGHTS_NAME

    def save(self, model: nn.Module, directory: Path, state_dict: dict | None = None) -> None:
        # the class's method: the instance's own save_pretrained is adaptkit's (adaptkit.hf), which calls this
        type(model).save_pretrained(model, str(directory), safe_serialization=True,
                                    **({"state_dict": state_dict} if state_dict is not None else {}))

    def load(self, directory: Path, base_model: nn.Module, trainable: bool = False, config=None) -> nn.Module:
        """``config``: a PeftConfig to use instead of the folder's adapter_config.json (one completed on load)."""
        from peft import PeftConfig, PeftModel
        if not (trainable and PeftConfig.from_pretrained(str(directory)).is_prompt_learning):
            return PeftModel.from_pretrained(base_model, str(directory), is_trainable=trainable, config=config)
        # PEFT refuses is_trainable for prompt learning; a loaded prefix must keep training all the same
        # (resuming, or tuning further), so load it frozen and unfreeze what adapt would train
        model = PeftModel.from_pretrained(base_model, str(directory), config=config)
        model.peft_config[model.active_adapter].inference_mode = False
        model.prompt_encoder[model.active_adapter].requires_grad_(True)
        model.set_adapter(model.active_adapter, inference_mode=False)
        return model

    def merge(self, model: nn.Module) -> nn.Module:
        from peft import PromptLearningConfig
        config = model.peft_config[model.active_adapter]
        if isinstance(config, PromptLearningConfig) or not hasattr(model, "merge_and_unload"):
            super().merge(model)  # raises NotMergeableError
        return _merge_and_unwrap(model)


def _merge_and_unwrap(model: nn.Module) -> nn.Module:
    """PEFT's own merge maths, then every PEFT wrapper replaced by the plain module it stands for.

    Not ``merge_and_unload()``: for IA3 and other older tuners it assumes every wrapped module has a
    ``.weight`` and crashes halfway (leaving a half-unloaded model) when a task head such as RoBERTa's
    ``classifier`` is in ``modules_to_save``.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import ModulesToSaveWrapper
    model.merge_adapter()
    base = model.get_base_model()
    active = model.active_adapter
    wrappers = [(n, m) for n, m in base.named_modules() if isinstance(m, (BaseTunerLayer, ModulesToSaveWrapper))]
    for name, module in wrappers:  # outer before inner; an inner one vanishes with its unwrapped outer
        parent_name, _, child = name.rpartition(".")
        parent = base.get_submodule(parent_name) if parent_name else base
        if getattr(parent, child, None) is not module:
            continue
        plain = module.modules_to_save[active] if isinstance(module, ModulesToSaveWrapper) else module.get_base_layer()
        setattr(parent, child, plain)
    leftovers = [n for n, m in base.named_modules() if isinstance(m, (BaseTunerLayer, ModulesToSaveWrapper))]
    if leftovers:  # a PEFT structure this code does not know: refuse rather than return a hybrid
        raise NotMergeableError(field="model", value=leftovers[:3], problem="PEFT layers remain after merging",
                                fix="use model.merge_and_unload() from PEFT directly, or keep the adapter unmerged")
    base.__dict__.pop("peft_config", None)
    return base
