"""The public calls as users hit them: names and configs, targets, PEFT interop, save/load/merge, named adapters."""

from __future__ import annotations

import csv
import os

import pytest
import torch
from conftest import tiny_inputs, tiny_labels, tiny_model

import adaptkit
from adaptkit import errors


def _logits(model, inputs):
    model.eval()
    with torch.no_grad():
        return model(**inputs).logits


def _train_steps(model, family="bert", task="seq_cls", steps=3, lr=1e-2):
    inputs = tiny_inputs(family, task)
    labels = tiny_labels(family, task, inputs)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(steps):
        model(**inputs, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model


# ---- choosing a strategy ------------------------------------------------------------------------------
def test_name_object_dict_and_peft_config_all_work():
    from peft import LoraConfig
    by_name = adaptkit.adapt(tiny_model("bert"), "lora", r=4)
    by_object = adaptkit.adapt(tiny_model("bert"), adaptkit.LoRA(r=4))
    by_dict = adaptkit.adapt(tiny_model("bert"), {"strategy": "lora", "r": 4})
    assert adaptkit.strategy_of(by_name) == adaptkit.strategy_of(by_object) == adaptkit.strategy_of(by_dict)
    dora = adaptkit.adapt(tiny_model("bert"), LoraConfig(r=4, target_modules=["query", "value"], use_dora=True))
    assert adaptkit.strategy_of(dora).method == "lora"
    assert any("lora_magnitude_vector" in n for n, _ in dora.named_parameters())
    # the classifier still trains and is saved: adaptkit fills modules_to_save when the user did not
    assert any("classifier" in n and p.requires_grad for n, p in dora.named_parameters())


def test_unknown_strategy_name_suggests_the_closest():
    with pytest.raises(errors.UnknownStrategyError, match=r"strategy='lroa'.*did you mean 'lora'"):
        adaptkit.adapt(tiny_model("bert"), "lroa")
    assert issubclass(errors.UnknownStrategyError, ValueError)


def test_unknown_option_is_refused_with_a_suggestion():
    with pytest.raises(errors.UnknownOptionError, match=r"'rank' -> did you mean 'r'"):
        adaptkit.adapt(tiny_model("bert"), "lora", rank=8)


def test_bad_option_values_name_field_value_and_fix():
    with pytest.raises(errors.ConfigError, match=r"LoRA.r=0: must be positive. Fix: use r=8"):
        adaptkit.LoRA(r=0)
    with pytest.raises(errors.ConfigTypeError, match=r"LoRA.targets=3.*expected"):
        adaptkit.LoRA(targets=3)
    with pytest.raises(errors.ConfigError, match=r"Prefix.num_virtual_tokens=0"):
        adaptkit.Prefix(num_virtual_tokens=0)
    with pytest.raises(errors.UnknownStrategyError, match=r"PeftMethod.method='ia4'.*did you mean 'ia3'"):
        adaptkit.PeftMethod(method="ia4")


def test_not_a_model_is_a_type_error():
    with pytest.raises(errors.ConfigTypeError, match=r"model='str': is not a torch model"):
        adaptkit.adapt("bert-base-uncased", "lora")


# ---- targets --------------------------------------------------------------------------------------------
def test_default_lora_targets_every_backbone_linear_but_not_the_head():
    model = adaptkit.adapt(tiny_model("roberta"), "lora")
    lora_layers = {n.rsplit(".lora_A", 1)[0] for n, _ in model.named_parameters() if ".lora_A." in n}
    assert any(n.endswith("attention.self.query") for n in lora_layers)
    assert any(n.endswith("intermediate.dense") for n in lora_layers)
    assert not any(".classifier." in n for n in lora_layers)  # RoBERTa's head also has a "dense"


def test_lora_on_named_targets_and_a_typo_gets_did_you_mean():
    model = adaptkit.adapt(tiny_model("bert"), "lora", targets=["query", "value"])
    names = {n for n, _ in model.named_parameters() if "lora_A" in n}
    assert names and all(".query." in n or ".value." in n for n in names)
    with pytest.raises(errors.TargetNotFoundError, match=r"LoRA.targets='qeury'.*did you mean 'query'"):
        adaptkit.adapt(tiny_model("bert"), "lora", targets=["qeury"])


def test_lora_trains_the_pooler_a_fresh_head_reads_in_full_unless_told_not_to():
    # BERT's classifier reads the backbone's pooler; RoBERTa's head holds that layer itself
    model = adaptkit.adapt(tiny_model("bert"), "lora")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {n for n in trainable if ".pooler." in n} == {
        f"base_model.model.bert.pooler.modules_to_save.default.dense.{w}" for w in ("weight", "bias")}
    assert not any(".pooler." in n and ".lora_" in n for n, _ in model.named_parameters())  # no update on top
    before = model.bert.pooler.modules_to_save.default.dense.weight.detach().clone()
    _train_steps(model)
    assert not torch.equal(model.bert.pooler.modules_to_save.default.dense.weight, before)
    # train_pooler=False: the pooler stays frozen and gets a low-rank update like any backbone linear
    frozen = adaptkit.adapt(tiny_model("bert"), "lora", train_pooler=False)
    assert {n for n, p in frozen.named_parameters() if p.requires_grad and ".pooler." in n} == {
        f"base_model.model.bert.pooler.dense.lora_{ab}.default.weight" for ab in "AB"}
    assert "pooler" not in str(adaptkit.adapt(tiny_model("roberta"), "lora").peft_config["default"].modules_to_save)
    # heads given: exactly those train whole, whatever train_pooler says
    given = adaptkit.adapt(tiny_model("bert"), "lora", heads=["classifier"])
    assert not any(p.requires_grad and ".pooler." in n and "lora_" not in n for n, p in given.named_parameters())


def test_targets_found_on_an_architecture_nobody_listed():
    """A custom module tree, not in any PEFT table: LoRA, bottleneck and the probe still find their places."""
    from torch import nn

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.ModuleDict({"qkv": nn.Linear(16, 48), "proj": nn.Linear(16, 16)})
            self.mlp = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 16))

        def forward(self, x):
            q, k, v = self.attn["qkv"](x).chunk(3, -1)
            x = x + self.attn["proj"](torch.softmax(q @ k.transpose(1, 2) / 4, -1) @ v)
            return x + self.mlp(x)

    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([Block(), Block()])

    class Classifier(nn.Module):
        base_model_prefix = "encoder"

        def __init__(self):
            super().__init__()
            self.encoder = Encoder()
            self.head = nn.Linear(16, 3)
            self.config = type("C", (), {"hidden_size": 16})()

        def forward(self, x):
            for block in self.encoder.blocks:
                x = block(x)
            return self.head(x.mean(1))

    x = torch.randn(2, 5, 16)
    for strategy in ("lora", "linear_probe", "bottleneck"):
        torch.manual_seed(0)
        model = Classifier()
        reference = model(x)
        adapted = adaptkit.adapt(model, strategy, **({"reduction_factor": 4} if strategy == "bottleneck" else {}))
        trainable = {n for n, p in adapted.named_parameters() if p.requires_grad}
        assert any("head" in n for n in trainable), strategy
        torch.testing.assert_close(adapted(x), reference)


# ---- PEFT interop, save / load / merge -------------------------------------------------------------------
def test_lora_folder_loads_with_plain_peft(tmp_path):
    from peft import PeftModel
    model = _train_steps(adaptkit.adapt(tiny_model("bert"), "lora"))
    inputs = tiny_inputs("bert")
    expected = _logits(model, inputs)
    adaptkit.save(model, tmp_path / "a")
    assert {p.name for p in (tmp_path / "a").iterdir()} == {"adapter_config.json", "adapter_model.safetensors",
                                                           "adaptkit_config.json", "README.md"} - {"README.md"} \
        or (tmp_path / "a" / "adapter_model.safetensors").is_file()
    plain = PeftModel.from_pretrained(tiny_model("bert"), str(tmp_path / "a"))
    assert torch.equal(_logits(plain, inputs), expected)


def test_a_plain_peft_folder_loads_with_adaptkit(tmp_path):
    from peft import LoraConfig, get_peft_model
    peft_model = get_peft_model(tiny_model("bert"), LoraConfig(r=4, target_modules=["query"], task_type="SEQ_CLS"))
    peft_model = _train_steps(peft_model)
    inputs = tiny_inputs("bert")
    peft_model.save_pretrained(str(tmp_path / "p"))
    loaded = adaptkit.load(tmp_path / "p", tiny_model("bert"))
    assert adaptkit.strategy_of(loaded).method == "lora"
    assert torch.equal(_logits(loaded, inputs), _logits(peft_model, inputs))


def test_save_writes_only_trained_tensors_and_summary_predicts_the_size(tmp_path):
    model = adaptkit.adapt(tiny_model("bert"), "lora")
    summary = adaptkit.summary(model)
    adaptkit.save(model, tmp_path / "a")
    from safetensors import safe_open
    with safe_open(str(tmp_path / "a" / "adapter_model.safetensors"), "pt") as f:
        saved = sum(f.get_tensor(k).numel() for k in f.keys())
    assert saved == summary.trainable
    size = (tmp_path / "a" / "adapter_model.safetensors").stat().st_size
    assert summary.adapter_bytes <= size < summary.adapter_bytes + 20_000  # + the JSON header


def test_save_is_atomic_and_replaces_only_what_adaptkit_wrote(tmp_path):
    model = adaptkit.adapt(tiny_model("bert"), "bottleneck")
    adaptkit.save(model, tmp_path / "a")
    adaptkit.save(model, tmp_path / "a")  # replacing an adaptkit folder is fine
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]  # no temp or old folders left
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    adaptkit.save(model, tmp_path / "mine")  # a folder of the user's: the adapter joins their files
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "mine"]


def test_save_and_merge_need_an_adapted_model(tmp_path):
    with pytest.raises(errors.NotAdaptedError, match="adaptkit.adapt"):
        adaptkit.save(tiny_model("bert"), tmp_path / "x")
    with pytest.raises(errors.NotAdaptedError):
        adaptkit.merge(tiny_model("bert"))
    assert not (tmp_path / "x").exists()


def test_load_trainable_continues_training(tmp_path):
    for strategy in ("lora", "bottleneck"):
        adaptkit.save(adaptkit.adapt(tiny_model("bert"), strategy), tmp_path / strategy)
        frozen = adaptkit.load(tmp_path / strategy, tiny_model("bert"))
        assert not any(p.requires_grad for p in frozen.parameters())
        trainable = adaptkit.load(tmp_path / strategy, tiny_model("bert"), trainable=True)
        assert adaptkit.summary(trainable).trainable == adaptkit.summary(
            adaptkit.adapt(tiny_model("bert"), strategy)).trainable


def test_merged_lora_is_a_plain_model_within_1e5():
    model = _train_steps(adaptkit.adapt(tiny_model("llama", "causal_lm"), "lora"), "llama", "causal_lm")
    inputs = tiny_inputs("llama", "causal_lm")
    expected = _logits(model, inputs)
    merged = adaptkit.merge(model)
    assert type(merged).__name__ == "LlamaForCausalLM"
    assert not any("lora" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(_logits(merged, inputs), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("strategy", ["prefix", "bottleneck"])
def test_unmergeable_strategies_refuse(strategy):
    with pytest.raises(errors.NotMergeableError, match=rf"strategy='{strategy}'.*Fix:"):
        adaptkit.merge(adaptkit.adapt(tiny_model("bert"), strategy))


@pytest.mark.parametrize("strategy", ["lora", "prefix"])
def test_adapted_decoders_generate(strategy):
    model = adaptkit.adapt(tiny_model("gpt2", "causal_lm"), strategy)
    out = model.generate(input_ids=torch.tensor([[5, 6, 7]]), max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 7)


# ---- several named adapters on one base --------------------------------------------------------------------
def test_named_adapters_switch_with_their_own_heads(tmp_path):
    inputs = tiny_inputs("bert")
    model = _train_steps(adaptkit.adapt(tiny_model("bert"), "lora"), lr=5e-2)
    first = _logits(model, inputs)
    adaptkit.add_adapter(model, "task_b", "lora", r=4)
    model = _train_steps(model, lr=5e-2)
    second = _logits(model, inputs)
    assert not torch.allclose(first, second)
    adaptkit.set_adapter(model, "default")
    assert torch.equal(_logits(model, inputs), first)
    adaptkit.set_adapter(model, "task_b")
    assert torch.equal(_logits(model, inputs), second)
    with pytest.raises(errors.ConfigError, match=r"name='task_c': is not an adapter.*'default', 'task_b'"):
        adaptkit.set_adapter(model, "task_c")
    with pytest.raises(errors.ConfigError, match=r"name='task_b': is already an adapter"):
        adaptkit.add_adapter(model, "task_b", "lora")
    with pytest.raises(errors.UnsupportedError, match="named adapters need one PEFT method"):
        adaptkit.add_adapter(adaptkit.adapt(tiny_model("bert"), "bottleneck"), "b", "lora")


# ---- the real model, every strategy, end to end ------------------------------------------------------------
def _sst2_batch(data_dir, n=16):
    with open(data_dir / "sst2" / "train.tsv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[:n]
    return [r["sentence"] for r in rows], torch.tensor([int(r["label"]) for r in rows])


@pytest.mark.e2e
@pytest.mark.parametrize("strategy", ["lora", "bottleneck", "prefix", "linear_probe", "full", "ia3"])
def test_minilm_every_strategy_trains_and_roundtrips(strategy, minilm_path, data_dir, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    texts, labels = _sst2_batch(data_dir)
    batch = tokenizer(texts, padding=True, truncation=True, max_length=64, return_tensors="pt")

    def fresh():
        torch.manual_seed(0)
        return AutoModelForSequenceClassification.from_pretrained(minilm_path, num_labels=2)

    model = adaptkit.adapt(fresh(), strategy)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    loss = model(**batch, labels=labels).loss
    loss.backward()
    optimizer.step()
    expected = _logits(model, batch)
    adaptkit.save(model, tmp_path / strategy)
    reloaded = adaptkit.load(tmp_path / strategy, fresh())
    assert torch.equal(_logits(reloaded, batch), expected)
    size = sum(p.stat().st_size for p in (tmp_path / strategy).iterdir())
    if strategy != "full":
        assert size < 2_000_000, f"{strategy} adapter is {size} bytes; only trained tensors should be written"
    if os.environ.get("ADAPTKIT_PRINT_TABLE"):
        print(f"\n{strategy}: {adaptkit.summary(model)}; folder {size} bytes")


# ---- PEFT's option names ---------------------------------------------------------------------------------
def test_peft_option_names_are_aliases_with_the_same_errors():
    by_peft = adaptkit.adapt(tiny_model("bert"), "lora", r=4, target_modules=["query"], lora_alpha=32,
                             lora_dropout=0.1, modules_to_save=["classifier"], init_lora_weights=True)
    assert adaptkit.strategy_of(by_peft) == adaptkit.LoRA(r=4, targets=["query"], alpha=32, dropout=0.1,
                                                          heads=["classifier"])
    assert adaptkit.LoRA(lora_alpha=8).alpha == 8 and adaptkit.Prefix(prefix_projection=True).projection
    assert adaptkit.LinearProbe(modules_to_save=["classifier"]).heads == ["classifier"]
    assert adaptkit.LoRA.from_dict({"strategy": "lora", "target_modules": ["value"]}).targets == ["value"]
    with pytest.raises(errors.ConfigError, match=r"LoRA.targets=\['value'\]: given twice"):
        adaptkit.LoRA(targets=["query"], target_modules=["value"])
    # typed configs give from_dict's did-you-mean for unknown keywords, PEFT's names included
    with pytest.raises(errors.UnknownOptionError, match=r"'rank' -> did you mean 'r'\?"):
        adaptkit.LoRA(rank=8)
    with pytest.raises(errors.UnknownOptionError, match=r"'target_module' -> did you mean 'target_modules'\?"):
        adaptkit.LoRA(target_module=["query"])
    with pytest.raises(errors.UnknownOptionError, match=r"'num_virtual_token' -> did you mean 'num_virtual_tokens'"):
        adaptkit.Prefix(num_virtual_token=10)


def test_a_string_target_is_a_peft_regex_full_match():
    model = adaptkit.adapt(tiny_model("bert"), "lora", target_modules=r".*\.(query|value)")
    adapted = [n.split(".lora_A")[0].rsplit(".", 1)[1] for n, p in model.named_parameters() if "lora_A" in n]
    assert sorted(adapted) == ["query", "query", "value", "value"]
    with pytest.raises(errors.TargetNotFoundError, match=r"LoRA.targets='query': a string is a regex full-matched "
                                                         r"against whole module names.*\['query'\] matches 2 layers"):
        adaptkit.adapt(tiny_model("bert"), "lora", targets="query")
    with pytest.raises(errors.ConfigError, match=r"LoRA.targets='\(query': is not a regex"):
        adaptkit.LoRA(targets="(query")
