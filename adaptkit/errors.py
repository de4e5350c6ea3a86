"""Every error adaptkit raises (the table: docs/errors.md). Each subclasses the builtin it refines, and its message
reads ``field=value: problem. Fix: fix``: ``ConfigError("LoRA.r", -1, "must be positive", "use r=8")``."""

from __future__ import annotations

from typing import Any, Iterable

_MISSING = object()


def _short(value: Any, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."

class AdaptkitError(Exception):
    """Base class. ``field``, ``value``, ``problem`` and ``fix`` are kept as attributes for programs and tests."""

    def __init__(self, field: str | None = None, value: Any = _MISSING, problem: str | None = None,
                 fix: str | None = None, *, message: str | None = None):
        self.field, self.problem, self.fix = field, problem, fix
        self.value = None if value is _MISSING else value
        if message is None:
            head = field or "input" if value is _MISSING else f"{field or 'input'}={_short(value)}"
            message = f"{head}: {problem or 'invalid'}" + (f". Fix: {fix}" if fix else "")
        super().__init__(message)

class ConfigError(AdaptkitError, ValueError):
    """A strategy option, a flag or a combination of them has a value that cannot work."""

class ConfigTypeError(AdaptkitError, TypeError):
    """An option has the wrong type (a string where a list of names was expected, ...)."""

class UnknownStrategyError(ConfigError):
    """A strategy name that is neither adaptkit's nor a PEFT method."""

class UnknownOptionError(ConfigError):
    """A key that the strategy config does not have (typos are refused, never ignored)."""

class TargetNotFoundError(ConfigError):
    """A target module name that matches nothing in the model."""

class AlreadyAdaptedError(ConfigError):
    """``adapt`` called on a model that already carries an adaptkit/PEFT strategy."""

class NotAdaptedError(ConfigError):
    """``save``/``merge`` called on a model that ``adapt`` never touched."""

class UnsupportedError(ConfigError):
    """A strategy × model family × quantization × launcher combination that cannot work."""

class NotMergeableError(UnsupportedError):
    """``merge`` on a strategy whose trained pieces cannot be folded into the base weights."""

class IncompatibleVersionError(UnsupportedError):
    """Works with the tested library versions, fails with the installed ones (the message names both)."""

class MissingDependencyError(AdaptkitError, ImportError):
    """An optional package (bitsandbytes, tensorboard, ...) is needed and not installed."""

class AdapterFormatError(AdaptkitError, ValueError):
    """A saved adapter folder that is missing files, has unknown keys or wrong shapes."""

class DataError(AdaptkitError, ValueError):
    """A data file that cannot be used as given (missing columns, bad labels, wrong encoding, ...)."""

class ProcessCountError(AdaptkitError, RuntimeError):
    """The run asked for N processes but is running as a different number."""

class SanityCheckError(AdaptkitError, RuntimeError):
    """A training sanity check failed (no gradients, non-finite loss, outputs changed at init, ...)."""

class NonFiniteError(AdaptkitError, FloatingPointError):
    """Training produced a NaN or infinite loss or weight; the run stops instead of saving it."""

class RunLockedError(AdaptkitError, RuntimeError):
    """Another run is writing to the same output folder."""

class CheckpointError(AdaptkitError, ValueError):
    """A checkpoint to resume from is incomplete, damaged, or was made on other data."""

class ConfigErrors(ConfigError):
    """Several problems found at once (``adaptkit.check`` reports all of them, not just the first)."""

    def __init__(self, errors: Iterable[AdaptkitError]):
        self.errors = list(errors)
        lines = [f"{len(self.errors)} problem(s):"] + [f"  - {e}" for e in self.errors]
        super().__init__(message="\n".join(lines))

class BaseMismatchError(AdapterFormatError):
    """An adapter loaded onto a base model other than the one it was trained on."""
