"""Two workarounds for PEFT 0.21.2, per model instance (no class is patched). Delete each when PEFT fixes it.

1. transformers 5.24 renamed forward's ``past_key_values`` to ``cache`` (an alias until 5.40); PEFT's prefix
   tuning still injects ``past_key_values``: a classifier is refused (PEFT reads the signature) and ``generate()``
   drops the prefix silently (its empty ``cache`` wins). The bridge shows ``past_key_values`` in the signature
   and moves the prefix into an empty ``cache``. Tested up to ``TESTED_BELOW``.
2. ``disable_adapter()`` on a prompt-learning classifier raises UnboundLocalError: PEFT swaps
   ``prepare_inputs_for_generation``, which classifiers lack. Here only the forward is swapped.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import types

from packaging.version import Version
from torch import nn

from adaptkit import targets, versions
from adaptkit.errors import IncompatibleVersionError

TESTED_BELOW = "5.40"  # transformers removes the past_key_values alias there: untested, refused


def refuse_untested_transformers() -> None:
    version = versions.installed("transformers")
    if version is not None and Version(version) >= Version(TESTED_BELOW):
        raise IncompatibleVersionError("transformers", version, f"prefix tuning is tested below {TESTED_BELOW}",
                                       f"pip install 'transformers<{TESTED_BELOW}', or use 'lora' (adaptkit/compat.py)")


def takes_prefix(module: nn.Module) -> bool:
    """Whether the forward takes the cache PEFT's prefix goes into, under either name."""
    return not {"past_key_values", "cache"}.isdisjoint(inspect.signature(module.forward).parameters)


class _Bridged:
    """The module's forward, taking past_key_values into cache. An object holding the module rather than a bound
    method: a pickled bound method comes back as getattr(module, "forward"), the class's unbridged one."""

    def __init__(self, module: nn.Module):
        self.module, self.inner = module, module.__dict__.get("forward")  # inner: accelerate's hook, if any
        params = list(inspect.signature(module.forward).parameters.values())
        at = len(params) - (bool(params) and params[-1].kind is inspect.Parameter.VAR_KEYWORD)
        extra = inspect.Parameter("past_key_values", inspect.Parameter.KEYWORD_ONLY, default=None)
        self.__signature__ = inspect.Signature([*params[:at], extra, *params[at:]])  # what PEFT reads

    def __call__(self, *args, past_key_values=None, **kwargs):
        cache = kwargs.get("cache")
        # an empty cache is generate()'s fresh one at the first step: the prefix belongs there. A filled one
        # already holds the prefix (PEFT injects a new one at every step, as it finds no past_key_values)
        if past_key_values is not None and (cache is None or not cache.get_seq_length()):
            kwargs["cache"] = past_key_values
        return (self.inner or functools.partial(type(self.module).forward, self.module))(*args, **kwargs)


def bridge(model: nn.Module) -> nn.Module:
    """Apply both workarounds to a PeftModel that adaptkit made or loaded (any other model: unchanged)."""
    from peft import PeftModel, PeftType
    if not isinstance(model, PeftModel):
        return model
    configs = list(model.peft_config.values())
    base = model.get_base_model()
    if any(c.peft_type == PeftType.PREFIX_TUNING for c in configs):
        refuse_untested_transformers()
        for module in (base, targets.base_module(base)):
            params = inspect.signature(module.forward).parameters if module is not None else {}
            if "cache" in params and "past_key_values" not in params:  # not bridged yet, and renamed
                module.forward = _Bridged(module)
    if any(c.is_prompt_learning for c in configs) and not hasattr(base, "prepare_inputs_for_generation"):
        model.disable_adapter = types.MethodType(_disable_prompt, model)
    return model


@contextlib.contextmanager
def _disable_prompt(self):  # PEFT's own prompt-learning branch, without the generation half classifiers lack
    was, old = self._adapters_disabled, self.forward
    self.forward, self._adapters_disabled = self.base_model.forward, True
    try:
        yield
    finally:
        self.forward, self._adapters_disabled = old, was
