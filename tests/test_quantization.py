"""load_model with 8-bit / 4-bit bitsandbytes on CPU, as users hit it, and the combinations it refuses.

Tiny models saved to a temp folder with save_pretrained, so from_pretrained + bitsandbytes run for
real (seconds); the bytes-per-weight goal is checked on the real MiniLM (its quantized load is 0.5 s).
"""

from __future__ import annotations

import sys

import pytest
import torch
import transformers
from conftest import tiny_model

import adaptkit
from adaptkit import errors
from adaptkit.quantization import load_model, quantization_report, quantized_linears

bnb = pytest.importorskip("bitsandbytes")

QUANTS = ["8bit", "4bit"]
INPUTS = {"input_ids": torch.randint(3, 99, (4, 8), generator=torch.Generator().manual_seed(1))}
LABELS = torch.tensor([0, 1, 0, 1])


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Folders holding tiny pretrained backbones: BERT (a BertModel: heads are new) and Llama."""
    root = tmp_path_factory.mktemp("tiny")
    tiny_model("bert", "base").save_pretrained(root / "bert")
    tiny_model("llama", "causal_lm").save_pretrained(root / "llama")
    # bitsandbytes' CPU repack needs in_features >= its 64-value block: a second BERT, 64 wide
    transformers.BertModel(transformers.BertConfig(vocab_size=99, hidden_size=64, num_hidden_layers=1,
                                                   num_attention_heads=4, intermediate_size=128,
                                                   max_position_embeddings=64)).save_pretrained(root / "bert64")
    return root


def _train(model, steps=2, lr=0.1):
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        loss = model(**INPUTS, labels=LABELS).loss
        loss.backward()
        optimizer.step()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}, loss.item()


def _lora(path, quantization, seed=0, **kwargs):
    torch.manual_seed(seed)
    model = load_model(str(path), "seq_cls", quantization, num_labels=2, **kwargs)
    return adaptkit.adapt(model, adaptkit.LoRA(r=4, dropout=0.0))


# ---- loading -----------------------------------------------------------------------------------
@pytest.mark.parametrize("quantization", QUANTS)
def test_heads_stay_unquantized_and_the_first_forward_runs(saved, quantization):
    model = load_model(str(saved / "bert"), "seq_cls", quantization, num_labels=2)
    layer = model.bert.encoder.layer[0].attention.self.query
    assert isinstance(layer, bnb.nn.Linear8bitLt if quantization == "8bit" else bnb.nn.Linear4bit)
    assert type(model.classifier) is torch.nn.Linear and model.classifier.weight.dtype == torch.float32
    assert adaptkit.is_quantized(model) == quantization
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    assert adaptkit.summary(model).trainable == 0  # frozen: only an adapter trains on a quantized base
    with torch.no_grad():
        assert torch.isfinite(model.eval()(**INPUTS).logits).all()


@pytest.mark.parametrize("task, head", [("causal_lm", "lm_head"), ("seq_cls", "score")])
def test_decoder_heads_stay_unquantized(saved, task, head):
    model = load_model(str(saved / "llama"), task, "8bit", num_labels=2)
    assert type(getattr(model, head)) is torch.nn.Linear
    assert isinstance(model.model.layers[0].self_attn.q_proj, bnb.nn.Linear8bitLt)
    with torch.no_grad():
        assert torch.isfinite(model.eval()(**INPUTS).logits).all()


@pytest.mark.parametrize("quantization", QUANTS)
def test_lora_trains_with_checkpointing_and_gets_the_same_gradients(saved, quantization):
    plain_grads, plain_loss = _train(_lora(saved / "bert", quantization))
    model = _lora(saved / "bert", quantization, gradient_checkpointing=True)
    assert model.get_base_model().is_activation_checkpointing
    grads, loss = _train(model)
    lora = [n for n in grads if "lora_" in n]
    assert len(lora) >= 8  # A and B of at least q, v in both layers
    assert all(grads[n].abs().sum() > 0 for n in lora), "a LoRA weight received no gradient"
    assert loss == pytest.approx(plain_loss, abs=1e-6)
    assert max((grads[n] - plain_grads[n]).abs().max().item() for n in grads) < 1e-6


@pytest.mark.parametrize("quantization", QUANTS)
def test_no_hidden_fp32_upcast(saved, quantization):
    model = _lora(saved / "bert", quantization, dtype=torch.bfloat16)
    base = model.get_base_model()
    assert base.bert.embeddings.word_embeddings.weight.dtype == torch.bfloat16
    assert base.bert.encoder.layer[0].attention.output.LayerNorm.weight.dtype == torch.bfloat16
    _train(model, steps=1)
    # peft.prepare_model_for_kbit_training would have cast these to fp32 (what load_model avoids)
    assert base.bert.embeddings.word_embeddings.weight.dtype == torch.bfloat16


@pytest.mark.parametrize("folder", ["bert", "bert64"])
def test_4bit_trains_after_an_eval_pass(saved, folder):
    """On AVX512-BF16 CPUs bitsandbytes repacks 4-bit weights at an eval forward; training must go on.

    (With in_features < 64 the repack itself crashes, so the tiny 32-wide BERT covers that too.)
    """
    model = _lora(saved / folder, "4bit")
    _train(model, steps=1)
    model.eval()
    with torch.no_grad():
        before = model(**INPUTS).logits
    grads, _ = _train(model, steps=1)
    assert all(g.abs().sum() > 0 for n, g in grads.items() if "lora_B" in n)
    layer = next(iter(quantized_linears(model).values()))
    assert not getattr(layer.weight.quant_state, "packing_format_for_cpu", False)
    model.eval()
    with torch.no_grad():
        assert not torch.equal(before, model(**INPUTS).logits)  # it really trained after the eval pass


def test_4bit_repacked_before_preparation_is_refused_before_the_broken_step(saved):
    from adaptkit.quantization import bnb_config, prepare_kbit
    model = transformers.AutoModelForSequenceClassification.from_pretrained(
        saved / "bert64", num_labels=2, device_map="cpu",
        quantization_config=bnb_config("4bit", ["classifier", "bert.pooler"]))  # the head and the pooler it reads
    layer = next(iter(quantized_linears(model).values()))
    if not getattr(layer, "support_avx512bf16_for_cpu", False):
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes never repacks 4-bit weights here")
    with torch.no_grad():
        model.eval()(**INPUTS)  # the user's own eval pass, before adaptkit saw the model
    assert layer.weight.quant_state.packing_format_for_cpu
    model = adaptkit.adapt(prepare_kbit(model), "lora")
    with pytest.raises(errors.UnsupportedError, match=r"repacked.*Fix: load with adaptkit.load_model"):
        _train(model, steps=1)


def test_quantization_options_override_the_qlora_defaults(saved):
    nf4 = load_model(str(saved / "bert"), "seq_cls", "4bit", num_labels=2)
    fp4 = load_model(str(saved / "bert"), "seq_cls", "4bit", num_labels=2,
                     quantization_options={"bnb_4bit_quant_type": "fp4", "bnb_4bit_use_double_quant": False})
    states = [next(iter(quantized_linears(m).values())).weight.quant_state for m in (nf4, fp4)]
    assert [(s.quant_type, s.nested) for s in states] == [("nf4", True), ("fp4", False)]
    assert type(fp4.classifier) is torch.nn.Linear  # the heads stay out whatever the options


def test_a_quantized_head_is_refused_with_the_fix(saved):
    from adaptkit.quantization import prepare_kbit
    plain = transformers.BitsAndBytesConfig(load_in_8bit=True)  # plain HF: the new head gets quantized too
    model = transformers.AutoModelForSequenceClassification.from_pretrained(
        saved / "bert", num_labels=2, device_map="cpu", quantization_config=plain)
    with pytest.raises(errors.UnsupportedError, match=r"\['classifier'\]: bitsandbytes quantized a task head.*"
                                                      r"Fix: load with adaptkit.load_model"):
        prepare_kbit(model)


def test_lora_refuses_to_train_a_quantized_pooler_and_names_the_fix(saved):
    plain = transformers.BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=["classifier"])
    model = transformers.AutoModelForSequenceClassification.from_pretrained(
        saved / "bert", num_labels=2, device_map="cpu", quantization_config=plain)
    assert type(model.bert.pooler.dense).__name__ == "Linear8bitLt"  # plain HF quantizes the pooler the head reads
    with pytest.raises(errors.UnsupportedError, match=r"LoRA.train_pooler=True: the head reads bert.pooler, which is "
                                                      r"quantized.*Fix: load with adaptkit.load_model"):
        adaptkit.adapt(model, "lora")
    adapted = adaptkit.adapt(model, "lora", train_pooler=False)  # the pooler frozen, under a low-rank update
    assert any(".pooler.dense.lora_A." in n and p.requires_grad for n, p in adapted.named_parameters())
    _train(adapted, steps=1)


# ---- footprint ---------------------------------------------------------------------------------
@pytest.mark.parametrize("quantization, saved_per_weight", [("8bit", 3.0), ("4bit", 3.5)])
def test_summary_footprint_beside_fp32(saved, quantization, saved_per_weight):
    fp32 = adaptkit.summary(load_model(str(saved / "bert"), "seq_cls", num_labels=2))
    model = load_model(str(saved / "bert"), "seq_cls", quantization, num_labels=2)
    quant = adaptkit.summary(model)
    weights = quantization_report(model)["weights"]
    assert weights == sum(m.in_features * m.out_features for m in quantized_linears(model).values()) > 0
    assert quant.total == fp32.total and quant.fp32_bytes == fp32.footprint_bytes == fp32.fp32_bytes
    # an fp32 weight is 4 bytes; int8 is 1, nf4 is half a byte (scales are reported separately)
    assert quant.footprint_bytes == (fp32.footprint_bytes - int(saved_per_weight * weights)
                                     + quantization_report(model)["state_bytes"])


def test_bytes_per_quantized_weight_on_minilm(minilm_path):
    per_weight = {q: quantization_report(load_model(str(minilm_path), "seq_cls", q, num_labels=2))["bytes_per_weight"]
                  for q in QUANTS}
    assert 1.0 < per_weight["8bit"] <= 1.1   # int8 + one fp32 scale per output row
    assert 0.5 < per_weight["4bit"] <= 0.55  # nf4 + double-quantized block statistics


# ---- refusals ----------------------------------------------------------------------------------
@pytest.mark.parametrize("quantization", QUANTS)
def test_full_fine_tuning_on_a_quantized_model_is_refused(saved, quantization):
    model = load_model(str(saved / "bert"), "seq_cls", quantization, num_labels=2)
    with pytest.raises(errors.UnsupportedError, match=rf"full on a {quantization} model.*Fix: load the model (without|unquantized)"):
        adaptkit.adapt(model, "full")


def test_prefix_with_gradient_checkpointing_is_refused(saved):
    model = load_model(str(saved / "bert"), "seq_cls", num_labels=2, gradient_checkpointing=True)
    with pytest.raises(errors.UnsupportedError, match=r"gradient_checkpointing=True.*Fix: call model.gradient"):
        adaptkit.adapt(model, "prefix")


def test_quantization_without_bitsandbytes(saved, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # what `import bitsandbytes` sees when absent
    with pytest.raises(errors.MissingDependencyError,
                       match=r"quantization='8bit'.*pip install 'adaptkit\[bitsandbytes\]'"):
        load_model(str(saved / "bert"), "seq_cls", "8bit", num_labels=2)
    assert load_model(str(saved / "bert"), "seq_cls", num_labels=2) is not None  # full precision needs none


@pytest.mark.parametrize("kwargs, error, match", [
    ({"quantization": "int8"}, errors.ConfigError, r"quantization='int8'.*Fix: use one of \['8bit', '4bit'\]"),
    ({"task": "seq_class"}, errors.ConfigError, r"task='seq_class'.*did you mean 'seq_cls'"),
    ({"quantization": "8bit", "quantization_config": object()}, errors.ConfigError,
     r"quantization_config.*Fix: pass quantization='8bit' or '4bit'"),
    ({"quantization_options": {"bnb_4bit_quant_type": "fp4"}}, errors.ConfigError, r"without a quantization"),
    ({"quantization": "4bit", "quantization_options": {"load_in_8bit": True}}, errors.ConfigError,
     r"load_in_8bit.*decided by the quantization argument"),
    ({"quantization": "4bit", "quantization_options": {"bnb_4bit_quant_typ": "fp4"}}, errors.UnknownOptionError,
     r"\['bnb_4bit_quant_typ'\]: not BitsAndBytesConfig fields.*did you mean 'bnb_4bit_quant_type'"),
])
def test_bad_arguments(saved, kwargs, error, match):
    with pytest.raises(error, match=match):
        load_model(str(saved / "bert"), **{"task": "seq_cls", **kwargs})


def test_sharding_under_several_processes_is_refused(saved, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("ACCELERATE_USE_CPU", "1")
    with pytest.raises(errors.UnsupportedError, match=r"device_map='auto'.*2 data-parallel processes.*Fix: leave"):
        load_model(str(saved / "bert"), "seq_cls", "8bit", num_labels=2, device_map="auto")
    seen = {}
    real = transformers.AutoModelForSequenceClassification.from_pretrained
    monkeypatch.setattr(transformers.AutoModelForSequenceClassification, "from_pretrained",
                        lambda *a, **kw: seen.update(kw) or real(*a, **kw))
    load_model(str(saved / "bert"), "seq_cls", "8bit", num_labels=2)
    assert seen["device_map"] == {"": "cpu"}  # the whole model on this process's device


# ---- every strategy on a quantized base (one process) -------------------------------------------
def _strategies():
    names = sorted(n for n, cls in adaptkit.STRATEGIES.items() if cls.supports_quantized and n != "peft")
    assert {"lora", "prefix", "bottleneck", "linear_probe"} <= set(names)  # the list cannot go empty
    return names + ["ia3"]


@pytest.mark.parametrize("quantization", QUANTS)
@pytest.mark.parametrize("strategy", _strategies())
def test_each_strategy_trains_on_a_quantized_base(saved, strategy, quantization):
    torch.manual_seed(0)
    model = adaptkit.adapt(load_model(str(saved / "bert64"), "seq_cls", quantization, num_labels=2), strategy)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert before and not any(n in before for n in quantized_linears(model))
    _train(model, steps=1)
    model.eval()
    with torch.no_grad():
        model(**INPUTS)  # an eval pass between two training steps (the 4-bit CPU repack case)
    grads, loss = _train(model, steps=1)
    assert torch.isfinite(torch.tensor(loss))
    changed = [n for n, p in model.named_parameters() if n in before and not torch.equal(p, before[n])]
    assert changed, f"{strategy} on {quantization}: no trained parameter moved"
