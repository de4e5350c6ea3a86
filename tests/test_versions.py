"""Versions: the lock, pyproject's ranges and the README agree; a version break is named as one."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import transformers
from conftest import tiny_model
from packaging.requirements import Requirement
from packaging.version import Version

import adaptkit
from adaptkit import errors, versions
from adaptkit.check import check

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


def test_the_lock_holds_the_tested_versions_and_the_cpu_torch():
    lock = _lock()
    for name, version in versions.TESTED.items():
        assert lock[name].split("+")[0] == version, f"versions.TESTED[{name!r}] != requirements.lock"
    assert lock["torch"].endswith("+cpu") and not any(n.startswith("nvidia-") for n in lock)


def test_the_readme_lists_the_tested_versions():
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Tested versions"):]
    section = section[: section.index("\n## ", 3)]
    for name, version in versions.TESTED.items():
        assert re.search(rf"\|\s*{re.escape(name)}\s*\|\s*{re.escape(version)}\s*\|", section), \
            f"README's tested-versions table lacks {name} {version}"


def test_pyproject_excludes_the_known_transformers_break():
    (req,) = [r for r in _requirements() if r.name == "transformers"]
    assert not req.specifier.contains("5.24.0") and req.specifier.contains(versions.TESTED["transformers"])


def _cache_signature(monkeypatch):
    """What transformers 5.24 did: BertModel.forward takes `cache` where it took `past_key_values`."""
    original = transformers.BertModel.forward

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                inputs_embeds=None, cache=None, use_cache=None, **kwargs):
        return original(self, input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                        position_ids=position_ids, inputs_embeds=inputs_embeds, past_key_values=cache,
                        use_cache=use_cache, **kwargs)

    monkeypatch.setattr(transformers.BertModel, "forward", forward)
    monkeypatch.setattr(versions, "installed", lambda name: "5.24.0" if name == "transformers"
                        else versions.TESTED.get(name))


def test_prefix_under_the_renamed_signature_names_the_version_not_the_architecture(monkeypatch):
    _cache_signature(monkeypatch)
    with pytest.raises(errors.IncompatibleVersionError) as info:
        adaptkit.adapt(tiny_model("bert"), "prefix")
    message = str(info.value)
    assert "transformers 5.24.0 (tested: 5.23.0)" in message and "peft 0.21.2" in message
    assert "pip install 'transformers<5.24'" in message and "'lora'" in message
    assert "for this architecture" not in message
    assert isinstance(info.value, errors.UnsupportedError)  # callers catching the old error keep working


def test_check_reports_the_version_break_and_the_untested_versions(monkeypatch, tmp_path):
    _cache_signature(monkeypatch)
    config = transformers.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=64)
    config.save_pretrained(tmp_path)
    report = check(tmp_path, "prefix", num_labels=2, raise_on_error=False)
    assert [type(p) for p in report.problems] == [errors.IncompatibleVersionError]
    assert "transformers<5.24" in str(report)
    assert any("transformers 5.24.0 (tested: 5.23.0)" in note for note in report.notes)
    assert check(tmp_path, "lora", num_labels=2).ok  # other strategies are unaffected


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

    monkeypatch.setattr(versions, "installed", lambda name: "5.24.0" if name == "transformers"
                        else versions.TESTED.get(name, "0.1.0"))
    text = versions.report()
    assert re.search(r"- transformers\s+5\.24\.0\s+OUTSIDE adaptkit's range <5\.24,>=5\.23", text), text
    assert "Not the tested set: transformers" in text
