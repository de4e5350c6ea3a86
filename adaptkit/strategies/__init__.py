"""The strategy registry: every module in this folder that defines a ``@register``-ed config. Adding a strategy =
adding one file here; ``tests/test_registry.py`` checks that the registry equals the files."""

from __future__ import annotations

import difflib
import functools
import importlib
import pkgutil

from adaptkit.errors import UnknownStrategyError
from adaptkit.strategies.base import Strategy

REGISTRY: dict[str, type[Strategy]] = {}


def register(cls: type[Strategy]) -> type[Strategy]:
    if not cls.name:
        raise TypeError(f"{cls.__name__} must set the class variable `name` before @register")
    if REGISTRY.get(cls.name, cls) is not cls:
        raise ValueError(f"strategy {cls.name!r} registered twice: {REGISTRY[cls.name].__name__}, {cls.__name__}")
    REGISTRY[cls.name], init = cls, cls.__init__

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):  # PEFT's names and did-you-mean for typed configs too
        init(self, *args, **cls.resolve_options(kwargs))

    cls.__init__ = __init__
    return cls


def strategy_modules() -> list[str]:
    """Names of the strategy files on disk (``base`` holds what they share)."""
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name != "base")


for _module in strategy_modules():
    importlib.import_module(f"{__name__}.{_module}")


def get(name: str) -> type[Strategy]:
    if name in REGISTRY:
        return REGISTRY[name]
    close = difflib.get_close_matches(name, REGISTRY, n=1)
    raise UnknownStrategyError("strategy", name, "is not a strategy", (f"did you mean {close[0]!r}? " if close else "")
                               + f"choose one of {sorted(REGISTRY)} or a PEFT method (e.g. 'ia3')")
