"""The linear-probe feature cache (benchmarks/feature_cache.py, the benchmark's speed-up): same training as the
end-to-end probe, or a typed refusal saying why; and the classify recipe run through it, as the benchmark does."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import transformers
from conftest import tiny_model

import adaptkit
from adaptkit import errors

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))
import feature_cache  # noqa: E402
import run  # noqa: E402
from feature_cache import CachedProbe  # noqa: E402


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


# ---- the classify recipe through the cache, as benchmarks/run.py runs it --------------------------------
@pytest.fixture
def tiny_bert(tmp_path, minilm_path) -> Path:
    """A 2-layer, 32-wide BERT (random weights, dropout on) with all-MiniLM-L6-v2's tokenizer, on disk."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_path)
    config = transformers.BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=64)
    folder = tmp_path / "tiny-bert"
    torch.manual_seed(0)
    transformers.BertForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_the_cache_left_the_recipe_and_the_benchmark_runs_the_recipe_through_it(tmp_path, data_dir, tiny_bert):
    classify = (BENCH.parent / "recipes" / "classify.py").read_text()
    assert "feature_cache" not in classify and "CachedProbe" not in classify  # issue 27: the benchmark's speed-up cost 23 lines in the recipe
    argv = lambda out: ["--data", str(data_dir / "sst2"), "--model", str(tiny_bert), "--output-dir", str(out),  # noqa
                        "--max-train-samples", "96", "--max-eval-samples", "48", "--batch-size", "8",
                        "--strategy", "linear_probe", "--epochs", "2"]
    # the tiny BERT has dropout on: train-mode features differ, so "match" trains end to end and says why
    auto = feature_cache.main(["--feature-cache", "match", *argv(tmp_path / "auto")])
    assert auto["feature_cache"]["used"] is False and "dropout" in auto["feature_cache"]["reason"]
    # "eval" asks for the fixed (eval-mode) feature map: the encoder runs once per example
    cached = feature_cache.main(["--feature-cache", "eval", *argv(tmp_path / "eval")])
    assert cached["feature_cache"]["used"] is True and cached["steps"] == 24
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["feature_cache"]["cached_examples"] == 96 + 48
    assert set(adaptkit.load(tmp_path / "eval" / "adapter", transformers.AutoModelForSequenceClassification
                             .from_pretrained(tiny_bert)).state_dict()) >= {"classifier.weight"}


def test_benchmark_commands_pass_the_protocol_flag_and_run_probes_through_the_cache(tmp_path):
    # issue 29 #4: the benchmark's protocol (select on a carve from train, test on dev) is a flag it passes
    experiments = run.load_experiments(BENCH / "experiments")
    probe = next(e for e in experiments if e["strategy"] == "linear_probe")
    lora = next(e for e in experiments if e["strategy"] == "lora")
    for exp in (probe, lora):
        cmd = run.command({"experiment": exp, "learning_rate": 1e-3, "seed": 1}, Path("/d"), tmp_path, "py",
                          Path("classify.py"), smoke=False)
        assert "--select-on-train-carve" in cmd and cmd[cmd.index("--data") + 1].endswith("train.tsv")
        wrapped = cmd[1] == str(BENCH / "feature_cache.py")
        assert wrapped is (exp is probe) and (cmd[2:4] == ["--recipe", "classify.py"] if wrapped else cmd[1] == "classify.py")
        assert ("--feature-cache" in cmd) is (exp is probe)
