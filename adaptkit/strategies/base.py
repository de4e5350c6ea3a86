"""Every strategy is a typed, validated dataclass (fields: the user's options; class variables: what it can do)
that applies, saves, loads and merges itself; a :class:`PeftStrategy` only builds a ``peft.PeftConfig``."""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, ClassVar

import torch
from peft import PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import get_peft_model_state_dict
from peft.utils.other import ModulesToSaveWrapper
from safetensors.torch import load_file, save_file
from torch import nn

from adaptkit import lengths, targets
from adaptkit.errors import (AdapterFormatError, ConfigError, ConfigTypeError, NotMergeableError, UnknownOptionError,
                             UnsupportedError)
from adaptkit.precision import keep_trainable_fp32
from adaptkit.names import NATIVE_WEIGHTS_NAME, OWNED, WEIGHTS_NAME


def type_ok(value: Any, hint: Any) -> bool:
    """A small runtime check for the annotation shapes strategy and PEFT configs use."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(type_ok(value, arg) for arg in args)
    if origin is typing.Literal:  # PEFT writes families as patterns: "pissa_niter_[number of iters]"
        return value in args or any(isinstance(a, str) and "[" in a and str(value).startswith(a[:a.index("[")])
                                    for a in args)
    if origin in (list, tuple):
        return isinstance(value, (list, tuple)) and all(type_ok(v, (args or (Any,))[0]) for v in value)
    if origin is dict or dataclasses.is_dataclass(hint):  # PEFT's to_dict() writes sub-configs as dicts
        return isinstance(value, dict) or (isinstance(hint, type) and isinstance(value, hint))
    if hint in (int, float):  # a bool is no number here; an int is a float
        return isinstance(value, (int, hint)) and not isinstance(value, bool)
    return hint is Any or not isinstance(hint, type) or isinstance(value, hint)


def check_types(values: dict[str, Any], hints: dict[str, Any], owner: str, fix: str = "", default: str = "") -> None:
    """Refuse a value of the wrong type (a Literal's value outside its choices: a ConfigError) for each hinted key."""
    for key, value in values.items():
        if key not in hints or type_ok(value, hint := hints[key]):
            continue
        choices = typing.get_args(hint) if typing.get_origin(hint) is typing.Literal else ()
        kind = ("one of " + ", ".join(repr(a) for a in choices) if choices
                else hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", ""))
        if choices and isinstance(value, tuple({type(a) for a in choices})):
            raise ConfigError(f"{owner}.{key}", value, f"must be {kind}", fix or f"use {kind}{default}")
        raise ConfigTypeError(f"{owner}.{key}", value, f"expected {kind}, got {type(value).__name__}",
                              fix or f"pass a {kind}{default}")


def refuse_unknown(given: Any, known: Any, field: str, valid: str) -> None:
    """Unknown option names, refused with "did you mean" for each."""
    if unknown := sorted(set(given) - set(known)):
        hints = [f"{u!r} -> did you mean {m[0]!r}?" for u in unknown
                 if (m := difflib.get_close_matches(u, known, n=1, cutoff=0.4))]
        raise UnknownOptionError(field, unknown, "unknown option(s)", "; ".join([*hints, valid]))


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
    # option -> the value a folder saved before the option existed behaved as (layout.read_file fills it in)
    saved_before: ClassVar[dict[str, Any]] = {}

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            if isinstance(value := getattr(self, f.name), tuple):  # tuples accepted, lists stored (JSON-able)
                setattr(self, f.name, value := list(value))
            check_types({f.name: value}, hints, type(self).__name__, default=f" (default: {f.default!r})")
        self.validate()

    @property
    def label(self) -> str:  # what tables print: the strategy name (the PEFT method for the pass-through)
        return self.name

    def validate(self) -> None:  # raises ConfigError for values of the right type that still cannot work
        pass

    def to_dict(self) -> dict[str, Any]:
        return {"strategy": self.name, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Strategy":
        data = dict(data)
        given = data.pop("strategy", cls.name)
        if given != cls.name:
            raise UnknownOptionError("strategy", given, f"is not a {cls.name} config", f"use {given!r}'s class")
        return cls(**data)  # unknown keys and PEFT's names: see resolve_options()

    @classmethod
    def resolve_options(cls, given: dict[str, Any]) -> dict[str, Any]:
        """PEFT's option names (``aliases``) renamed, unknown ones refused; ``register`` wraps ``__init__`` with it."""
        out: dict[str, Any] = {}
        for key, value in given.items():
            name = cls.aliases.get(key, key)
            if name in out or (name != key and name in given):
                raise ConfigError(f"{cls.__name__}.{name}", value, f"given twice (also as {key!r})", "pass it once")
            out[name] = cls.alias_values[key](value) if key in cls.alias_values else value
        known = {f.name for f in dataclasses.fields(cls)}
        refuse_unknown(out, known | set(cls.aliases), f"{cls.__name__} options", f"valid options are {sorted(known)}"
                       + (f" (or PEFT's names {sorted(cls.aliases)})" if cls.aliases else ""))
        return out

    def apply(self, model: nn.Module) -> nn.Module:  # the adapted model (may be the same object, changed in place)
        raise NotImplementedError

    def save(self, model: nn.Module, directory: Path, state_dict: dict | None = None) -> None:
        """Write what trains into ``directory`` (an empty temporary folder): the strategy's tensors and any the
        user unfroze besides. ``state_dict``: a gathered one (FSDP, DeepSpeed) to take the tensors from."""
        save_file(owned_tensors(model, state_dict), str(directory / self.weights_name), metadata={"format": "pt"})

    def load(self, directory: Path, base_model: nn.Module) -> nn.Module:
        """Apply this config to ``base_model`` and load the saved tensors (layout.check_weights read the file). A
        saved tensor of the base that the strategy does not train is one the user unfroze: it loads, and trains on."""
        model, path = self.apply(base_model), weights_file(directory, self)
        saved, params = load_file(str(path)), dict(model.named_parameters())
        missing = sorted({n for n, p in params.items() if p.requires_grad} - set(saved))
        if missing or (unknown := sorted(set(saved) - set(params))):
            raise AdapterFormatError(str(path), {"missing": missing[:5], "unexpected": unknown[:5]}, "tensors do not "
                                     "match the strategy", "load onto the base architecture that was saved")
        for name in saved:
            params[name].requires_grad_(True)
        if self.freezes_base:  # as adapt: what trains is fp32 on a bf16 base, so saved fp32 values load unrounded
            keep_trainable_fp32(model)
        model.load_state_dict(saved, strict=False)  # a shape that differs: torch's size mismatch, typed by core.load
        return model

    def merge(self, model: nn.Module) -> nn.Module:
        raise NotMergeableError("strategy", self.name, "cannot be folded into the base", "keep it, or use 'lora'")


def owned_tensors(model: nn.Module, state_dict: dict | None = None) -> dict[str, torch.Tensor]:
    """What ``save`` writes for a native strategy: the tensors it trains when applied (recorded then, so freezing
    them later does not drop them) plus anything made trainable since (tied weights once); from ``state_dict``."""
    params = dict(model.named_parameters())
    names = {n for n in model.__dict__.get(OWNED, ()) if n in params}
    names |= {n for n, p in params.items() if p.requires_grad}
    source = state_dict if state_dict is not None else {n: params[n].detach() for n in names}
    return {name: source[name].detach().cpu().contiguous().clone() for name in sorted(names)}


def weights_file(directory: Path, strategy: Strategy) -> Path:
    """The strategy's weights file in ``directory``; native folders written before the native name used PEFT's."""
    path, legacy = directory / strategy.weights_name, directory / WEIGHTS_NAME
    return legacy if not path.is_file() and legacy.is_file() else path


def pooler_if(train_pooler: bool, heads: list[str] | None, model: nn.Module, field: str) -> list[str]:
    """The backbone pooler a fresh head reads (BERT, MiniLM, ALBERT), when ``train_pooler`` and there is a fresh
    head: every strategy that adds a head trains it (lora.py's docstring has the measurements)."""
    return [p] if train_pooler and heads and (p := targets.pooler_to_train(model, field)) else []


class PeftStrategy(Strategy):
    """A strategy that PEFT implements: subclasses only build the ``peft.PeftConfig``. Saving writes PEFT's own
    folder, which plain ``peft.PeftModel.from_pretrained`` loads. New task heads go into ``modules_to_save``."""

    weights_name: ClassVar[str] = WEIGHTS_NAME

    def peft_config(self, model: nn.Module):  # -> peft.PeftConfig
        raise NotImplementedError

    def apply(self, model: nn.Module) -> nn.Module:
        config = self.peft_config(model)
        # virtual tokens (prefix, prompt tuning, P-tuning) take positions: as many as the model has fail only at
        # the first forward, deep in the embeddings
        limit, extra = lengths.max_positions(model), int(getattr(config, "num_virtual_tokens", 0) or 0)
        if limit is not None and extra >= limit and config.is_prompt_learning:
            raise ConfigError(f"{self.label}.num_virtual_tokens", extra, "leaves no room for text in "
                              f"{type(model).__name__}'s {limit} positions", f"use num_virtual_tokens < {limit}")
        try:
            return get_peft_model(model, config)
        except (ValueError, TypeError, AttributeError, NotImplementedError) as exc:  # PEFT refusing this model
            raise UnsupportedError(f"{self.label} options", type(model).__name__, "PEFT refuses "
                                   f"{type(config).__name__} on this model: {exc}", "set the option it names, or use "
                                   "'lora'; reload the base (PEFT may change it)") from None

    def save(self, model: nn.Module, directory: Path, state_dict: dict | None = None) -> None:
        # PEFT writes only its adapters and modules_to_save: a base tensor the user unfroze would be lost
        adapters = set(model.peft_config)
        kept = {k for name in adapters for k in get_peft_model_state_dict(model, adapter_name=name)}
        lost = [n for n, p in model.named_parameters() if p.requires_grad and n not in kept
                and not adapters & set(n.split("."))]  # PEFT's keys drop the adapter's name
        if lost:
            raise UnsupportedError("trainable tensors", lost[:5], f"{len(lost)} trainable tensor(s) outside the adapter"
                                   ", not saved by PEFT", "name their modules at adapt (modules_to_save=), or freeze")
        # the class's method: the instance's own save_pretrained is adaptkit's (adaptkit.hf), which calls this
        type(model).save_pretrained(model, str(directory), safe_serialization=True,
                                    **({"state_dict": state_dict} if state_dict is not None else {}))

    def load(self, directory: Path, base_model: nn.Module, trainable: bool = False, *, config) -> nn.Module:
        """``config``: the folder's adapter_config.json, read and checked (and completed) by ``core.load``."""
        if not (trainable and config.is_prompt_learning):
            return PeftModel.from_pretrained(base_model, str(directory), is_trainable=trainable, config=config)
        # PEFT refuses is_trainable for prompt learning; a loaded prefix must keep training all the same
        # (resuming, or tuning further), so load it frozen and unfreeze what adapt would train
        model = PeftModel.from_pretrained(base_model, str(directory), config=config)
        model.peft_config[model.active_adapter].inference_mode = False
        model.prompt_encoder[model.active_adapter].requires_grad_(True)
        model.set_adapter(model.active_adapter, inference_mode=False)
        return model

    def merge(self, model: nn.Module) -> nn.Module:
        """PEFT's own merge maths, then every PEFT wrapper replaced by the plain module it stands for. Not
        ``merge_and_unload()``: for IA3 and other older tuners it assumes every wrapped module has a ``.weight``
        and crashes halfway when a task head such as RoBERTa's ``classifier`` is in ``modules_to_save``."""
        if model.peft_config[model.active_adapter].is_prompt_learning or not hasattr(model, "merge_and_unload"):
            super().merge(model)  # raises NotMergeableError
        model.merge_adapter()
        base, active, kinds = model.get_base_model(), model.active_adapter, (BaseTunerLayer, ModulesToSaveWrapper)
        for name, module in [(n, m) for n, m in base.named_modules() if isinstance(m, kinds)]:
            parent_name, _, child = name.rpartition(".")  # outer before inner: an inner one goes with its outer
            parent = base.get_submodule(parent_name) if parent_name else base
            if getattr(parent, child, None) is module:
                wrapper = isinstance(module, ModulesToSaveWrapper)
                plain = module.modules_to_save[active] if wrapper else module.get_base_layer()
                setattr(parent, child, plain)
        if leftovers := [n for n, m in base.named_modules() if isinstance(m, kinds)]:  # refuse rather than a hybrid
            raise NotMergeableError("model", leftovers[:3], "PEFT layers remain after merging", "keep it unmerged")
        base.__dict__.pop("peft_config", None)
        return base
