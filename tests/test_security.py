"""Weights only as safetensors, never pickle; remote code never switched on; nothing in a folder executes.

The source scan reads the AST of every Python file of the package, the recipes and the benchmarks, so a
comment or a docstring mentioning these calls does not count, and a real call cannot hide in a string.
"""

from __future__ import annotations

import ast
import json
import pickle
from pathlib import Path

import pytest
import torch
from conftest import tiny_inputs, tiny_model

import adaptkit
from adaptkit import errors
from adaptkit.check import check

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted(p for d in ("adaptkit", "recipes", "benchmarks") for p in (ROOT / d).rglob("*.py"))
PICKLE_MODULES = {"pickle", "cPickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}


def _calls(tree: ast.AST):
    return (n for n in ast.walk(tree) if isinstance(n, ast.Call))


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return node.id if isinstance(node, ast.Name) else "?"


def _is_true(node: ast.AST) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def _findings(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
            found += [f"imports {n}" for n in names if n and n.split(".")[0] in PICKLE_MODULES]
        if isinstance(node, ast.Dict):
            found += ["{'trust_remote_code': True}" for k, v in zip(node.keys, node.values)
                      if isinstance(k, ast.Constant) and k.value == "trust_remote_code" and _is_true(v)]
    for call in _calls(tree):
        name = _dotted(call.func)
        keywords = {k.arg: k.value for k in call.keywords}
        if name.endswith("torch.load") and not _is_true(keywords.get("weights_only", ast.Constant(None))):
            found.append(f"line {call.lineno}: torch.load without weights_only=True")
        if _is_true(keywords.get("trust_remote_code", ast.Constant(None))):
            found.append(f"line {call.lineno}: trust_remote_code=True")
        if _is_true(keywords.get("allow_pickle", ast.Constant(None))):
            found.append(f"line {call.lineno}: allow_pickle=True")
        if name in ("eval", "exec") or name.endswith(("pickle.load", "pickle.loads")):
            found.append(f"line {call.lineno}: {name}()")
        if keywords.get("safe_serialization") is not None and not _is_true(keywords["safe_serialization"]):
            found.append(f"line {call.lineno}: safe_serialization not True")
    return found


def test_the_scan_covers_the_package_recipes_and_benchmarks():
    assert len(SOURCES) >= 20
    assert {p.relative_to(ROOT).parts[0] for p in SOURCES} >= {"adaptkit", "recipes"}
    # the scanner itself finds what it looks for
    bad = ROOT / "tests" / "_scan_probe.py"
    try:
        bad.write_text("import pickle, torch\ntorch.load('x')\nf(trust_remote_code=True)\neval('1')\n")
        assert len(_findings(bad)) == 4
    finally:
        bad.unlink()


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_pickle_no_unsafe_torch_load_no_remote_code(path):
    assert _findings(path) == []


STRATEGIES = ["lora", "bottleneck", "prefix", "linear_probe", "full", "ia3"]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_saved_folders_hold_only_safetensors_and_json(tmp_path, strategy):
    adaptkit.save(adaptkit.adapt(tiny_model("bert"), strategy), tmp_path / "a")
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    # PEFT also writes its plain-text model card, README.md
    assert {Path(f).suffix for f in files if f != "README.md"} == {".safetensors", ".json"}, files


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_load_never_unpickles(tmp_path, monkeypatch, strategy):
    adaptkit.save(adaptkit.adapt(tiny_model("bert"), strategy), tmp_path / "a")

    def refuse(*args, **kwargs):
        raise AssertionError("unpickling during adaptkit.load")

    for module, name in ((torch, "load"), (pickle, "load"), (pickle, "loads"), (pickle, "Unpickler")):
        monkeypatch.setattr(module, name, refuse)
    model = adaptkit.load(tmp_path / "a", tiny_model("bert"))
    assert model(**tiny_inputs("bert")).logits.shape == (2, 2)


def test_a_folder_with_pickle_weights_is_refused(tmp_path):
    peft_model = adaptkit.adapt(tiny_model("bert"), "lora")
    with pytest.raises(errors.ConfigError, match="safe_serialization=False: adaptkit never pickles weights"):
        peft_model.save_pretrained(str(tmp_path / "a"), safe_serialization=False)
    # a folder plain PEFT wrote with pickles
    type(peft_model).save_pretrained(peft_model, str(tmp_path / "a"), safe_serialization=False)  # adapter_model.bin
    assert (tmp_path / "a" / "adapter_model.bin").is_file()
    with pytest.raises(errors.AdapterFormatError, match=r"has no adapter_model.safetensors.*pickle files "
                                                        r"\['adapter_model.bin'\] \(unpickling runs code\)"):
        adaptkit.load(tmp_path / "a", tiny_model("bert"))


def test_check_never_runs_remote_code(tmp_path):
    marker = tmp_path / "EXECUTED"
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text(json.dumps(
        {"model_type": "evil", "auto_map": {"AutoConfig": "configuration_evil.EvilConfig"}}))
    (tmp_path / "model" / "configuration_evil.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    with pytest.raises(errors.ConfigErrors) as info:
        check(tmp_path / "model", "lora")
    assert isinstance(info.value.errors[0], errors.UnsupportedError)
    assert "trust_remote_code" in str(info.value) and "never runs remote code" in str(info.value)
    assert not marker.exists()


# ---- hostile files and names: typed errors, nothing written outside the folder -----------------------------
def _folder(tmp_path, strategy="lora"):
    adaptkit.save(adaptkit.adapt(tiny_model("bert"), strategy), tmp_path / "a")
    return tmp_path / "a"


@pytest.mark.parametrize("content,match", [
    (b"\xff\xfe{not utf-8", r"adaptkit_config.json='UnicodeDecodeError': cannot be read"),
    (b"[" * 100_000, r"adaptkit_config.json='RecursionError': cannot be read"),
    (None, r"adaptkit_config.json:base=\[1\]: must be an object"),
    ("config", r"adaptkit_config.json:base=.*'config': \[1\].*: must be an object"),
])
def test_a_hostile_adaptkit_config_is_a_typed_error(tmp_path, content, match):
    folder = _folder(tmp_path)
    path = folder / "adaptkit_config.json"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        data = json.loads(path.read_text())
        data["base"] = [1] if content is None else {**data["base"], "config": [1]}
        path.write_text(json.dumps(data))
    with pytest.raises(errors.AdapterFormatError, match=match):
        adaptkit.load(folder, tiny_model("bert"))


@pytest.mark.parametrize("change,match", [
    (lambda d: d.update(target_modules={"a": [[[[]]]] * 2} | {"b": "[" * 50}), r"adapter_config.json='LORA': refused by PEFT"),
    (lambda d: d.update(layers_to_transform=[99]), r"saved tensors do not fit this base.*No modules were targeted"),
    (lambda d: d.update(modules_to_save=["bert"]), r"saved tensors do not fit this base.*No modules were targeted"),
    (lambda d: d.update(task_type="CAUSAL_LM"), r"adapter_config.json:task_type='CAUSAL_LM': does not match "
                                                r"BertForSequenceClassification \(SEQ_CLS\)"),
])
def test_a_hostile_adapter_config_is_a_typed_error(tmp_path, change, match):
    folder = _folder(tmp_path)
    data = json.loads((folder / "adapter_config.json").read_text())
    change(data)
    (folder / "adapter_config.json").write_text(json.dumps(data))
    with pytest.raises(errors.AdapterFormatError, match=match):
        adaptkit.load(folder, tiny_model("bert"))


def test_a_deeply_nested_adapter_config_is_a_typed_error(tmp_path):
    folder = _folder(tmp_path)
    (folder / "adaptkit_config.json").unlink()  # a plain PEFT folder
    (folder / "adapter_config.json").write_text("[" * 100_000)
    with pytest.raises(errors.AdapterFormatError, match=r"adapter_config.json='RecursionError': cannot be read"):
        adaptkit.load(folder, tiny_model("bert"))


@pytest.mark.parametrize("name", ["/abs/path", "a/b", "../evil", "", ".hidden", "a.b"])
def test_adapter_names_are_identifiers_not_paths(tmp_path, name):
    model = adaptkit.adapt(tiny_model("bert"), "lora")
    with pytest.raises(errors.ConfigError, match=r"name=.*: is not an adapter name .*Fix: use a name like 'sst2'"):
        adaptkit.add_adapter(model, name, "lora")
    with pytest.raises(errors.ConfigTypeError, match=r"name=3: expected a str, got int"):
        adaptkit.add_adapter(model, 3, "lora")
    assert sorted(model.peft_config) == ["default"]
