"""bf16 weights and bf16 autocast for every strategy, on tiny models built from config.

What a user relies on: with a bf16 base, the frozen weights stay bf16 (the memory saving), the
tensors that train are fp32 (adapters, new heads; adaptkit/precision.py says why), a training step
moves them, and save -> load reproduces the outputs exactly. ``full`` trains in the loaded dtype.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

import adaptkit
from adaptkit import strategies
from conftest import tiny_model
from test_recipes import classify_args, data_root, recipe  # noqa: F401  (fixtures; tiny_bert is in conftest)

STRATEGIES = ["lora", "bottleneck", "prefix", "linear_probe", "full", "ia3"]


def test_the_list_covers_every_registered_strategy():
    assert set(STRATEGIES) >= set(strategies.REGISTRY) - {"peft"}


def _batch(vocab=99, n=4, length=8):
    g = torch.Generator().manual_seed(1)
    return {"input_ids": torch.randint(3, vocab, (n, length), generator=g),
            "attention_mask": torch.ones(n, length, dtype=torch.long), "labels": torch.tensor([0, 1, 0, 1])}


def _step(model, batch, lr=1e-2):
    trainable = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in trainable]
    optimizer = torch.optim.AdamW(trainable, lr=lr)
    for _ in range(2):  # two steps: a zero-initialised up projection gives its down projection no gradient at first
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return loss, [not torch.equal(b, p.detach()) for b, p in zip(before, trainable)]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_bf16_weights_train_with_fp32_adapters_and_heads(strategy, tmp_path):
    base = tiny_model("bert").to(torch.bfloat16)
    model = adaptkit.adapt(copy.deepcopy(base), strategy)
    trainable = {n: p.dtype for n, p in model.named_parameters() if p.requires_grad}
    # the backbone stays bf16 (the memory saving); PEFT's frozen original of the head was upcast with it
    frozen = {p.dtype for n, p in model.named_parameters() if not p.requires_grad and "classifier" not in n}
    if strategy == "full":  # pure bf16: upcasting every weight would undo the bf16 load
        assert set(trainable.values()) == {torch.bfloat16}
    else:
        assert set(trainable.values()) == {torch.float32}, trainable
        assert frozen == {torch.bfloat16}
        assert any("classifier" in n for n in trainable)  # the new head trains, in fp32
    loss, moved = _step(model, _batch())
    assert torch.isfinite(loss) and all(moved)
    model.eval()
    with torch.no_grad():
        expected = model(**_batch()).logits
    adaptkit.save(model, tmp_path / "a")
    again = adaptkit.load(tmp_path / "a", copy.deepcopy(base)).eval()
    with torch.no_grad():
        assert torch.equal(again(**_batch()).logits, expected)


def test_a_head_tied_to_the_input_embedding_stays_in_the_base_dtype():
    # GPT-2's lm_head is the token embedding: an fp32 copy would feed fp32 activations into bf16 layers
    model = adaptkit.adapt(tiny_model("gpt2", "causal_lm").to(torch.bfloat16), "linear_probe")
    assert model.lm_head.weight is model.transformer.wte.weight
    assert model.lm_head.weight.dtype == torch.bfloat16 and model.lm_head.weight.requires_grad
    ids = _batch()["input_ids"]
    loss, moved = _step(model, {"input_ids": ids, "labels": ids})
    assert torch.isfinite(loss) and all(moved)


def test_an_untied_lm_head_that_trains_is_upcast():
    model = tiny_model("llama", "causal_lm")
    model.config.tie_word_embeddings = False
    model = adaptkit.adapt(model.to(torch.bfloat16), "linear_probe")
    assert model.lm_head.weight.dtype == torch.float32
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    ids = _batch()["input_ids"]
    out = model(input_ids=ids, labels=ids)
    assert out.logits.dtype == torch.float32 and torch.isfinite(out.loss)


@pytest.mark.parametrize("strategy", ["lora", "bottleneck", "full"])
def test_bf16_autocast_step_through_accelerate(strategy):  # conftest gives it a fresh Accelerate state
    from accelerate import Accelerator
    accelerator = Accelerator(cpu=True, mixed_precision="bf16")
    model = adaptkit.adapt(tiny_model("bert"), strategy)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    seen = []
    inner = next(m for n, m in model.named_modules() if n.endswith("layer.0.intermediate"))
    inner.register_forward_hook(lambda m, a, out: seen.append(out.dtype))
    model, optimizer = accelerator.prepare(model, optimizer)
    out = model(**_batch())
    assert seen == [torch.bfloat16]  # autocast really ran the backbone's matmuls in bf16
    assert out.logits.dtype == torch.float32  # Accelerate hands back fp32 outputs
    accelerator.backward(out.loss)
    optimizer.step()
    # master weights stay fp32 under autocast
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}


def test_classify_recipe_with_bf16_weights_and_autocast(tmp_path, data_root, tiny_bert):
    out = tmp_path / "bf16"
    metrics = recipe("classify").main(classify_args(data_root, tiny_bert, out, "--max-steps", "4", "--checkpoint-every",
                                                    "0", "--dtype", "bfloat16", "--mixed-precision", "bf16"))
    assert metrics["mixed_precision"] == "bf16"
    assert metrics["config"]["dtype"] == "bfloat16"
    saved = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORA"
    assert 0.0 <= metrics["test"]["accuracy"] <= 1.0


def test_a_second_in_process_run_does_not_inherit_the_first_runs_bf16(tmp_path, data_root, tiny_bert, monkeypatch):
    # Accelerate keeps one state per process: without the check, a run that asked for no precision trained
    # silently under the earlier run's bf16 autocast. It is refused before anything is written.
    from adaptkit.errors import ConfigError
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    first = recipe("classify").main(classify_args(data_root, tiny_bert, tmp_path / "bf16", "--max-steps", "2",
                                                  "--checkpoint-every", "0", "--mixed-precision", "bf16"))
    assert first["mixed_precision"] == "bf16"
    for extra in ([], ["--mixed-precision", "no"]):
        out = tmp_path / f"second{len(extra)}"
        with pytest.raises(ConfigError, match=r"--mixed-precision.*'no'.*'bf16'.*own process"):
            recipe("classify").main(classify_args(data_root, tiny_bert, out, "--max-steps", "2",
                                                  "--checkpoint-every", "0", *extra))
        assert not out.exists()
    # the same precision again is fine: nothing changes
    again = recipe("classify").main(classify_args(data_root, tiny_bert, tmp_path / "again", "--max-steps", "2",
                                                  "--checkpoint-every", "0", "--mixed-precision", "bf16"))
    assert again["mixed_precision"] == "bf16"
