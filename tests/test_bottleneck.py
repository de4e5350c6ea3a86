"""Bottleneck adapters: placement from structure, exact identity at init, what trains, save/load, errors."""

from __future__ import annotations

import copy
import types

import pytest
import torch
from torch import nn

from adaptkit import targets
from adaptkit.errors import (AlreadyAdaptedError, ConfigError, ConfigTypeError, NotMergeableError,
                             UnknownOptionError, UnsupportedError)
from adaptkit.strategies.base import Strategy
from adaptkit.strategies.bottleneck import Bottleneck, BottleneckAdapter, adapter_hosts
from conftest import FAMILY_TASKS, tiny_inputs, tiny_labels, tiny_model

VARIANTS = ["pfeiffer", "houlsby"]
CASES = [(fam, task, v) for fam, task in FAMILY_TASKS for v in VARIANTS]

# What the structural rule must find in block 0 of each family: (feed-forward down, attention outputs...)
EXPECTED_LEAVES = {
    "bert": ("output.dense", "attention.output.dense"),
    "roberta": ("output.dense", "attention.output.dense"),
    "distilbert": ("ffn.lin2", "attention.out_lin"),
    "gpt2": ("mlp.c_proj", "attn.c_proj"),
    "llama": ("mlp.down_proj", "self_attn.o_proj"),
    "t5": ("DenseReluDense.wo", "SelfAttention.o", "EncDecAttention.o"),
    "vit": ("mlp.fc2", "attention.o_proj"),
}


def _expected_count(family: str, variant: str) -> int:
    # the tiny models have 2 layers; T5 has 2 encoder + 2 decoder blocks and cross-attention in the decoder
    if family == "t5":
        return 4 if variant == "pfeiffer" else 2 * 2 + 2 * 3
    return 2 if variant == "pfeiffer" else 4


def _logits(model: nn.Module, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def _train_steps(model: nn.Module, family: str, task: str, steps: int = 2) -> None:
    # two steps: the up projection starts at zero, so the down projection only gets a gradient on step 2;
    # Adam, because that first gradient is tiny and SGD's change to `down` would round away in fp32
    inputs = tiny_inputs(family, task)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(steps):
        loss = model(**inputs, labels=tiny_labels(family, task, inputs)).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


def _adapter_param_names(model: nn.Module) -> set[str]:
    return {f"{m}.{p}" for m, mod in model.named_modules() if isinstance(mod, BottleneckAdapter)
            for p, _ in mod.named_parameters()}


# ---- placement and the contract at init ------------------------------------------------------
@pytest.mark.parametrize("family,task,variant", CASES)
def test_adapters_placed_from_structure(family, task, variant):
    model = tiny_model(family, task)
    hosts = adapter_hosts(model, variant)
    assert len(hosts) == _expected_count(family, variant)
    leaves = EXPECTED_LEAVES[family] if variant == "houlsby" else EXPECTED_LEAVES[family][:1]
    # the name inside a block: what follows the last numeric component ("...layer.0.attention.output.dense")
    inner = {".".join(parts[max(i for i, part in enumerate(parts) if part.isdigit()) + 1:])
             for parts in (h.split(".") for h in hosts)}
    assert inner == set(leaves)
    heads = targets.head_names(model)
    assert not any(h.split(".")[0] in heads for h in hosts)
    Bottleneck(variant=variant).apply(model)
    assert sum(isinstance(m, BottleneckAdapter) for m in model.modules()) == len(hosts)


@pytest.mark.parametrize("family,task,variant", CASES)
def test_identity_at_init_and_only_adapters_and_new_heads_train(family, task, variant):
    base, model = tiny_model(family, task), tiny_model(family, task)
    base_names = set(dict(base.named_parameters()))
    inputs = tiny_inputs(family, task)
    adapted = Bottleneck(variant=variant).apply(model)
    assert adapted is model
    assert torch.equal(_logits(adapted, inputs), _logits(base, inputs))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    heads = {f"{h}.{n}" for h in targets.new_head_names(model) for n, _ in getattr(model, h).named_parameters()}
    # the pooler a fresh head reads trains with it (BERT's; the other families' heads hold that layer themselves)
    pooler = targets.pooler_name(model) if heads else None
    heads |= {f"{pooler}.{n}" for n, _ in model.get_submodule(pooler).named_parameters()} if pooler else set()
    assert (pooler is not None) == (family == "bert" and task == "seq_cls")
    assert trainable == _adapter_param_names(model) | heads
    assert set(dict(model.named_parameters())) - trainable == base_names - heads  # base names unchanged, frozen
    if task in ("seq_cls", "image_cls"):
        assert heads, "a fresh classifier must train"


@pytest.mark.parametrize("family,task,variant", CASES)
def test_training_changes_exactly_the_trainable_tensors_and_round_trips(family, task, variant, tmp_path):
    # GELU, not the default ReLU: in a tiny model only a few tokens carry gradient (BERT's [CLS] in the last
    # layer) and a 2-unit ReLU bottleneck can be off on all of them, leaving `down` legitimately unchanged
    config = Bottleneck(variant=variant, activation="gelu")
    model = config.apply(tiny_model(family, task))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    base_logits = _logits(model, tiny_inputs(family, task))
    _train_steps(model, family, task)
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]) != p.requires_grad, name  # changed iff trainable
    inputs = tiny_inputs(family, task, seed=7)
    logits = _logits(model, inputs)
    assert not torch.equal(_logits(model, tiny_inputs(family, task)), base_logits)

    config.save(model, tmp_path)
    from safetensors.torch import load_file
    assert set(load_file(str(tmp_path / config.weights_name))) == {n for n, p in model.named_parameters() if p.requires_grad}
    fresh = tiny_model(family, task)  # same base weights; adapters are re-created by load, then filled
    loaded = config.load(tmp_path, fresh)
    assert loaded is fresh and torch.equal(_logits(loaded, inputs), logits)


# ---- behaviour around the model ----------------------------------------------------------------
def test_merge_is_refused():
    model = Bottleneck().apply(tiny_model("bert"))
    with pytest.raises(NotMergeableError, match=r"strategy='bottleneck'.*cannot be folded.*Fix: keep"):
        Bottleneck().merge(model)


def test_second_apply_is_refused():
    model = Bottleneck().apply(tiny_model("bert"))
    with pytest.raises(AlreadyAdaptedError, match=r"model='BertForSequenceClassification': already carries"):
        Bottleneck(variant="houlsby").apply(model)


def test_deepcopy_uses_its_own_adapters():
    model = Bottleneck().apply(tiny_model("bert"))
    twin = copy.deepcopy(model)
    inputs = tiny_inputs("bert")
    with torch.no_grad():
        for m in twin.modules():
            if isinstance(m, BottleneckAdapter):
                m.up.bias.fill_(1.0)
    assert torch.equal(_logits(model, inputs), _logits(tiny_model("bert"), inputs))
    assert not torch.equal(_logits(twin, inputs), _logits(model, inputs))


def test_sizes_and_activation():
    model = Bottleneck(bottleneck_size=5, activation="gelu").apply(tiny_model("bert"))
    adapter = model.bert.encoder.layer[0].output.dense.bottleneck_adapter
    assert adapter.down.out_features == 5 and type(adapter.act).__name__ == "GELUActivation"
    adapter = Bottleneck(reduction_factor=4).apply(tiny_model("bert")).bert.encoder.layer[1].output.dense
    assert adapter.bottleneck_adapter.down.out_features == 32 // 4


# ---- options and errors -----------------------------------------------------------------------
@pytest.mark.parametrize("options,error,match", [
    ({"reduction_factor": 0}, ConfigError, r"Bottleneck.reduction_factor=0: must be a positive.*Fix: use"),
    ({"bottleneck_size": -3}, ConfigError, r"Bottleneck.bottleneck_size=-3: must be a positive.*Fix: use"),
    ({"activation": "relux"}, ConfigError, r"activation='relux': is unknown.*choose one of .*'relu'"),
    ({"variant": "adapterhub"}, ConfigError, r"Bottleneck.variant='adapterhub': must be one of 'pfeiffer', 'houlsby'"),
    ({"reduction_factor": "16"}, ConfigTypeError, r"Bottleneck.reduction_factor='16': expected int"),
    ({"bottleneck_size": 8.0}, ConfigTypeError, r"Bottleneck.bottleneck_size=8.0: expected"),
])
def test_bad_options_are_refused(options, error, match):
    with pytest.raises(error, match=match):
        Bottleneck(**options)


def test_unknown_option_suggests_the_right_one():
    with pytest.raises(UnknownOptionError, match=r"'reduction' -> did you mean 'reduction_factor'"):
        Bottleneck.from_dict({"strategy": "bottleneck", "reduction": 8})
    config = Bottleneck(variant="houlsby", bottleneck_size=12)
    assert Bottleneck.from_dict(config.to_dict()) == config and isinstance(config, Strategy)


def test_too_large_reduction_factor_is_refused_before_changing_the_model():
    model = tiny_model("bert")
    with pytest.raises(ConfigError, match=r"reduction_factor=64: leaves no bottleneck for hidden size 32.*<= 32"):
        Bottleneck(reduction_factor=64).apply(model)
    assert all(p.requires_grad for p in model.parameters())
    assert not any(isinstance(m, BottleneckAdapter) for m in model.modules())


class _Flat(nn.Module):
    """Square linears only, no attention: no feed-forward down projection anywhere."""

    def __init__(self, with_ffn: bool = False):
        super().__init__()
        self.config = types.SimpleNamespace(hidden_size=8)
        self.proj = nn.Linear(8, 8)
        self.ffn = nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 8)) if with_ffn else nn.Identity()

    def forward(self, x):
        return self.ffn(self.proj(x))


def test_model_without_insertion_points_is_refused():
    with pytest.raises(UnsupportedError, match=r"model='_Flat': no feed-forward down projection.*Fix: use"):
        Bottleneck().apply(_Flat())
    with pytest.raises(UnsupportedError, match=r"variant='houlsby': _Flat has no module named like 'attention'"):
        Bottleneck(variant="houlsby").apply(_Flat(with_ffn=True))
    with pytest.raises(UnsupportedError, match=r"model='Sequential': its hidden size cannot be read"):
        Bottleneck().apply(nn.Sequential(nn.Linear(4, 4)))
    model = Bottleneck(bottleneck_size=2).apply(_Flat(with_ffn=True))  # pfeiffer needs only the feed-forward block
    assert isinstance(model.ffn[1].bottleneck_adapter, BottleneckAdapter)


# ---- quantized base and the real model ----------------------------------------------------------
def test_8bit_base_trains_fp32_adapters(tmp_path):
    pytest.importorskip("bitsandbytes")
    import transformers
    tiny_model("bert").save_pretrained(tmp_path / "base")
    quant = transformers.BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=["classifier"])
    model = transformers.AutoModelForSequenceClassification.from_pretrained(
        tmp_path / "base", quantization_config=quant, device_map="cpu").eval()
    # the pooler the head reads is quantized here: it cannot train, and the default would train it
    with pytest.raises(UnsupportedError, match=r"Bottleneck.train_pooler=True: the head reads bert.pooler, which "
                                               r"is quantized.*Fix: load with adaptkit.load_model"):
        Bottleneck(variant="houlsby").apply(model)
    assert not hasattr(model.bert.encoder.layer[0].output.dense, "bottleneck_adapter")  # refused before any change
    inputs = tiny_inputs("bert")
    base_logits = _logits(model, inputs)
    Bottleneck(variant="houlsby", train_pooler=False).apply(model)
    host = model.bert.encoder.layer[0].output.dense
    assert type(host).__name__ == "Linear8bitLt" and host.bottleneck_adapter.up.weight.dtype == torch.float32
    assert torch.equal(_logits(model, inputs), base_logits)
    _train_steps(model, "bert", "seq_cls", steps=1)
    assert host.bottleneck_adapter.up.weight.abs().sum() > 0 and not torch.equal(_logits(model, inputs), base_logits)


def test_load_model_in_8bit_keeps_the_pooler_unquantized_so_the_default_trains_it(tmp_path):
    pytest.importorskip("bitsandbytes")
    from adaptkit import load_model
    tiny_model("bert").save_pretrained(tmp_path / "base")
    model = load_model(str(tmp_path / "base"), task="seq_cls", quantization="8bit", num_labels=2)
    assert type(model.bert.encoder.layer[0].output.dense).__name__ == "Linear8bitLt"
    assert type(model.bert.pooler.dense) is nn.Linear
    Bottleneck().apply(model)
    assert model.bert.pooler.dense.weight.requires_grad
    _train_steps(model, "bert", "seq_cls", steps=2)


def test_pooler_trains_saves_and_reloads_and_an_older_folder_loads_with_it_frozen(tmp_path):
    import json

    import adaptkit
    base = tiny_model("bert")
    model = adaptkit.adapt(copy.deepcopy(base), "bottleneck")
    before = model.bert.pooler.dense.weight.detach().clone()
    _train_steps(model, "bert", "seq_cls")
    assert not torch.equal(model.bert.pooler.dense.weight, before)  # it trained
    adaptkit.save(model, tmp_path / "new")
    loaded = adaptkit.load(tmp_path / "new", copy.deepcopy(base))
    inputs = tiny_inputs("bert")
    assert torch.equal(_logits(loaded, inputs), _logits(model, inputs))
    # a folder saved before the option existed: its config has no train_pooler, its weights no pooler
    frozen = adaptkit.adapt(copy.deepcopy(base), Bottleneck(train_pooler=False))
    _train_steps(frozen, "bert", "seq_cls")
    adaptkit.save(frozen, tmp_path / "old")
    config_path = tmp_path / "old" / "adaptkit_config.json"
    config = json.loads(config_path.read_text())
    del config["strategy"]["train_pooler"]
    config_path.write_text(json.dumps(config))
    reloaded = adaptkit.load(tmp_path / "old", copy.deepcopy(base))
    assert not reloaded.bert.pooler.dense.weight.requires_grad
    assert torch.equal(_logits(reloaded, inputs), _logits(frozen, inputs))
    # while a config given today without the option gets today's default
    assert Bottleneck.from_dict({"strategy": "bottleneck"}).train_pooler is True


@pytest.mark.e2e
@pytest.mark.parametrize("variant,adapters", [("pfeiffer", 6), ("houlsby", 12)])
def test_minilm_trainable_count(minilm_path, variant, adapters):
    import transformers
    model = transformers.AutoModelForSequenceClassification.from_pretrained(minilm_path, num_labels=2).eval()
    inputs = {"input_ids": torch.tensor([[101, 7592, 2088, 2003, 2204, 102]])}  # [CLS] ... [SEP]
    before = _logits(model, inputs)
    Bottleneck(variant=variant).apply(model)
    assert torch.equal(_logits(model, inputs), before)
    hidden, size = 384, 384 // 16  # 24
    per_adapter = hidden * size + size + size * hidden + hidden  # down W+b, up W+b = 18,840
    head = hidden * 2 + 2  # classifier: 770
    pooler = hidden * hidden + hidden  # the dense layer the classifier reads: 147,840
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == adapters * per_adapter + head + pooler


def test_bf16_base_gets_fp32_adapters_and_keeps_its_dtype():
    base = tiny_model("llama", "causal_lm").to(torch.bfloat16)
    model = Bottleneck(variant="houlsby").apply(copy.deepcopy(base))
    adapter = model.model.layers[0].mlp.down_proj.bottleneck_adapter
    assert adapter.down.weight.dtype == torch.float32
    inputs = tiny_inputs("llama", "causal_lm")
    logits = _logits(model, inputs)
    assert logits.dtype == torch.bfloat16 and torch.equal(logits, _logits(base, inputs))
