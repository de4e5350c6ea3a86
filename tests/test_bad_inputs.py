"""Inputs the core calls cannot use: sequences longer than the model's positions (virtual tokens of prefix
and prompt tuning included) in ``check``; token ids, labels and lengths out of range in ``sanity_check``;
models that need remote code in ``load_model``. Each is a typed error with the fix, never an
IndexError from inside an embedding, and nothing is run."""

from __future__ import annotations

import json
import re

import pytest
import torch
from conftest import tiny_inputs, tiny_model

import adaptkit
from adaptkit import errors, lengths
from adaptkit.sanity import sanity_check


# ---- positions ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family,task,limit", [("bert", "seq_cls", 64), ("roberta", "seq_cls", 64),
                                               ("distilbert", "seq_cls", 64), ("gpt2", "causal_lm", 64),
                                               ("llama", "causal_lm", None), ("t5", "seq2seq", None)])
def test_max_positions_is_where_the_forward_pass_breaks(family, task, limit):
    model = tiny_model(family, task)
    assert lengths.max_positions(model) == limit
    if limit is None:
        return
    model.eval()
    with torch.no_grad():
        model(input_ids=torch.full((1, limit), 5))
        with pytest.raises((RuntimeError, IndexError)):  # what users got before the check
            model(input_ids=torch.full((1, limit + 1), 5))


@pytest.mark.parametrize("strategy,options,length,match", [
    ("lora", {}, 65, r"max_length=65: 65 tokens do not fit BertForSequenceClassification's 64 positions. "
                     r"Fix: use max_length <= 64"),
    ("prefix", {}, 64, r"max_length=64: 64 \+ 20 virtual tokens of the prefix/prompt = 84 tokens do not fit .*64 "
                       r"positions. Fix: use max_length <= 44"),
    ("prompt_tuning", {"num_virtual_tokens": 10}, 60, r"60 \+ 10 virtual tokens .* Fix: use max_length <= 54, or "
                                                      r"fewer virtual tokens \(num_virtual_tokens <= 4\)"),
])
def test_check_refuses_a_sequence_length_beyond_the_positions(strategy, options, length, match):
    report = adaptkit.check(tiny_model("bert"), strategy, options=options, max_length=length, raise_on_error=False)
    assert len(report.problems) == 1 and isinstance(report.problems[0], errors.ConfigError)
    assert re.search(match, str(report.problems[0])), str(report.problems[0])
    assert "OK: no problems found" not in str(report)


def test_check_passes_what_fits_and_says_what_prefix_leaves():
    assert adaptkit.check(tiny_model("bert"), "prefix", max_length=44, raise_on_error=False).ok
    report = adaptkit.check(tiny_model("bert"), "prefix", raise_on_error=False)
    assert report.ok and any("sequences must be <= 44 tokens (the model has 64)" in n for n in report.notes)
    too_many = adaptkit.check(tiny_model("bert"), "prefix", options={"num_virtual_tokens": 64}, raise_on_error=False)
    assert len(too_many.problems) == 1
    assert "num_virtual_tokens=64: leaves no room for text in BertForSequenceClassification's 64 positions" in str(too_many)


@pytest.mark.parametrize("strategy,options", [("prefix", {"num_virtual_tokens": 64}),
                                              ("prompt_tuning", {"num_virtual_tokens": 500, "task_type": "SEQ_CLS"})])
def test_adapt_refuses_virtual_tokens_that_fill_the_positions(strategy, options):
    # adapted, such a model failed at its first forward with "The expanded size of the tensor (4) must match ... (0)"
    with pytest.raises(errors.ConfigError, match=r"num_virtual_tokens=\d+: leaves no room for text in "
                                                 r"BertForSequenceClassification's 64 positions. Fix: use "
                                                 r"num_virtual_tokens < 64"):
        adaptkit.adapt(tiny_model("bert"), strategy, **options)


def test_the_cli_takes_max_length(tmp_path, capsys):
    from adaptkit.cli import main
    tiny_model("bert").config.save_pretrained(tmp_path / "m")
    assert main(["check", str(tmp_path / "m"), "--strategy", "prefix", "--max-length", "64"]) == 1
    assert "= 84 tokens do not fit" in capsys.readouterr().out


# ---- sanity_check's batch -----------------------------------------------------------------------------------
def _batch(**change):
    batch = {**tiny_inputs("bert"), "labels": torch.tensor([0, 1])}
    return {**batch, **change}


@pytest.mark.parametrize("change,match", [
    ({"labels": torch.tensor([0, 2])}, r"batch\['labels'\]=2: is outside the 2 classes 0..1. Fix: map labels to 0..K-1"),
    ({"labels": torch.tensor([-1, 0])}, r"batch\['labels'\]=-1: is outside the 2 classes 0..1"),
    ({"input_ids": torch.tensor([[5, 99, 7], [5, 6, 7]]), "attention_mask": torch.ones(2, 3, dtype=torch.long)},
     r"batch\['input_ids'\]=99: is outside the model's vocabulary 0..98. Fix: tokenize with the model's own"),
    ({"input_ids": torch.tensor([[-3, 6, 7], [5, 6, 7]]), "attention_mask": torch.ones(2, 3, dtype=torch.long)},
     r"batch\['input_ids'\]=-3: is outside the model's vocabulary"),
    ({"input_ids": torch.full((2, 65), 5), "attention_mask": torch.ones(2, 65, dtype=torch.long)},
     r"batch\['input_ids'\] length=65: 65 tokens do not fit .*64 positions"),
])
def test_sanity_check_refuses_inputs_the_model_cannot_take(change, match):
    model = adaptkit.adapt(tiny_model("bert"), "lora")
    with pytest.raises(errors.ConfigError, match=match):
        sanity_check(model, _batch(**change))


def test_sanity_check_counts_prefix_tokens_and_accepts_ignored_labels():
    model = adaptkit.adapt(tiny_model("bert"), "prefix")
    with pytest.raises(errors.ConfigError, match=r"length=50: 50 \+ 20 virtual tokens"):
        sanity_check(model, _batch(input_ids=torch.full((2, 50), 5), attention_mask=torch.ones(2, 50, dtype=torch.long)))
    lm = adaptkit.adapt(tiny_model("gpt2", "causal_lm"), "lora")
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    with pytest.raises(errors.ConfigError, match=r"batch\['labels'\]=99: is outside the vocabulary 0..98"):
        sanity_check(lm, {"input_ids": ids, "labels": torch.tensor([[5, 6, 7, 99], [9, 10, 11, 12]])})
    sanity_check(lm, {"input_ids": ids, "labels": torch.tensor([[-100, 6, 7, 8], [9, 10, 11, -100]])})


# ---- remote code -----------------------------------------------------------------------------------------------
@pytest.fixture
def custom_code_model(tmp_path):
    """A model folder whose config names custom code that would leave a marker file if it ran."""
    folder = tmp_path / "evil"
    folder.mkdir()
    tiny_model("bert").config.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "configuration_evil.EvilConfig",
                          "AutoModelForSequenceClassification": "modeling_evil.EvilModel"}
    (folder / "config.json").write_text(json.dumps(config))
    marker = tmp_path / "EXECUTED"
    for name in ("configuration_evil.py", "modeling_evil.py"):
        (folder / name).write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    return folder, marker


def test_load_model_refuses_remote_code_before_transformers_can_ask(custom_code_model, monkeypatch):
    folder, marker = custom_code_model
    asked = []
    monkeypatch.setattr("builtins.input", lambda *a: asked.append(a) or "y")  # a user who would say yes
    with pytest.raises(errors.UnsupportedError, match=r"model=.*evil.: needs custom code from the model repository "
                                                      r"\(trust_remote_code\): config.json names custom code"
                                                      r".*Fix: adaptkit never runs remote code"):
        adaptkit.load_model(str(folder), "seq_cls")
    assert asked == [] and not marker.exists()


def test_load_model_refuses_trust_remote_code_true(custom_code_model):
    folder, marker = custom_code_model
    with pytest.raises(errors.UnsupportedError, match=r"trust_remote_code=True was passed.*review the code, load the "
                                                      r"model yourself"):
        adaptkit.load_model(str(folder), "seq_cls", trust_remote_code=True)
    assert not marker.exists()


def test_a_custom_tokenizer_is_refused_too(tmp_path):
    folder = tmp_path / "m"
    tiny_model("bert").config.save_pretrained(folder)
    (folder / "tokenizer_config.json").write_text(json.dumps({"auto_map": {"AutoTokenizer": ["tok_evil.T", None]}}))
    with pytest.raises(errors.UnsupportedError, match=r"tokenizer_config.json names custom code"):
        adaptkit.load_model(str(folder), "seq_cls")


@pytest.mark.parametrize("name", ["classify", "causal_lm"])
def test_the_recipes_refuse_remote_code_first(custom_code_model, tmp_path, monkeypatch, name):
    import importlib.util
    from pathlib import Path
    folder, marker = custom_code_model
    monkeypatch.setattr("builtins.input", lambda *a: "y")
    path = Path(__file__).resolve().parents[1] / "recipes" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"recipe_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    (tmp_path / "train.txt").write_text("a b\n")
    with pytest.raises(errors.UnsupportedError, match=r"needs custom code"):
        module.main(["--model", str(folder), "--data", str(tmp_path / "train.txt"), "--output-dir", str(tmp_path / "o")])
    assert not marker.exists() and not (tmp_path / "o").exists()


# ---- configs that check and estimate must refuse, fast and typed (issue 30 CLI; issue 29 item 13) ------------
def _config_folder(tmp_path, **fields):
    folder = tmp_path / "m"
    tiny_model("bert").config.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **fields}))
    return str(folder)


def _cli(capsys, *argv):
    from adaptkit.cli import main
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out + out.err


def test_a_size_written_as_text_is_a_typed_error_in_check_and_estimate(tmp_path, capsys):
    folder = _config_folder(tmp_path, hidden_size="32")  # was a raw TypeError (or transformers' own error)
    code, out = _cli(capsys, "check", folder, "--strategy", "lora")
    assert code == 1 and "[ConfigTypeError] config.hidden_size=" in out and "32 rather than \"32\"" in out
    with pytest.raises(errors.ConfigTypeError, match=r"config.hidden_size=.*Fix: write the type named"):
        adaptkit.estimate(folder, "lora")


def test_an_absurd_layer_count_is_refused_at_once(tmp_path, capsys):
    import time
    folder = _config_folder(tmp_path, num_hidden_layers=10**7)  # check and estimate ran past 120 s
    start = time.monotonic()
    code, out = _cli(capsys, "check", folder, "--strategy", "lora")
    assert code == 1 and "config.num_hidden_layers=10000000: is outside 0..512, beyond any real model" in out
    with pytest.raises(errors.ConfigError, match=r"num_hidden_layers=10000000: is outside 0..512.*Fix: check config"):
        adaptkit.estimate(folder, "lora")
    assert time.monotonic() - start < 10


def test_estimate_refuses_a_sequence_longer_than_the_positions(tmp_path, capsys):
    folder = _config_folder(tmp_path)  # 64 positions; 100,000 tokens printed 15 TB without a word
    code, out = _cli(capsys, "estimate", folder, "--strategies", "lora", "--seq-len", "100000")
    assert code == 2 and "seq_len=100000: 100000 tokens do not fit BertForSequenceClassification's 64 positions" in out
    rows = adaptkit.estimate(folder, ["lora", "prefix"], seq_len=60, batch_size=2).rows  # 60 + 20 virtual > 64
    assert rows[0].problem is None and "60 + 20 virtual tokens of the prefix/prompt = 80 tokens do not fit" in rows[1].problem


def test_check_refuses_remote_code_as_load_model_does(tmp_path):
    folder = _config_folder(tmp_path, auto_map={"AutoModelForSequenceClassification": "modeling_evil.EvilModel"})
    report = adaptkit.check(folder, "lora", raise_on_error=False)  # said OK, then load_model refused
    assert [type(p) for p in report.problems] == [errors.UnsupportedError]
    assert "needs custom code from the model repository (trust_remote_code): config.json names custom code" in str(report)


def test_a_bottleneck_wider_than_the_model_is_refused_by_check_and_adapt():
    from adaptkit import Bottleneck
    report = adaptkit.check(tiny_model("bert").config, Bottleneck(bottleneck_size=10**9), raise_on_error=False)
    message = r"Bottleneck.bottleneck_size=1000000000: is wider than the hidden size 32"
    assert re.search(message, str(report))  # check said OK, then adapt failed allocating 128 GB
    with pytest.raises(errors.ConfigError, match=message + r".*Fix: use a bottleneck_size <= 32"):
        adaptkit.adapt(tiny_model("bert"), Bottleneck(bottleneck_size=10**9))
