"""adaptkit.sanity_check: passes on every healthy strategy, names what is wrong otherwise, changes nothing."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_inputs, tiny_labels, tiny_model

import adaptkit
from adaptkit import errors
from adaptkit.sanity import CHECKS, sanity_check

# strategy -> the checks that are skipped by design (everything else must pass)
SKIPPED = {"lora": set(), "ia3": set(), "bottleneck": {"merge"}, "prefix": {"init", "merge"},
           "linear_probe": {"init"}, "full": {"init"}}
CASES = [("bert", "seq_cls"), ("gpt2", "causal_lm"), ("t5", "seq2seq")]


def _batch(family="bert", task="seq_cls", batch=4):
    inputs = tiny_inputs(family, task, batch=batch)
    return {**inputs, "labels": tiny_labels(family, task, inputs)}


def _adapt(strategy, family="bert", task="seq_cls"):
    options = {"reduction_factor": 4} if strategy == "bottleneck" else {}  # tiny hidden 32: keep 8 ReLU units
    return adaptkit.adapt(tiny_model(family, task), strategy, **options)


@pytest.mark.parametrize("family,task", CASES)
@pytest.mark.parametrize("strategy", sorted(SKIPPED))
def test_healthy_strategies_pass(strategy, family, task):
    model = _adapt(strategy, family, task)
    report = sanity_check(model, _batch(family, task), base_model=lambda: tiny_model(family, task))
    assert report.ok, str(report)
    assert [r.name for r in report.results] == list(CHECKS)
    assert {r.name for r in report.results if r.status == "skipped"} == SKIPPED[strategy], str(report)
    assert len(report.losses) == 3 and all(torch.isfinite(torch.tensor(report.losses)))


def test_the_model_is_left_exactly_as_it_was():
    model = _adapt("lora").eval()
    before = {n: p.clone() for n, p in model.named_parameters()}
    torch.manual_seed(123)
    rng = torch.get_rng_state()
    sanity_check(model, _batch(), base_model=lambda: tiny_model("bert"))
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(torch.get_rng_state(), rng) and not model.training
    assert adaptkit.strategy_of(model).name == "lora"  # merge ran on a reloaded copy, not on this model


def test_an_adapter_that_is_not_identity_at_init():
    model = _adapt("lora")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.02)  # a small, well-conditioned nonzero B
    with pytest.raises(errors.SanityCheckError, match=r"sanity_check.init=.*the lora adapter changes the outputs at "
                                                      r"initialisation.*Fix: initialise it to the identity"):
        sanity_check(model, _batch())
    assert sanity_check(model, _batch(), at_init=False).ok  # a model that has trained already


def test_gradient_checkpointing_without_input_gradients():
    model = tiny_model("gpt2", "causal_lm")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model.disable_input_require_grads()  # what a custom training loop can end up with
    model = adaptkit.adapt(model, "bottleneck", reduction_factor=4)
    with pytest.raises(errors.SanityCheckError, match=r"0 trainable parameters received gradients: gradient "
                                                      r"checkpointing without input gradients. Fix: call "
                                                      r"model.enable_input_require_grads\(\)") as info:
        sanity_check(model, _batch("gpt2", "causal_lm"))
    assert not info.value.report.ok and info.value.report.failures[0].name == "gradients"


def test_a_frozen_new_head_is_caught():
    model = _adapt("bottleneck")
    model.classifier.requires_grad_(False)  # a fresh classifier left frozen stays random
    with pytest.raises(errors.SanityCheckError, match=r"the new task head\(s\) \['classifier'\] do not train.*Fix: "
                                                      r"list them in the strategy's heads"):
        sanity_check(model, _batch())


def test_a_trainable_tensor_the_loss_never_reaches():
    model = _adapt("bottleneck")
    # 14: the adapters (8 tensors), the classifier and the pooler it reads (2 each), and the stray layer (2)
    model.unused = torch.nn.Linear(2, 2)  # trainable, outside the forward pass
    with pytest.raises(errors.SanityCheckError, match=r"2 of 14 trainable tensors received no gradient: "
                                                      r"\['unused.weight', 'unused.bias'\]"):
        sanity_check(model, _batch())


def test_a_non_finite_loss():
    model = _adapt("linear_probe")
    with torch.no_grad():
        model.classifier.bias.fill_(float("nan"))
    with pytest.raises(errors.SanityCheckError, match=r"sanity_check.loss=nan: loss is nan at step 1.*Fix: lower the"):
        sanity_check(model, _batch())


def test_a_loss_that_does_not_fall_and_tensors_that_do_not_move():
    overshoot = sanity_check(_adapt("linear_probe"), _batch(), lr=1.0, raise_on_failure=False,
                             loss_fn=lambda outputs, batch: outputs.logits.sum().abs())
    assert [r.name for r in overshoot.failures] == ["loss"]
    assert "did not fall over 3 steps" in overshoot.failures[0].detail and "lr=1.0" in overshoot.failures[0].fix
    frozen_in_place = sanity_check(_adapt("lora"), _batch(), lr=1e-12, raise_on_failure=False)
    assert "did not change in 3 steps" in frozen_in_place.failures[0].detail


def test_a_reload_onto_another_base_is_caught():
    model = _adapt("lora")
    # load itself refuses a base whose weights differ from the one saved from (else the outputs would differ)
    with pytest.raises(errors.SanityCheckError, match=r"sanity_check.save_load=.*(the adapter does not load onto "
                                                      r"base_model\(\): is not the base|the reloaded adapter computes "
                                                      r"different outputs).*Fix: load onto the same base model"):
        sanity_check(model, _batch(), base_model=lambda: tiny_model("bert", seed=1))


def test_bad_arguments():
    model = _adapt("lora")
    with pytest.raises(errors.ConfigTypeError, match=r"batch='list': expected a dict of tensors"):
        sanity_check(model, [1, 2])
    with pytest.raises(errors.ConfigTypeError, match=r"steps=1: must be an int >= 2"):
        sanity_check(model, _batch(), steps=1)
    with pytest.raises(errors.ConfigTypeError, match=r"the model returned no loss.*Fix: include 'labels'"):
        sanity_check(model, tiny_inputs("bert"))


@pytest.mark.e2e
def test_minilm_lora_in_a_few_seconds(minilm_path):
    from transformers import AutoModelForSequenceClassification

    def base():
        return AutoModelForSequenceClassification.from_pretrained(minilm_path, num_labels=2)

    ids = torch.randint(1000, 20000, (8, 24), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor([0, 1] * 4)}
    report = sanity_check(adaptkit.adapt(base(), "lora"), batch, base_model=base)
    assert report.ok, str(report)
