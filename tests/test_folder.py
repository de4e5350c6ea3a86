"""What a saved folder records and how the ecosystem reads it: label names, the base model (absolute path,
fingerprint), PEFT folders without task_type, from_pretrained on every strategy's folder, the model card."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from conftest import tiny_inputs, tiny_model

import adaptkit
from adaptkit import errors

STRATEGIES = ["lora", "prefix", "ia3", "bottleneck", "linear_probe", "full"]


def _perturbed(model):
    """Trained tensors moved away from their init, so a dropped or random piece changes the logits."""
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.1)
    return model.eval()


def _logits(model, inputs):
    with torch.no_grad():
        return model.eval()(**inputs).logits


@pytest.fixture
def base_dir(tmp_path):
    """A tiny classifier saved to disk with real label names, like a hub checkpoint."""
    model = tiny_model("bert")
    model.config.id2label, model.config.label2id = {0: "neg", 1: "pos"}, {"neg": 0, "pos": 1}
    model.save_pretrained(tmp_path / "base")
    return tmp_path / "base"


def _load_base(path, **kwargs):
    return transformers.AutoModelForSequenceClassification.from_pretrained(str(path), **kwargs)


# transformers' own refusals (adaptkit registers nothing in transformers: import adaptkit has no side effects)
REFUSALS = {"prefix": r"does not support prompt learning", "bottleneck": r"model type `adaptkit`",
            "linear_probe": r"model type `adaptkit`"}


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_from_pretrained_on_a_folder_loads_exactly_or_refuses(tmp_path, base_dir, strategy):
    model = _perturbed(adaptkit.adapt(_load_base(base_dir), strategy))
    inputs = tiny_inputs("bert")
    expected = _logits(model, inputs)
    for out in (tmp_path / "saved", tmp_path / "save_pretrained"):
        adaptkit.save(model, out) if out.name == "saved" else model.save_pretrained(out)
        assert torch.equal(_logits(adaptkit.load(out, _load_base(base_dir)), inputs), expected)
        if strategy in ("lora", "ia3", "full"):  # transformers' PEFT integration / a whole model
            assert torch.equal(_logits(_load_base(out), inputs), expected)
            continue
        config = out / "config.json"  # the sizes of a folder that is no whole model: null, never a message
        assert not config.exists() or {k: v for k, v in json.loads(config.read_text()).items()
                                       if isinstance(v, str)}.keys() <= {"model_type", "transformers_version"}
        with pytest.raises(ValueError, match=REFUSALS[strategy]):
            _load_base(out)
        if strategy != "prefix":  # a concrete class's strict config refuses: never a random model with a few tensors
            with pytest.raises(Exception, match=r"Field 'vocab_size' expected int, got NoneType"):
                transformers.BertForSequenceClassification.from_pretrained(str(out))


@pytest.mark.parametrize("strategy", ["bottleneck", "linear_probe"])
def test_a_concrete_class_refuses_a_folder_of_a_default_sized_base(tmp_path, strategy):
    # BERT-base's sizes are BertConfig's defaults: a folder read as a default BERT config would load the few saved
    # tensors into a randomly initialised BERT-base; with the folder's sizes null every class refuses it
    base = transformers.BertForSequenceClassification(transformers.BertConfig(num_labels=2))
    adaptkit.save(adaptkit.adapt(base, strategy), tmp_path / "out")
    with pytest.raises(Exception, match=r"Field 'vocab_size' expected int, got NoneType"):
        transformers.BertForSequenceClassification.from_pretrained(str(tmp_path / "out"))
    with pytest.raises(ValueError, match=r"model type `adaptkit`"):
        transformers.AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "out"))


def test_importing_adaptkit_registers_nothing_in_transformers():
    import subprocess
    import sys
    code = ("import json, transformers.models.auto.configuration_auto as ca, transformers.models.auto.modeling_auto as ma\n"
            "def seen():\n"
            "    return [sorted(ca.CONFIG_MAPPING.keys())] + [sorted(c.__name__ for c in getattr(ma, n).keys())\n"
            "            for n in sorted(dir(ma)) if n.startswith('MODEL_') and n.endswith('_MAPPING')]\n"
            "before = seen()\nimport adaptkit\nprint(json.dumps([before == seen(), 'adaptkit' in ca.CONFIG_MAPPING]))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[true, false]"


def test_label_names_round_trip_into_a_pipeline(tmp_path, base_dir):
    model = adaptkit.adapt(_load_base(base_dir), "lora")
    adaptkit.save(model, tmp_path / "a")
    fresh = _load_base(base_dir)
    fresh.config.id2label, fresh.config.label2id = {0: "LABEL_0", 1: "LABEL_1"}, {"LABEL_0": 0, "LABEL_1": 1}
    loaded = adaptkit.load(tmp_path / "a", fresh)
    assert loaded.config.id2label == {0: "neg", 1: "pos"} and loaded.config.label2id == {"neg": 0, "pos": 1}
    tokenizer = transformers.BertTokenizerFast(vocab_file=_vocab(tmp_path))
    for model in (loaded, adaptkit.merge(loaded)):
        classify = transformers.pipeline("text-classification", model=model, tokenizer=tokenizer)
        assert classify("a b c")[0]["label"] in {"neg", "pos"}


def test_label_names_through_pipeline_on_the_folder(tmp_path, base_dir):
    # transformers' own path: a full folder is a whole model with its config (the saved names); a LoRA folder loads
    # the base's config, which transformers' PEFT integration cannot change: the base's names (adaptkit.layout says so)
    tokenizer = transformers.BertTokenizerFast(vocab_file=_vocab(tmp_path))
    for strategy, want in (("full", {"negative", "positive"}), ("lora", {"neg", "pos"})):
        model = _load_base(base_dir)
        model.config.id2label, model.config.label2id = {0: "negative", 1: "positive"}, {"negative": 0, "positive": 1}
        adaptkit.adapt(model, strategy).save_pretrained(tmp_path / strategy)
        tokenizer.save_pretrained(tmp_path / strategy)
        classify = transformers.pipeline("text-classification", model=str(tmp_path / strategy), top_k=None)
        assert {r["label"] for r in classify(["a b c"])[0]} == want
        loaded = adaptkit.load(tmp_path / strategy, _load_base(base_dir))
        assert set(loaded.config.id2label.values()) == {"negative", "positive"}  # adaptkit.load restores them


def _vocab(tmp_path):
    path = tmp_path / "vocab.txt"
    path.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "b", "c"]
                              + [f"w{i}" for i in range(91)]) + "\n")
    return str(path)


def test_a_peft_folder_without_task_type_gets_its_head_or_is_refused(tmp_path):
    from peft import LoraConfig, get_peft_model
    inputs = tiny_inputs("bert")
    # saved with the head (modules_to_save) but no task_type: the head is found in the tensors and loaded
    with_head = _perturbed(get_peft_model(tiny_model("bert"), LoraConfig(r=4, target_modules=["query"],
                                                                         modules_to_save=["classifier"])))
    with_head.save_pretrained(str(tmp_path / "head"))
    fresh = tiny_model("bert")
    torch.manual_seed(5)
    fresh.classifier.reset_parameters()  # a freshly initialised head, as from_pretrained(..., num_labels=2) gives
    loaded = adaptkit.load(tmp_path / "head", fresh)
    assert torch.equal(_logits(loaded, inputs), _logits(with_head, inputs))
    # no head saved: loading would leave a random classifier, so it is refused with the fix
    without = get_peft_model(tiny_model("bert"), LoraConfig(r=4, target_modules=["query"]))
    without.save_pretrained(str(tmp_path / "nohead"))
    with pytest.raises(errors.AdapterFormatError, match=r"task_type=None: the folder holds no trained \['classifier'\]"
                                                        r".*Fix: save it again with task_type set"):
        adaptkit.load(tmp_path / "nohead", tiny_model("bert"))


def test_the_base_is_recorded_absolute_and_checked(tmp_path, base_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = adaptkit.adapt(_load_base("base"), "lora")  # a relative path, as users type it
    adaptkit.save(model, tmp_path / "a")
    saved = json.loads((tmp_path / "a" / "adaptkit_config.json").read_text())
    assert saved["base_model"] == str(base_dir.resolve())
    assert saved["base"]["config"] == {"model_type": "bert", "hidden_size": 32, "vocab_size": 99,
                                       "num_hidden_layers": 2}
    peft = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert peft["base_model_name_or_path"] == str(base_dir.resolve())
    monkeypatch.chdir(base_dir.parent.parent)  # from_pretrained elsewhere still finds the base
    assert isinstance(_load_base(tmp_path / "a"), transformers.BertForSequenceClassification)
    other = transformers.BertForSequenceClassification(transformers.BertConfig(
        vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64))
    with pytest.raises(errors.BaseMismatchError, match=r"BertForSequenceClassification.*is not the base this adapter "
                                                       r"was trained on.*vocab_size 120 != saved 99"):
        adaptkit.load(tmp_path / "a", other)
    gpt2 = tiny_model("gpt2")
    with pytest.raises(errors.BaseMismatchError, match=r"model_type 'gpt2' != saved 'bert'"):
        adaptkit.load(tmp_path / "a", gpt2)


@pytest.mark.parametrize("strategy", ["lora", "bottleneck", "full"])
def test_the_model_card_is_a_filled_hf_card(tmp_path, strategy):
    from huggingface_hub import ModelCard
    model = tiny_model("bert")
    model.config.name_or_path = "org/tiny-bert"  # as if loaded from the hub
    adaptkit.save(adaptkit.adapt(model, strategy), tmp_path / "a")
    text = (tmp_path / "a" / "README.md").read_text()
    card = ModelCard.load(tmp_path / "a" / "README.md")
    assert card.data.base_model == "org/tiny-bert"
    assert card.data.library_name == {"lora": "peft", "bottleneck": "adaptkit", "full": "transformers"}[strategy]
    assert "adaptkit" in card.data.tags and strategy in card.data.tags
    ours = text.split("\n## adaptkit\n")[1]  # adaptkit's section; a PEFT card above it stays as PEFT wrote it
    assert "More Information Needed" not in ours and "adaptkit.load(" in ours and "Trainable parameters: " in ours
    if strategy == "lora":
        assert "## Model Details" in text.split("\n## adaptkit\n")[0]  # PEFT's own template
    adaptkit.card.write_training(tmp_path / "a", data="sst2 (6,920 sentences)", metrics={"accuracy": 0.8512})
    adaptkit.card.write_training(tmp_path / "a", data="sst2", metrics={"accuracy": 0.9})  # replaces, not appends
    text = (tmp_path / "a" / "README.md").read_text()
    assert text.count("## Training data and results") == 1 and "| accuracy | 0.9000 |" in text
    assert not (tmp_path / "a" / ".README.md.tmp").exists()


def test_save_pretrained_stays_adaptkits_on_a_copy_and_after_pickling(tmp_path):
    import copy
    import io
    model = adaptkit.adapt(tiny_model("bert"), "bottleneck")
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    inputs = tiny_inputs("bert")
    for i, other in enumerate((copy.deepcopy(model), torch.load(buffer, weights_only=False))):
        _perturbed(other)  # the copy's own tensors differ from the original's
        other.save_pretrained(tmp_path / str(i))
        assert (tmp_path / str(i) / "adaptkit_config.json").is_file()
        assert torch.equal(_logits(adaptkit.load(tmp_path / str(i), tiny_model("bert")), inputs),
                           _logits(other, inputs))
