"""The linear-probe feature cache: same training as the end-to-end probe, or a typed refusal saying why."""

from __future__ import annotations

import pytest
import torch
import transformers
from conftest import tiny_model

import adaptkit
from adaptkit import errors
from adaptkit.recipes.features import CachedProbe


def _examples(n: int = 12, seed: int = 0, regression: bool = False) -> list[dict]:
    """Tokenized-looking examples of different lengths (what batching.tokenize returns)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = 4 + i % 5
        ids = torch.randint(3, 99, (length,), generator=g).tolist()
        label = float(i % 5) / 2 if regression else i % 2
        out.append({"input_ids": ids, "attention_mask": [1] * length, "labels": label})
    return out


def _collate(examples: list[dict]) -> dict:
    width = max(len(e["input_ids"]) for e in examples)
    pad = lambda seq: seq + [0] * (width - len(seq))  # noqa: E731
    labels = torch.tensor([e["labels"] for e in examples])
    return {"input_ids": torch.tensor([pad(e["input_ids"]) for e in examples]),
            "attention_mask": torch.tensor([pad(e["attention_mask"]) for e in examples]), "labels": labels}


def _probe_model(family: str = "bert", **config):
    model = tiny_model(family)
    for key, value in config.items():
        setattr(model.config, key, value)
    return adaptkit.adapt(model, "linear_probe")


def test_cached_training_equals_end_to_end_training():
    examples = _examples()
    e2e, cached_model = _probe_model(), _probe_model()
    probe = CachedProbe(cached_model)
    features = probe.cache(examples, _collate, batch_size=5)
    assert features.head_inputs.shape == (12, 32) and probe.first_position_only is False
    opt_a = torch.optim.AdamW([p for p in e2e.parameters() if p.requires_grad], lr=1e-2)
    opt_b = torch.optim.AdamW(probe.parameters(), lr=1e-2)
    e2e.train(), probe.train()
    for rows in ([0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [3, 7, 11, 0]):
        e2e(**_collate([examples[i] for i in rows])).loss.backward()
        batch = features.loader(4).collate_fn(rows)
        probe(**batch).loss.backward()
        opt_a.step(), opt_b.step(), opt_a.zero_grad(), opt_b.zero_grad()
    for name, p in probe.named_parameters():
        torch.testing.assert_close(p, dict(e2e.named_parameters())[name], rtol=0, atol=1e-6)
    # the probe trained the model's own head: the full model now gives the probe's logits end to end
    cached_model.eval()
    batch = _collate(examples[:4])
    with torch.no_grad():
        full = cached_model(**batch).logits
        replay = probe(features.head_inputs[:4]).logits
    torch.testing.assert_close(full, replay, rtol=0, atol=1e-6)


def test_loader_keeps_examples_in_order_and_shuffles_with_a_seed():
    probe = CachedProbe(_probe_model())
    features = probe.cache(_examples(), _collate, batch_size=4)  # batches are length-sorted inside
    assert features.labels.tolist() == [i % 2 for i in range(12)]
    first = [b["labels"].tolist() for b in features.loader(4, shuffle=True, seed=3)]
    again = [b["labels"].tolist() for b in features.loader(4, shuffle=True, seed=3)]
    assert first == again and sorted(sum(first, [])) == sorted(features.labels.tolist())
    assert probe.report()["cached_examples"] == 12 and features.nbytes == 12 * 32 * 4 + 12 * 8


def test_save_from_the_probe_loads_as_the_full_model(tmp_path):
    examples = _examples()
    model = _probe_model()
    probe = CachedProbe(model)
    features = probe.cache(examples, _collate)
    with torch.no_grad():
        probe.classifier.weight.add_(0.5)  # a "trained" head
    adaptkit.save(probe, tmp_path / "adapter")
    reloaded = adaptkit.load(tmp_path / "adapter", tiny_model("bert")).eval()
    batch = _collate(examples[:5])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, model.eval()(**batch).logits, rtol=0, atol=0)
        torch.testing.assert_close(reloaded(**batch).logits, probe(features.head_inputs[:5]).logits, rtol=0, atol=1e-6)


def test_regression_labels_use_the_models_loss():
    model = tiny_model("bert", num_labels=1)
    model.config.problem_type = "regression"
    probe = CachedProbe(adaptkit.adapt(model, "linear_probe"))
    features = probe.cache(_examples(regression=True), _collate)
    assert features.labels.dtype == torch.float32
    assert probe(**features.loader(12).collate_fn(list(range(12)))).loss.ndim == 0


def test_roberta_head_stores_the_first_position_only():
    probe = CachedProbe(_probe_model("roberta"))
    features = probe.cache(_examples(), _collate)
    assert features.head_inputs.shape == (12, 1, 32) and probe.first_position_only is True


def test_dropout_in_the_frozen_encoder_is_refused_in_match_mode_and_accepted_in_eval_mode():
    def dropout_model():
        model = tiny_model("bert")
        model.config.hidden_dropout_prob = model.config.attention_probs_dropout_prob = 0.1
        torch.manual_seed(0)
        fresh = transformers.BertForSequenceClassification(model.config)  # dropout modules read the config
        return adaptkit.adapt(fresh, "linear_probe")
    probe = CachedProbe(dropout_model())
    rng = torch.get_rng_state()
    with pytest.raises(errors.UnsupportedError, match=r"encoder_mode='match'.*train mode.*Fix: pass encoder_mode='eval'"):
        probe.cache(_examples(), _collate)
    assert torch.equal(rng, torch.get_rng_state())  # the check ran on a forked RNG
    features = CachedProbe(dropout_model(), encoder_mode="eval").cache(_examples(), _collate)
    assert len(features) == 12


def test_two_module_heads_are_refused():
    with pytest.raises(errors.UnsupportedError, match=r"2 top-level modules \['pre_classifier', 'classifier'\].*ReLU"):
        CachedProbe(_probe_model("distilbert"))


def test_heads_applied_before_pooling_are_refused():
    with pytest.raises(errors.UnsupportedError, match=r"does not reproduce the model's logits.*GPT-2.*end to end"):
        CachedProbe(_probe_model("gpt2")).cache(_examples(), _collate)


def test_tied_lm_heads_are_refused():
    with pytest.raises(errors.UnsupportedError, match=r"shares trained weights.*tied"):
        CachedProbe(adaptkit.adapt(tiny_model("gpt2", "causal_lm"), "linear_probe"))


def test_other_strategies_and_bad_modes_are_refused():
    with pytest.raises(errors.UnsupportedError, match=r"strategy='lora'.*only 'linear_probe'"):
        CachedProbe(adaptkit.adapt(tiny_model("bert"), "lora"))
    with pytest.raises(errors.NotAdaptedError, match=r"model='BertForSequenceClassification'.*linear_probe"):
        CachedProbe(tiny_model("bert"))
    with pytest.raises(errors.ConfigError, match=r"encoder_mode='train': must be one of"):
        CachedProbe(_probe_model(), encoder_mode="train")
