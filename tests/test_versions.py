"""Versions: the lock, pyproject's ranges and the README agree; a version break is named as one."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from conftest import tiny_model
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

import adaptkit
from adaptkit import compat, errors, versions

ROOT = Path(__file__).resolve().parents[1]


def _lock() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9_.\-]+)==([^\s;]+)", line)
        if match:
            pins[match.group(1).lower().replace("_", "-")] = match.group(2)
    return pins


def _requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        reqs += extra
    # "adaptkit[recipes]" inside the dev extra names adaptkit's own extra, installed from the tree, not the lock
    return [r for r in map(Requirement, reqs) if r.name != "adaptkit"]


def test_the_lock_pins_every_requirement_inside_pyprojects_ranges():
    lock = _lock()
    assert len(lock) > 50, "the lock must hold transitive packages too"
    for req in _requirements():
        name = req.name.lower().replace("_", "-")
        assert name in lock, f"{name} is a requirement but not in requirements.lock: run make lock"
        version = Version(lock[name])
        assert req.specifier.contains(Version(version.base_version), prereleases=True), \
            f"requirements.lock has {name}=={version}, outside pyproject's {req}"


def test_the_lock_holds_the_tested_versions_and_the_pinned_torch():
    lock = _lock()
    for name, version in versions.TESTED.items():
        assert lock[name].split("+")[0] == version, f"versions.TESTED[{name!r}] != requirements.lock"
    (pin,) = [Requirement(line) for line in (ROOT / "requirements" / "torch-cpu.txt").read_text().splitlines()
              if line.strip() and not line.startswith("#")]
    assert pin.specifier.contains(lock["torch"]), "requirements.lock's torch is not requirements/torch-cpu.txt's"


def _readme_table() -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Tested versions"):]
    return section[: section.index("\n## ", 3)]


def test_the_readme_lists_the_tested_versions_and_pyprojects_ranges():
    ranges = {r.name: r.specifier for r in _requirements()}
    for name, version in versions.TESTED.items():
        row = re.search(rf"^\|\s*{re.escape(name)}\s*\|\s*{re.escape(version)}\s*\|\s*([^|]*?)\s*\|", _readme_table(), re.M)
        assert row, f"README's tested-versions table lacks {name} {version}"
        assert SpecifierSet(row.group(1).removesuffix("(extra)").strip()) == ranges[name], (name, row.group(1))


def test_pyproject_admits_every_transformers_the_prefix_bridge_is_tested_on():
    (req,) = [r for r in _requirements() if r.name == "transformers"]
    for version in ("5.23.0", "5.24.0", versions.TESTED["transformers"]):  # the oldest tested, the rename, the lock
        assert req.specifier.contains(version), (version, str(req.specifier))
    # the upper bound is where the prefix bridge stops being tested (the past_key_values alias goes)
    assert not req.specifier.contains(compat.TESTED_BELOW + ".0")


def test_prefix_on_an_architecture_without_the_argument_still_blames_the_architecture():
    with pytest.raises(errors.UnsupportedError) as info:
        adaptkit.adapt(tiny_model("distilbert"), "prefix")
    assert not isinstance(info.value, errors.IncompatibleVersionError)
    assert "past_key_values" in str(info.value)


def test_env_prints_every_library_against_the_tested_set(monkeypatch):
    out = subprocess.run([sys.executable, "-m", "adaptkit.cli", "env"], capture_output=True, text=True, check=True)
    for name in ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "datasets"):
        # "tested" under the lock; the canary's newer versions read "untested" or "OUTSIDE ..." instead
        assert re.search(rf"- {name}\s+{re.escape(versions.installed(name))}\s+{re.escape(versions.status(name))}",
                         out.stdout), out.stdout
    assert "Device: cpu" in out.stdout and "Python: " in out.stdout

    monkeypatch.setattr(versions, "installed", lambda name: "5.40.0" if name == "transformers"
                        else versions.TESTED.get(name, "0.1.0"))
    text = versions.report()
    assert re.search(r"- transformers\s+5\.40\.0\s+OUTSIDE adaptkit's range <5\.40,>=5\.23", text), text
    assert "Not the tested set: transformers" in text
