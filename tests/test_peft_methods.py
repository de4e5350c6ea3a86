"""Every PEFT method adaptkit reaches by name trains what plain PEFT trains on the same model, or differs for a
reason written here and tested; where plain PEFT fails, adaptkit fails with a typed error naming the option.

The models are small but wide enough (hidden 256) for every method's own default sizes.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import transformers
from conftest import tiny_inputs, tiny_model

import adaptkit
from adaptkit.errors import AdaptkitError, ConfigError, ConfigErrors, UnsupportedError
from adaptkit.strategies.peft_method import PROMPT_DEFAULTS, peft_method_names

_SIZE = dict(vocab_size=99, hidden_size=256, intermediate_size=512, num_hidden_layers=1, num_attention_heads=4,
             max_position_embeddings=64, pad_token_id=0)
MODELS = {
    "llama": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(num_key_value_heads=4, **_SIZE)),
    "bert": lambda: transformers.BertForSequenceClassification(transformers.BertConfig(num_labels=2, **_SIZE)),
}
POOLER = 256 * 256 + 256  # bert.pooler.dense: adaptkit trains it beside a fresh head (train_pooler, issue 29 #10)

# (method, model) -> words of the typed error adaptkit raises; plain PEFT fails there too (or trains nothing)
REFUSED = {
    ("adalora", "llama"): "total_step", ("adalora", "bert"): "total_step",
    ("trainable_tokens", "llama"): "token_indices", ("trainable_tokens", "bert"): "token_indices",
    ("xlora", "llama"): "use_cache", ("xlora", "bert"): "use_cache",
    ("adaption_prompt", "bert"): "Unsupported model type for adaption prompt",  # LLaMA-Adapter: decoders only
    ("cpt", "bert"): "CAUSAL_LM",
    ("shadow", "bert"): "target_modules",  # no decoder layers to find; PEFT has no BERT default either
}


def count(model) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values() if p.requires_grad)


def plain_peft(method: str, family: str, **options) -> int:
    from peft import PeftType, get_peft_model
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
    config_class = PEFT_TYPE_TO_CONFIG_MAPPING[PeftType(method.upper())]
    fields = config_class.__dataclass_fields__
    # the sizes PEFT leaves empty, which adaptkit fills (peft_method.PROMPT_DEFAULTS), given to PEFT too
    options = {**{k: v for k, v in PROMPT_DEFAULTS.items() if k in fields}, **options}
    if method == "adaption_prompt":
        options["adapter_layers"] = 1
    torch.manual_seed(0)
    model = MODELS[family]()
    task = "CAUSAL_LM" if family == "llama" else "SEQ_CLS"
    return count(get_peft_model(model, config_class(task_type=task, **options)))


def expected(method: str, family: str) -> int:
    """Plain PEFT's count, with the documented differences."""
    from peft import LNTuningConfig  # noqa: F401  (imported for the reader: the config ln_tuning builds)
    # adaptkit's own LoRA: every backbone linear, as PEFT's "all-linear" (not query/value); OSF has no BERT table and
    # PEFT falls back to all-linear itself, as adaptkit does; on BERT the pooler trains whole instead
    if method == "lora" or (method, family) == ("osf", "bert"):
        options = {"target_modules": "all-linear"} if family == "llama" else {"target_modules": (
            r".*layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense|intermediate\.dense|output\.dense)")}
        return plain_peft(method, family, **options) + (POOLER if family == "bert" else 0)
    if (method, family) == ("ln_tuning", "bert"):  # PEFT has no BERT default: adaptkit tunes the norms
        return plain_peft(method, family, target_modules=["LayerNorm"]) + POOLER
    return plain_peft(method, family) + (POOLER if family == "bert" else 0)


@pytest.mark.parametrize("family", sorted(MODELS))
@pytest.mark.parametrize("method", peft_method_names())
def test_every_peft_method_trains_what_plain_peft_trains(method, family, tmp_path):
    torch.manual_seed(0)
    model = MODELS[family]()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if (method, family) in REFUSED:
            with pytest.raises(AdaptkitError, match=REFUSED[method, family]):
                adaptkit.adapt(model, method)
            try:
                assert plain_peft(method, family) == 0
            except AdaptkitError:
                raise
            except Exception:  # noqa: BLE001 - plain PEFT's own raw error is the point
                pass
            return
        adapted = adaptkit.adapt(model, method)
        assert count(adapted) == expected(method, family)
        adaptkit.save(adapted, tmp_path / "adapter")  # what the method trains is all inside the adapter it saves


def test_ln_tuning_tunes_the_norms_not_every_linear():
    # 18e00d1: 18,432 parameters on this model, every linear layer copied and trained in full (PEFT: 160)
    model = adaptkit.adapt(tiny_model("llama", "causal_lm"), "ln_tuning")
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trained and all("norm" in n for n in trained) and count(model) == 160


@pytest.mark.parametrize("method", ["prompt_tuning", "p_tuning", "prefix_tuning", "adaption_prompt"])
def test_prompt_methods_by_name_work_with_prefix_like_defaults(method):
    # 18e00d1: TypeError: ... 'NoneType' from PEFT for each of them
    model = adaptkit.adapt(tiny_model("llama", "causal_lm"), method)
    assert count(model) > 0
    assert model(**tiny_inputs("llama", "causal_lm")).logits.isfinite().all()
    key = "adapter_len" if method == "adaption_prompt" else "num_virtual_tokens"
    assert adaptkit.core.strategy_of(model).options[key] == PROMPT_DEFAULTS[key]


def test_check_names_num_virtual_tokens(tmp_path, capsys):
    config = tiny_model("gpt2", "causal_lm").config  # 64 positions
    report = adaptkit.check(config, "prompt_tuning", task="causal_lm")
    assert report.ok and report.trainable == 20 * 32  # 18e00d1: "choose another strategy"
    with pytest.raises(ConfigErrors, match=r"prompt_tuning\.num_virtual_tokens=64: leaves no room for text"):
        adaptkit.check(config, "prompt_tuning", task="causal_lm", options={"num_virtual_tokens": 64})
    from adaptkit.cli import main
    config.save_pretrained(tmp_path)
    assert main(["check", str(tmp_path), "--strategy", "prompt_tuning", "-o", "num_virtual_tokens=64"]) == 1
    assert "prompt_tuning.num_virtual_tokens=64: leaves no room for text" in capsys.readouterr().out


def test_trainable_tokens_without_token_indices_is_refused_naming_the_option():
    with pytest.raises(ConfigError, match=r"trainable_tokens\.token_indices=None: is required: without it PEFT trains "
                                          r"nothing\. Fix: pass options=\{'token_indices': \[\.\.\.\]\}"):
        adaptkit.adapt(tiny_model("llama", "causal_lm"), "trainable_tokens")


@pytest.mark.parametrize("method", ["loha", "vera", "ia3", "prompt_tuning"])
def test_pass_through_methods_train_the_pooler_a_fresh_head_reads(method, tmp_path):
    def pooler_trains(model):
        return any(n.startswith("base_model.") and ".pooler." in n and p.requires_grad for n, p in model.named_parameters())
    model = adaptkit.adapt(tiny_model("bert"), method)
    assert pooler_trains(model)  # 18e00d1: frozen for every pass-through method
    frozen = adaptkit.adapt(tiny_model("bert"), method, train_pooler=False)
    assert not pooler_trains(frozen)
    assert count(model) - count(frozen) == 32 * 32 + 32
    with torch.no_grad():  # trained pooler values must come back with the adapter
        model.get_base_model().bert.pooler.modules_to_save["default"].dense.weight.add_(0.5)
    adaptkit.save(model, tmp_path / "a")
    inputs = tiny_inputs("bert")
    loaded = adaptkit.load(tmp_path / "a", tiny_model("bert"))
    torch.testing.assert_close(loaded(**inputs).logits, model.eval()(**inputs).logits)


def test_train_pooler_must_be_a_bool():
    with pytest.raises(AdaptkitError, match=r"loha\.train_pooler=.no.: expected bool, got str"):
        adaptkit.adapt(tiny_model("bert"), "loha", train_pooler="no")


# ---- LoRA initialisations: every one adapt accepts round-trips, the others are refused up front ----------
@pytest.mark.parametrize("init", ["gaussian", "pissa", "olora", "orthogonal", "eva", "mica"])
def test_lora_init_round_trips(init, tmp_path):
    model = adaptkit.adapt(tiny_model("bert"), "lora", init=init)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    inputs = tiny_inputs("bert")
    want = model.eval()(**inputs).logits
    adaptkit.save(model, tmp_path / "a")
    base = tiny_model("bert")
    torch.manual_seed(123)  # another random state than at adapt: a randomized init would show
    torch.testing.assert_close(adaptkit.load(tmp_path / "a", base)(**inputs).logits, want)


@pytest.mark.parametrize("init, words", [("pissa_niter_2", "randomized SVD"), ("corda", "preprocess_corda"),
                                         ("loftq", "quantized")])
def test_lora_inits_that_cannot_round_trip_are_refused_by_adapt_and_check(init, words):
    message = rf"LoRA\.init='{init}': cannot round-trip through save and load: .*{words}"
    with pytest.raises(ConfigError, match=message):
        adaptkit.adapt(tiny_model("bert"), "lora", init=init)
    with pytest.raises(ConfigErrors, match=message):
        adaptkit.check(tiny_model("bert").config, "lora", options={"init": init})
    from peft import LoraConfig
    with pytest.raises(ConfigError, match=rf"lora\.init_lora_weights='{init}': cannot round-trip"):
        adaptkit.adapt(tiny_model("bert"), LoraConfig(init_lora_weights=init, **(
            {"loftq_config": {"loftq_bits": 4}} if init == "loftq" else {})))


def test_a_peft_refusal_is_typed_and_names_the_method():
    with pytest.raises(UnsupportedError, match=r"shadow options='BertForSequenceClassification': PEFT refuses "
                                               r"ShadowConfig on this model: .*target_modules"):
        adaptkit.adapt(tiny_model("bert"), "shadow")
