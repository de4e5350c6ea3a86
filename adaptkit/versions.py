"""Which library versions adaptkit was tested with, and how the installed ones compare. ``pip install adaptkit``
users get pyproject's ranges, not the lock: errors name the versions (``describe``) rather than blame the model."""

from __future__ import annotations

import platform
import sys
from importlib import metadata

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

# The lock's versions (`make lock`; the README's table: tests/test_versions.py keeps the three in agreement). The
# oldest set the suite also passed on is pyproject's lower bounds: torch 2.13, transformers 5.23, accelerate 1.15.
TESTED = {"torch": "2.15.0", "transformers": "5.25.0", "peft": "0.21.2", "accelerate": "1.16.0",
          "bitsandbytes": "0.50.2", "datasets": "5.2.0", "safetensors": "0.8.0"}


def installed(name: str) -> str | None:
    """The installed version of a distribution, without a local tag ('2.15.0+cpu' -> '2.15.0'); None if absent."""
    try:
        return metadata.version(name).split("+")[0]
    except metadata.PackageNotFoundError:
        return None


def status(name: str) -> str:
    """'tested', 'untested (tested: X)', "OUTSIDE adaptkit's range <spec>" (pyproject's) or 'not installed'."""
    version = installed(name)
    if version is None or TESTED.get(name) == version:
        return "not installed" if version is None else "tested"
    try:
        requires = [Requirement(text) for text in metadata.requires("adaptkit") or []]
        specs = [str(r.specifier) for r in requires if r.name.lower() == name]
    except metadata.PackageNotFoundError:
        specs = []
    if specs and specs[0] and version not in SpecifierSet(specs[0]):
        return f"OUTSIDE adaptkit's range {specs[0]}"
    return f"untested (tested: {TESTED.get(name, '-')})"


def untested() -> list[str]:
    """The libraries of TESTED that are installed at another version than the one tested."""
    return [name for name in TESTED if installed(name) not in (None, TESTED[name])]


def describe(*names: str) -> str:
    """'transformers 5.26.0 (tested: 5.25.0), peft 0.21.2 (tested)': for error messages."""
    return ", ".join(f"{n} {installed(n) or 'not installed'} ("
                     + ("tested" if installed(n) == TESTED.get(n) else f"tested: {TESTED.get(n)}") + ")" for n in names)


def report() -> str:
    """The text of ``adaptkit env``: paste it into a bug report."""
    rows = [("adaptkit", installed("adaptkit") or "not installed", "")]
    rows += [(name, installed(name) or "-", status(name)) for name in TESTED]
    width = max(len(r[0]) for r in rows)
    try:
        import torch  # only here: `adaptkit env` also runs where torch is broken
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        names = sorted({torch.cuda.get_device_name(i) for i in range(count)})
        mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
        device = (f"cuda x{count} ({', '.join(names)}), CUDA {torch.version.cuda}" if count else "mps" if mps
                  else f"cpu ({torch.get_num_threads()} threads)")
    except ImportError:
        device = "unknown (torch is not installed)"
    off = untested()
    return "\n".join(["adaptkit environment (paste this into a bug report)", "", f"- Python: {sys.version.split()[0]}",
                      f"- Platform: {platform.platform()}", f"- Device: {device}", "",
                      *[f"- {name.ljust(width)}  {version:<12} {note}".rstrip() for name, version, note in rows], "",
                      "All versions are the tested set." if not off else f"Not the tested set: {', '.join(off)}. To "
                      "reproduce the tested set: pip install -r requirements.lock, or the versions marked above."])
