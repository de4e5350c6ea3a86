"""LinearProbe(pooling="mean"): the head reads the masked mean of the last hidden states."""

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
from adaptkit.strategies.linear_probe import MaskedMeanPool


def _batch(lengths=(3, 7), seed=0):
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, :n] = torch.randint(3, 99, (n,), generator=g)
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([i % 2 for i in range(len(lengths))])}


def test_head_reads_the_masked_mean_of_the_last_hidden_states():
    model = adaptkit.adapt(tiny_model("bert"), "linear_probe", pooling="mean").eval()
    batch = _batch()
    seen = []
    model.classifier.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    with torch.no_grad():
        hidden = model.bert(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        model(**batch)
    m = batch["attention_mask"].unsqueeze(-1).float()
    torch.testing.assert_close(seen[0], (hidden * m).sum(1) / m.sum(1), rtol=0, atol=1e-6)


def test_features_do_not_depend_on_the_padding_around_them():
    """Without the mask the mean would include pad positions: a short sentence's logits would change
    with the length of the longest sentence in its batch."""
    model = adaptkit.adapt(tiny_model("bert"), "linear_probe", pooling="mean").eval()
    padded = _batch(lengths=(3, 9))
    alone = {k: v[:1, :3] for k, v in padded.items() if k != "labels"}
    with torch.no_grad():
        torch.testing.assert_close(model(**alone).logits, model(**padded).logits[:1], rtol=0, atol=1e-5)
        positional = model.bert(padded["input_ids"], padded["attention_mask"]).pooler_output  # mask passed by position
        assert torch.allclose(positional, model.bert(**{k: padded[k] for k in ("input_ids", "attention_mask")})
                              .pooler_output)


def test_only_the_head_trains_and_the_folder_round_trips(tmp_path):
    model = adaptkit.adapt(tiny_model("bert"), "linear_probe", pooling="mean")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"classifier.weight", "classifier.bias"}
    assert not any(n.startswith("bert.pooler") for n, _ in model.named_parameters())  # replaced, not kept idle
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(**_batch()).loss.backward()
    opt.step()
    adaptkit.save(model, tmp_path / "probe")
    loaded = adaptkit.load(tmp_path / "probe", tiny_model("bert"))
    assert adaptkit.strategy_of(loaded).pooling == "mean"
    model.eval(), loaded.eval()
    with torch.no_grad():
        assert torch.equal(model(**_batch()).logits, loaded(**_batch()).logits)


def test_merge_is_refused_because_transformers_would_restore_the_cls_pooler():
    model = adaptkit.adapt(tiny_model("bert"), "linear_probe", pooling="mean")
    with pytest.raises(errors.NotMergeableError, match=r"LinearProbe.pooling='mean'.*would pool the first token"):
        adaptkit.merge(model)
    assert not adaptkit.strategy_of(model).mergeable and adaptkit.LinearProbe().mergeable


@pytest.mark.parametrize("family, task", [("roberta", "seq_cls"), ("distilbert", "seq_cls"), ("gpt2", "causal_lm")])
def test_models_without_a_pooler_are_refused_before_anything_changes(family, task):
    model = tiny_model(family, task)
    before = {n: p.clone() for n, p in model.state_dict().items()}
    with pytest.raises(errors.UnsupportedError,
                       match=r"LinearProbe.pooling='mean'.*has no pooler to replace.*pooling='head'"):
        adaptkit.adapt(model, "linear_probe", pooling="mean")
    assert adaptkit.strategy_of(model) is None and all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(before[n], p) for n, p in model.state_dict().items())


def test_unknown_pooling_names_the_choices():
    with pytest.raises(errors.ConfigError, match=r"LinearProbe.pooling='max'.*'head', 'mean'"):
        adaptkit.LinearProbe(pooling="max")


def test_feature_cache_stores_one_pooled_vector_per_example():
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    from feature_cache import CachedProbe  # the benchmark's speed-up lives with the benchmark (issue 27)
    model = adaptkit.adapt(tiny_model("bert"), "linear_probe", pooling="mean")
    probe = CachedProbe(model, encoder_mode="eval")
    examples = [{"input_ids": b["input_ids"][0, :n].tolist(), "attention_mask": [1] * n, "labels": 0}
                for n, b in ((n, _batch(lengths=(n,), seed=n)) for n in (2, 5, 3, 8))]

    def collate(rows):
        width = max(len(r["input_ids"]) for r in rows)
        return {"input_ids": torch.tensor([r["input_ids"] + [0] * (width - len(r["input_ids"])) for r in rows]),
                "attention_mask": torch.tensor([r["attention_mask"] + [0] * (width - len(r["input_ids"]))
                                                for r in rows]),
                "labels": torch.tensor([r["labels"] for r in rows])}

    features = probe.cache(examples, collate, batch_size=3)  # verifies head(cached) == model logits per batch
    assert features.head_inputs.shape == (4, model.config.hidden_size)


def test_check_reports_the_missing_pooler_from_the_config_alone():
    ok = adaptkit.check(tiny_model("bert"), "linear_probe", options={"pooling": "mean"}, raise_on_error=False)
    bad = adaptkit.check(tiny_model("roberta"), "linear_probe", options={"pooling": "mean"}, raise_on_error=False)
    assert not ok.problems
    assert [type(p) for p in bad.problems] == [errors.UnsupportedError] and "pooling='mean'" in str(bad.problems[0])


def _sentence_transformers_folder(tmp_path, family="bert", mean=True):
    """A checkpoint folder as sentence-transformers writes it: modules.json names a Pooling module."""
    folder = tmp_path / family
    tiny_model(family).save_pretrained(folder)
    (folder / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(
        {"pooling_mode_cls_token": not mean, "pooling_mode_mean_tokens": mean}))
    return folder


@pytest.mark.parametrize("mean", [True, False])
def test_auto_pooling_follows_the_checkpoints_sentence_transformers_config(tmp_path, mean):
    folder = _sentence_transformers_folder(tmp_path, mean=mean)
    model = adaptkit.adapt(transformers.AutoModelForSequenceClassification.from_pretrained(folder), "linear_probe")
    assert adaptkit.strategy_of(model).pooling == ("mean" if mean else "head")
    assert isinstance(model.bert.pooler, MaskedMeanPool) == mean
    adaptkit.save(model, tmp_path / "probe")  # the resolved choice is recorded, never "auto"
    saved = json.loads((tmp_path / "probe" / "adaptkit_config.json").read_text())
    assert json.dumps(saved).count('"pooling": "' + ("mean" if mean else "head") + '"') == 1


def test_auto_pooling_is_head_for_a_plain_transformers_checkpoint(tmp_path):
    tiny_model("bert").save_pretrained(tmp_path / "plain")
    model = adaptkit.adapt(transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "plain"),
                           "linear_probe")
    assert adaptkit.strategy_of(model).pooling == "head" and not isinstance(model.bert.pooler, MaskedMeanPool)


def test_auto_pooling_refuses_a_mean_checkpoint_it_cannot_pool_by_mean(tmp_path):
    folder = _sentence_transformers_folder(tmp_path, family="roberta")
    model = transformers.AutoModelForSequenceClassification.from_pretrained(folder)
    with pytest.raises(errors.UnsupportedError, match=r"pools by the mean.*Fix: pass pooling='head'"):
        adaptkit.adapt(model, "linear_probe")


@pytest.mark.e2e
def test_auto_pooling_is_mean_on_the_bundled_minilm(minilm_path):
    model = adaptkit.adapt(transformers.AutoModelForSequenceClassification.from_pretrained(minilm_path, num_labels=2),
                           "linear_probe")
    assert adaptkit.strategy_of(model).pooling == "mean"
