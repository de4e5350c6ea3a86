"""adaptkit.load on a damaged folder or the wrong base model: a typed AdapterFormatError naming the file
and the fix, never a raw SafetensorError / JSONDecodeError / KeyError, and never a model that loads
with some saved tensors silently left out."""

from __future__ import annotations

import json
import struct

import pytest
import torch
import transformers
from conftest import tiny_model

import adaptkit
from adaptkit import errors

WEIGHTS = "adapter_model.safetensors"


def _saved(tmp_path, strategy="lora", model=None):
    folder = tmp_path / "adapter"
    adaptkit.save(adaptkit.adapt(model if model is not None else tiny_model("bert"), strategy), folder)
    return folder


def _edit_json(path, change):
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("strategy", ["lora", "bottleneck"])
@pytest.mark.parametrize("damage,detail", [
    (lambda b: b[: len(b) // 2], "incomplete metadata"),          # truncated copy
    (lambda b: b"", "header too small"),                           # zero bytes
    (lambda b: struct.pack("<Q", 2 ** 40) + b"{}", "header too large"),  # header length beyond the file
])
def test_corrupt_weights_name_the_file_and_the_fix(tmp_path, strategy, damage, detail):
    folder = _saved(tmp_path, strategy)
    weights = WEIGHTS if strategy == "lora" else "model.safetensors"  # native strategies' file
    (folder / weights).write_bytes(damage((folder / weights).read_bytes()))
    with pytest.raises(errors.AdapterFormatError, match=rf"{weights}=.*is not a readable safetensors file.*{detail}"
                                                        r".*Fix: restore the folder from a good copy"):
        adaptkit.load(folder, tiny_model("bert"))


@pytest.mark.parametrize("plain_peft", [False, True])
def test_an_adapter_config_that_is_not_json(tmp_path, plain_peft):
    folder = _saved(tmp_path)
    if plain_peft:
        (folder / "adaptkit_config.json").unlink()
    (folder / "adapter_config.json").write_text("{'peft_type': 'LORA'")
    with pytest.raises(errors.AdapterFormatError, match=r"adapter_config.json='JSONDecodeError': cannot be read"):
        adaptkit.load(folder, tiny_model("bert"))


def test_an_unknown_peft_type(tmp_path):
    folder = _saved(tmp_path)
    _edit_json(folder / "adapter_config.json", lambda d: d.update(peft_type="EVIL"))
    with pytest.raises(errors.AdapterFormatError, match=r"adapter_config.json:peft_type='EVIL': is not a PEFT method"
                                                        r".*Fix: name one of \[.*'LORA'"):
        adaptkit.load(folder, tiny_model("bert"))


def test_a_config_value_peft_refuses(tmp_path):
    folder = _saved(tmp_path)
    _edit_json(folder / "adapter_config.json", lambda d: d.update(r="eight", lora_alpha=None, no_such_field=1))
    with pytest.raises(errors.AdapterFormatError, match=r"adapter_config.json='LORA': refused by PEFT"):
        adaptkit.load(folder, tiny_model("bert"))


def test_target_modules_narrower_than_the_weights(tmp_path):
    folder = _saved(tmp_path)
    _edit_json(folder / "adapter_config.json", lambda d: d.update(target_modules=["query"]))
    with pytest.raises(errors.AdapterFormatError, match=rf"{WEIGHTS}=.*the weights do not match the model's adapter "
                                                        r"modules \(0 missing, \d+ unexpected\).*Fix: load onto"):
        adaptkit.load(folder, tiny_model("bert"))


def test_a_classifier_adapter_on_a_bare_backbone(tmp_path):
    folder = _saved(tmp_path)
    with pytest.raises(errors.AdapterFormatError, match=r"do not match the model's adapter modules \(\d+ missing, "
                                                        r"\d+ unexpected\)"):
        adaptkit.load(folder, tiny_model("bert", "base"))


def test_a_bert_adapter_on_roberta(tmp_path):
    folder = _saved(tmp_path)
    # the recorded base fingerprint catches it before any tensor is read
    with pytest.raises(errors.BaseMismatchError, match=r"='RobertaForSequenceClassification': is not the base this "
                                                       r"adapter was trained on, BertForSequenceClassification: "
                                                       r"model_type 'roberta' != saved 'bert'.*Fix: load the base"):
        adaptkit.load(folder, tiny_model("roberta"))


def _wider_bert():
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(transformers.BertConfig(
        vocab_size=99, max_position_embeddings=64, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64))


@pytest.mark.parametrize("strategy", ["lora", "bottleneck", "prefix", "linear_probe", "full"])
def test_another_hidden_size_gets_the_hidden_size_fix_not_num_labels(tmp_path, strategy):
    folder = _saved(tmp_path, strategy)
    with pytest.raises(errors.AdapterFormatError, match=r"classifier.weight=\(2, 32\).*another hidden size"
                                                        r"\. Fix: load it onto the base it was trained on") as caught:
        adaptkit.load(folder, _wider_bert())
    assert "num_labels" not in str(caught.value)


def test_another_num_labels_still_names_num_labels(tmp_path):
    folder = _saved(tmp_path, "bottleneck")
    with pytest.raises(errors.AdapterFormatError, match=r"has 2 outputs.*has 3.*Fix: load the base model with "
                                                        r"num_labels=2"):
        adaptkit.load(folder, tiny_model("bert", num_labels=3))


def test_a_prefix_on_a_gpt2_of_another_width_is_refused_at_load(tmp_path):
    def gpt2(width):
        torch.manual_seed(0)
        return transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=99, n_embd=width, n_layer=2, n_head=4,
                                                                    n_positions=64))
    folder = _saved(tmp_path, "prefix", gpt2(32))
    with pytest.raises(errors.AdapterFormatError, match=r"adapter_config.json:token_dim=32: this base has 64\. Fix: "
                                                        r"load it onto the base model it was trained on"):
        adaptkit.load(folder, gpt2(64))


def test_a_named_adapters_list_that_was_tampered_with(tmp_path):
    folder = _saved(tmp_path)
    _edit_json(folder / "adaptkit_config.json", lambda d: d.update(adapters={"names": ["default", "../x"],
                                                                               "active": "../x"}))
    with pytest.raises(errors.AdapterFormatError, match=r"adaptkit_config.json:adapters=.*must list names, 'default'"):
        adaptkit.load(folder, tiny_model("bert"))


def test_adapter_config_contradicting_adaptkit_config_is_refused(tmp_path):
    folder = _saved(tmp_path)
    _edit_json(folder / "adapter_config.json", lambda d: d.update(lora_alpha=64))  # adaptkit_config.json says 16
    with pytest.raises(errors.AdapterFormatError, match=r"adapter_config.json=\{'lora_alpha': 64\}: contradicts "
                                                        r"adaptkit_config.json \(lora_alpha=16\)"):
        adaptkit.load(folder, tiny_model("bert"))


@pytest.mark.parametrize("strategy", ["lora", "bottleneck"])
@pytest.mark.parametrize("bad,match", [(lambda t: t.to(torch.int64), r"torch.int64'?: is not floating point"),
                                       (lambda t: t.fill_(float("nan")), r"holds NaN or infinite values")])
def test_non_finite_or_non_float_tensors_are_refused_at_load(tmp_path, strategy, bad, match):
    from safetensors.torch import load_file, save_file
    folder = _saved(tmp_path, strategy)
    weights = folder / (WEIGHTS if strategy == "lora" else "model.safetensors")
    tensors = load_file(str(weights))
    first = sorted(tensors)[0]
    tensors[first] = bad(tensors[first].clone())
    save_file(tensors, str(weights), metadata={"format": "pt"})
    with pytest.raises(errors.AdapterFormatError, match=rf"safetensors:{first}=.*{match}.*Fix: restore the folder"):
        adaptkit.load(folder, tiny_model("bert"))


def test_a_base_built_from_a_config_loads_only_with_its_seed(tmp_path):
    from adaptkit.names import FROM_CONFIG_SEED

    config = tiny_model("bert").config

    def from_config(seed):
        transformers.set_seed(seed)
        model = transformers.BertForSequenceClassification(config)
        model.__dict__[FROM_CONFIG_SEED] = seed  # what a recipe records when it builds the base from a config
        return model

    model = adaptkit.adapt(from_config(42), "lora")
    adaptkit.save(model, tmp_path / "a")
    inputs = {"input_ids": torch.tensor([[5, 6, 7]])}
    with torch.no_grad():
        expected = model.eval()(**inputs).logits
        assert torch.equal(adaptkit.load(tmp_path / "a", from_config(42)).eval()(**inputs).logits, expected)
    with pytest.raises(errors.BaseMismatchError, match=r"its input embeddings hold other values.*Fix: build the base as "
                                                       r"it was: transformers.set_seed\(42\), then from_config"):
        adaptkit.load(tmp_path / "a", from_config(0))


def test_a_truncated_base_checkpoint_is_a_typed_error(tmp_path):
    tiny_model("bert").save_pretrained(tmp_path / "base")
    weights = tmp_path / "base" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(errors.ConfigError, match=r"model=.*base.*its weights are not a readable safetensors file "
                                                 r"\(truncated or corrupt\?\).*Fix: copy or download the checkpoint"):
        adaptkit.load_model(tmp_path / "base", task="seq_cls")
