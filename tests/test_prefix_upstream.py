"""Prefix tuning across transformers 5.23 - 5.25 with PEFT 0.21.2 (adaptkit/compat.py bridges the rename of
forward's past_key_values to cache), and disable_adapter() on prefix models."""

from __future__ import annotations

import copy
import inspect
import pickle
import warnings

import pytest
import torch
import transformers
from conftest import tiny_inputs, tiny_labels, tiny_model

import adaptkit
from adaptkit import compat, errors, versions

RENAMED = "past_key_values" not in inspect.signature(transformers.LlamaForCausalLM.forward).parameters
CASES = [("bert", "seq_cls"), ("roberta", "seq_cls"), ("gpt2", "causal_lm"), ("llama", "causal_lm"), ("t5", "seq2seq")]
# Measured on transformers 5.23.0 (no bridge needed there), peft 0.21.2, torch 2.13.0: the classifiers' logits for
# the first example, or the first 4 logits of the first generated token (greedy), with _fixed_prefix's values
AT_5_23 = {
    "bert": [0.02070857211947441, 0.0015695944894105196],
    "roberta": [0.01469131838530302, -0.02563564106822014],
    "gpt2": [-0.02333906665444374, 0.08368726074695587, -0.02554004266858101, 0.002761147916316986],
    "llama": [-0.07285238057374954, -0.3102937936782837, 0.07861031591892242, 0.03344710171222687],
    "t5": [2.7732574939727783, 1.1190836429595947, 0.2929607033729553, 0.9476858377456665],
}


def _fixed_prefix(model):
    with torch.no_grad():  # PEFT's init draws from the global RNG: fix the values so every version sees the same
        for p in model.prompt_encoder.parameters():
            p.normal_(0, 1.0, generator=torch.Generator().manual_seed(5))
    return model


def _first(model, family, task):
    """The logits a user reads first: the classifier's, or those of generate()'s first token."""
    inputs = tiny_inputs(family, task)
    if task == "seq_cls":
        return model(**inputs).logits[0]
    inputs.pop("decoder_input_ids", None)
    out = model.generate(**inputs, max_new_tokens=3, do_sample=False, output_scores=True, return_dict_in_generate=True)
    return out.scores[0][0]


@pytest.mark.parametrize("family,task", CASES)
def test_prefix_trains_saves_loads_and_generates_with_its_prefix(family, task, tmp_path):
    model = _fixed_prefix(adaptkit.adapt(tiny_model(family, task), "prefix"))
    first = _first(model, family, task)
    base = _first(tiny_model(family, task), family, task)
    assert not torch.allclose(first, base, atol=1e-4), "the prefix does not reach the output: it was dropped"
    assert torch.allclose(first[:4], torch.tensor(AT_5_23[family]), atol=1e-5), (first[:4].tolist(),
                                                                                    versions.describe("transformers"))
    if task != "seq_cls":  # generate's first step reads the same prefix as a plain forward does
        inputs = tiny_inputs(family, task)
        if task == "seq2seq":
            inputs["decoder_input_ids"] = torch.zeros_like(inputs["input_ids"][:, :1])
        assert torch.allclose(first, model(**inputs).logits[0, -1], atol=1e-5)

    adaptkit.save(model, tmp_path / "adapter")
    loaded = adaptkit.load(tmp_path / "adapter", tiny_model(family, task))
    assert torch.equal(_first(loaded, family, task), first)

    model.train()
    inputs = tiny_inputs(family, task)
    loss = model(**inputs, labels=tiny_labels(family, task, inputs)).loss
    loss.backward()
    grads = [p.grad for p in model.prompt_encoder.parameters()]
    assert torch.isfinite(loss) and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_a_copied_or_pickled_model_keeps_its_prefix():
    model = _fixed_prefix(adaptkit.adapt(tiny_model("llama", "causal_lm"), "prefix"))
    first = _first(model, "llama", "causal_lm")
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert torch.equal(_first(clone, "llama", "causal_lm"), first)


def test_a_plain_peft_prefix_folder_loads_bridged(tmp_path):
    """The pass-through path: a PEFT prefix folder written without adaptkit, loaded with adaptkit.load."""
    from peft import PrefixTuningConfig, get_peft_model
    written = _fixed_prefix(get_peft_model(tiny_model("llama", "causal_lm"), PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=20)))
    written.save_pretrained(tmp_path / "peft")
    loaded = adaptkit.load(tmp_path / "peft", tiny_model("llama", "causal_lm"))
    assert torch.allclose(_first(loaded, "llama", "causal_lm")[:4], torch.tensor(AT_5_23["llama"]), atol=1e-5)


@pytest.mark.skipif(not RENAMED, reason="transformers<5.24 takes past_key_values: nothing to bridge")
def test_without_the_bridge_generate_drops_the_prefix_silently():
    """What compat.py exists for: on transformers 5.24+, PEFT 0.21.2's prefix loses to generate()'s empty cache."""
    model = _fixed_prefix(adaptkit.adapt(tiny_model("llama", "causal_lm"), "prefix"))
    assert isinstance(model.get_base_model().__dict__.pop("forward"), compat._Bridged)  # the bridge undone
    assert torch.allclose(_first(model, "llama", "causal_lm"), _first(tiny_model("llama", "causal_lm"), "llama",
                                                                      "causal_lm"), atol=1e-6)


def test_transformers_still_reads_past_key_values_where_peft_passes_it():
    """When transformers removes the past_key_values alias (announced for 5.40), this fails: PEFT 0.21.2 would then
    lose its prefix wherever compat.py's bridge is not installed. Re-test compat.py and move TESTED_BELOW."""
    bert = tiny_model("bert", "base")
    inputs = tiny_inputs("bert")
    prefix = transformers.DynamicCache()
    for layer in range(bert.config.num_hidden_layers):
        prefix.update(torch.randn(2, 4, 3, 8), torch.randn(2, 4, 3, 8), layer)
    mask = torch.cat([torch.ones(2, 3, dtype=torch.long), inputs["attention_mask"]], dim=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with_prefix = bert(input_ids=inputs["input_ids"], attention_mask=mask, past_key_values=prefix)
    without = bert(**inputs)
    assert not torch.allclose(with_prefix.last_hidden_state, without.last_hidden_state, atol=1e-4), \
        f"transformers {transformers.__version__} ignores past_key_values: the alias PEFT relies on is gone"
    renamed = [str(w.message) for w in caught if "past_key_values" in str(w.message)]
    assert all("5.40" in text for text in renamed), renamed  # the removal moved: move compat.TESTED_BELOW with it


def test_prefix_on_an_untested_transformers_is_refused_before_peft_touches_the_model(monkeypatch, tmp_path):
    saved = adaptkit.save(adaptkit.adapt(tiny_model("bert"), "prefix"), tmp_path / "adapter")
    monkeypatch.setattr(versions, "installed", lambda name: "5.40.0" if name == "transformers"
                        else versions.TESTED.get(name))
    model = tiny_model("bert")
    with pytest.raises(errors.IncompatibleVersionError) as info:
        adaptkit.adapt(model, "prefix")
    assert str(info.value).startswith("transformers='5.40.0': prefix tuning is tested below 5.40")
    assert "pip install 'transformers<5.40'" in str(info.value) and not hasattr(model, "peft_config")
    with pytest.raises(errors.IncompatibleVersionError, match=r"transformers='5.40.0'"):
        adaptkit.load(saved, tiny_model("bert"))
    assert adaptkit.check(tiny_model("bert"), "lora").ok  # other strategies are unaffected
    with pytest.raises(errors.ConfigErrors, match=r"transformers='5.40.0'"):
        adaptkit.check(tiny_model("bert"), "prefix")


@pytest.mark.parametrize("strategy,family,task", [
    ("prefix", "bert", "seq_cls"), ("prompt_tuning", "roberta", "seq_cls"), ("p_tuning", "bert", "seq_cls"),
    ("lora", "bert", "seq_cls"), ("ia3", "bert", "seq_cls"), ("prefix", "llama", "causal_lm")])
def test_disable_adapter_runs_the_base_model(strategy, family, task):
    """PEFT 0.21.2 raises UnboundLocalError here for prompt-learning classifiers, on every transformers version."""
    model = adaptkit.adapt(tiny_model(family, task), strategy)
    with torch.no_grad():  # the adapter away from its init, so that it changes the outputs; the head left as it is
        for name, p in model.named_parameters():
            if p.requires_grad and "modules_to_save" not in name:
                p.normal_(0, 1.0, generator=torch.Generator().manual_seed(5))
    adapted, base = _first(model, family, task), _first(tiny_model(family, task), family, task)
    assert not torch.allclose(adapted, base, atol=1e-4)
    with model.disable_adapter():
        assert torch.allclose(_first(model, family, task), base, atol=1e-6)
    assert torch.equal(_first(model, family, task), adapted)


def test_disable_adapter_on_native_strategies_switches_bottleneck_off_and_refuses_the_others():
    model = adaptkit.adapt(tiny_model("bert"), "bottleneck", reduction_factor=4)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and "adapter" in name:
                p.normal_(0, 1.0, generator=torch.Generator().manual_seed(5))
    adapted, base = _first(model, "bert", "seq_cls"), _first(tiny_model("bert"), "bert", "seq_cls")
    assert not torch.allclose(adapted, base, atol=1e-4)
    with model.disable_adapter():  # the pooler and head it trains are the base's at init: the base model's outputs
        assert torch.allclose(_first(model, "bert", "seq_cls"), base, atol=1e-6)
    assert torch.equal(_first(model, "bert", "seq_cls"), adapted)
    for strategy in ("linear_probe", "full"):
        with pytest.raises(errors.UnsupportedError, match=rf"^disable_adapter='{strategy}': {strategy} trains the "
                           r"model's own weights\. Fix: reload the base"):
            adaptkit.adapt(tiny_model("bert"), strategy).disable_adapter()
