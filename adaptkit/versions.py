"""Which library versions adaptkit was tested with, and how the installed ones compare.

``TESTED`` is the set the suite passed with: the same versions as ``requirements.lock`` and the README's
"Tested versions" table (``tests/test_versions.py`` keeps the three in agreement). ``pip install adaptkit``
users get pyproject's ranges, not the lock, so when a strategy fails because of an installed version,
adaptkit's errors name the versions (``describe``) instead of blaming the architecture.
"""

from __future__ import annotations

import platform
import sys
from importlib import metadata

# The lock's versions of the libraries a bug report needs; updated with the lock (`make lock`). The oldest set the
# suite also passed on is pyproject's lower bounds: torch 2.13, transformers 5.23, accelerate 1.15.
TESTED = {"torch": "2.15.0", "transformers": "5.25.0", "peft": "0.21.2", "accelerate": "1.16.0",
          "bitsandbytes": "0.50.2", "datasets": "5.2.0", "safetensors": "0.8.0"}


def installed(name: str) -> str | None:
    """The installed version of a distribution, without a local tag ('2.15.0+cpu' -> '2.15.0'); None if absent."""
    try:
        return metadata.version(name).split("+")[0]
    except metadata.PackageNotFoundError:
        return None


def supported_range(name: str) -> str | None:
    """adaptkit's declared range for ``name`` (from its installed metadata, i.e. pyproject), or None."""
    from packaging.requirements import Requirement
    try:
        requires = metadata.requires("adaptkit") or []
    except metadata.PackageNotFoundError:
        return None
    for text in requires:
        req = Requirement(text)
        if req.name.lower() == name.lower():
            return str(req.specifier) or "any"
    return None


def status(name: str) -> str:
    """'tested', 'in range (untested)', 'OUTSIDE range <spec>' or 'not installed'."""
    from packaging.specifiers import SpecifierSet
    version = installed(name)
    if version is None:
        return "not installed"
    if TESTED.get(name) == version:
        return "tested"
    spec = supported_range(name)
    if spec and spec != "any" and version not in SpecifierSet(spec):
        return f"OUTSIDE adaptkit's range {spec}"
    return f"untested (tested: {TESTED.get(name, '-')})"


def untested() -> list[str]:
    """The libraries of TESTED that are installed at another version than the one tested."""
    return [name for name in TESTED if installed(name) not in (None, TESTED[name])]


def describe(*names: str) -> str:
    """'transformers 5.26.0 (tested: 5.25.0), peft 0.21.2 (tested)': for error messages."""
    parts = []
    for name in names:
        version, tested = installed(name), TESTED.get(name)
        note = "tested" if version == tested else f"tested: {tested}"
        parts.append(f"{name} {version or 'not installed'} ({note})")
    return ", ".join(parts)


def _device() -> str:
    import torch
    if torch.cuda.is_available():
        names = sorted({torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())})
        return f"cuda x{torch.cuda.device_count()} ({', '.join(names)}), CUDA {torch.version.cuda}"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return f"cpu ({torch.get_num_threads()} threads)"


def report() -> str:
    """The text of ``adaptkit env``: paste it into a bug report."""
    rows = [("adaptkit", installed("adaptkit") or "not installed", "")]
    rows += [(name, installed(name) or "-", status(name)) for name in TESTED]
    width = max(len(r[0]) for r in rows)
    lines = ["adaptkit environment (paste this into a bug report)", "",
             f"- Python: {sys.version.split()[0]}", f"- Platform: {platform.platform()}"]
    try:
        lines.append(f"- Device: {_device()}")
    except ImportError:
        lines.append("- Device: unknown (torch is not installed)")
    lines.append("")
    lines += [f"- {name.ljust(width)}  {version:<12} {note}".rstrip() for name, version, note in rows]
    off = untested()
    lines.append("")
    lines.append("All versions are the tested set." if not off else
                 f"Not the tested set: {', '.join(off)}. To reproduce the tested set: "
                 "pip install -r requirements.lock (from the repository), or the versions marked above.")
    return "\n".join(lines)
