"""The registry equals the strategy files on disk, and registration fails loudly."""

import dataclasses
import importlib

import pytest

import adaptkit
from adaptkit.strategies import REGISTRY, register, strategy_modules
from adaptkit.strategies.base import Strategy


def test_registry_equals_files_on_disk():
    files = strategy_modules()
    assert files, "no strategy files found"
    registered_modules = {cls.__module__.rsplit(".", 1)[-1] for cls in REGISTRY.values()}
    assert registered_modules == set(files)
    for name in files:  # each file registers what it defines (one strategy per file)
        module = importlib.import_module(f"adaptkit.strategies.{name}")
        defined = [obj for obj in vars(module).values()
                   if isinstance(obj, type) and issubclass(obj, Strategy) and obj.__module__ == module.__name__
                   and obj.name]
        assert defined and all(REGISTRY[obj.name] is obj for obj in defined)


def test_five_strategies_and_the_peft_pass_through_are_public():
    assert {"lora", "bottleneck", "prefix", "linear_probe", "full", "peft"} <= set(REGISTRY)
    for cls in (adaptkit.LoRA, adaptkit.Bottleneck, adaptkit.Prefix, adaptkit.LinearProbe, adaptkit.Full,
                adaptkit.PeftMethod):
        assert REGISTRY[cls.name] is cls


def test_registering_a_second_class_under_a_taken_name_fails():
    @dataclasses.dataclass
    class Impostor(Strategy):
        name = "lora"

    with pytest.raises(ValueError, match="registered twice"):
        register(Impostor)


def test_registering_without_a_name_fails():
    @dataclasses.dataclass
    class Nameless(Strategy):
        pass

    with pytest.raises(TypeError, match="must set the class variable `name`"):
        register(Nameless)
