"""The recipes end to end, on tiny models and small slices of the real data, as users run them.

What users rely on is checked: the fields of metrics.json, that the saved adapter reloads and scores
what metrics.json says, that an interrupted run resumed with --resume ends with exactly the weights
of an uninterrupted one, and that `accelerate launch` with 2 processes works. Most runs call a
recipe's ``main(argv)`` in this process (seconds); one test goes through `accelerate launch`.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

import adaptkit
from adaptkit.folders import write_json
from adaptkit.recipes import batching, checkpoints, data, runs, sources, training
from adaptkit.errors import BaseMismatchError, ConfigError, DataError

ROOT = Path(__file__).resolve().parents[1]
METRIC_FIELDS = {"task", "test", "validation", "metric", "best_step", "steps", "trainable_parameters",
                 "total_parameters", "trainable_percent", "peak_rss_bytes", "train_seconds", "samples_per_second",
                 "train_samples", "num_processes", "adapter_dir", "strategy", "config", "versions",
                 "constant_predictions", "warnings"}


def recipe(name: str):
    spec = importlib.util.spec_from_file_location(f"recipe_{name}", ROOT / "recipes" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def data_root() -> Path:
    path = os.environ.get("ADAPTKIT_DATA")
    if not path or not Path(path, "sst2", "train.tsv").is_file():
        pytest.skip("ADAPTKIT_DATA does not point at a folder holding sst2/train.tsv")
    return Path(path)


def classify_args(data_root: Path, model: Path, out: Path, *extra: str, task: str = "sst2") -> list[str]:
    return ["--data", str(data_root / task), "--model", str(model), "--output-dir", str(out),
            "--max-train-samples", "96", "--max-eval-samples", "48", "--batch-size", "8", *extra]


def adapter_tensors(out: Path) -> dict[str, torch.Tensor]:
    # PEFT strategies write adapter_model.safetensors, native ones model.safetensors
    peft = out / "adapter" / "adapter_model.safetensors"
    return load_file(str(peft if peft.is_file() else out / "adapter" / "model.safetensors"))


# ---- classify ----------------------------------------------------------------------------------------
def test_classify_writes_metrics_and_a_reloadable_adapter(tmp_path, data_root, tiny_bert):
    out = tmp_path / "run"
    metrics = recipe("classify").main(classify_args(data_root, tiny_bert, out, "--epochs", "2",
                                                    "--checkpoint-every", "5"))
    on_disk = json.loads((out / "metrics.json").read_text())
    assert METRIC_FIELDS <= set(on_disk) and on_disk["steps"] == metrics["steps"] == 24
    assert set(on_disk["test"]) == {"accuracy", "predicted_classes"} and 0.0 <= on_disk["test"]["accuracy"] <= 1.0
    assert on_disk["test"]["predicted_classes"] in (1.0, 2.0)  # 1: every example got one class (named, not refused)
    assert on_disk["trainable_parameters"] < on_disk["total_parameters"] and on_disk["train_samples"] == 192
    assert on_disk["peak_rss_bytes"] > 100e6 and on_disk["samples_per_second"] > 0
    assert on_disk["strategy"]["strategy"] == "lora" and on_disk["num_processes"] == 1
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "validation/accuracy" in r] == [12, 24]  # once per epoch
    assert any("loss" in r for r in records) and (out / "checkpoints").is_dir()
    card = (out / "adapter" / "README.md").read_text()  # the model card names the data and the results
    assert f"Data: {data_root / 'sst2'}: 192 training samples, 24 optimizer steps" in card
    assert f"| test/accuracy | {on_disk['test']['accuracy']:.4f} |" in card

    # the adapter reloads onto a fresh base and scores exactly what metrics.json says
    import transformers
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_bert)
    base = transformers.AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2)
    model = adaptkit.load(out / "adapter", base).eval()
    test = sources.load_splits(data_root / "sst2", max_eval=48, seed=42).test  # --max-eval-samples 48
    loader = batching.make_dataloader(batching.tokenize(test, tokenizer), tokenizer, batch_size=16)
    with torch.no_grad():
        predictions = torch.cat([model(**{k: v for k, v in b.items() if k != "labels"}).logits.argmax(-1)
                                 for b in loader])
    assert predictions.eq(torch.tensor(test.labels)).float().mean().item() == pytest.approx(on_disk["test"]["accuracy"])


def test_train_seconds_never_fall_back_across_epochs(tmp_path, data_root, tiny_bert):
    # evaluations at steps 5 and 10 of a 12-step epoch: steps 11-12 run after the last pause and must still count
    out = tmp_path / "run"
    metrics = recipe("classify").main(classify_args(data_root, tiny_bert, out, "--epochs", "2", "--eval-every", "5",
                                                    "--log-every", "1", "--checkpoint-every", "0", "--patience", "0"))
    seconds = [json.loads(line)["train_seconds"] for line in (out / "log.jsonl").read_text().splitlines()
               if "train_seconds" in json.loads(line)]
    assert len(seconds) == 24 and seconds == sorted(seconds) and metrics["train_seconds"] >= seconds[-1]


def test_linear_probe_trains_the_head_alone_and_reloads(tmp_path, data_root, tiny_bert):
    metrics = recipe("classify").main(classify_args(data_root, tiny_bert, tmp_path / "probe", "--strategy",
                                                    "linear_probe", "--epochs", "1"))
    assert metrics["steps"] == 12 and "accuracy" in metrics["test"]
    assert set(adapter_tensors(tmp_path / "probe")) == {"classifier.weight", "classifier.bias"}
    assert adaptkit.strategy_of(adaptkit.load(tmp_path / "probe" / "adapter", _fresh(tiny_bert, 2))).name == "linear_probe"


def test_classify_regression_on_sentence_pairs_with_full_fine_tuning(tmp_path, data_root, tiny_bert):
    metrics = recipe("classify").main(classify_args(data_root, tiny_bert, tmp_path / "stsb", "--strategy", "full",
                                                    "--max-steps", "6", "--eval-every", "3", "--select-on-train-carve",
                                                    task="stsb"))  # GLUE: dev is scored as the test set
    assert metrics["task"] == "stsb" and metrics["metric"] == "combined"
    assert {"pearson", "spearmanr", "combined"} <= set(metrics["test"])
    assert metrics["trainable_parameters"] == metrics["total_parameters"]
    assert adaptkit.strategy_of(adaptkit.load(tmp_path / "stsb" / "adapter", _fresh(tiny_bert, 1))).name == "full"


def _fresh(path: Path, num_labels: int):
    import transformers
    return transformers.AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels)


def test_classify_trains_lora_on_an_8bit_base(tmp_path, data_root, tiny_bert):
    pytest.importorskip("bitsandbytes")
    out = tmp_path / "8bit"
    metrics = recipe("classify").main(classify_args(data_root, tiny_bert, out, "--quantization", "8bit",
                                                    "--max-steps", "4", "--eval-every", "2"))
    assert metrics["quantization"] == "8bit" and metrics["steps"] == 4 and "accuracy" in metrics["test"]
    assert adaptkit.strategy_of(adaptkit.load(out / "adapter", _fresh(tiny_bert, 2))).name == "lora"


class _Interrupt(Exception):
    pass


def run_interrupted_and_resumed(main, argv_for, tmp_path: Path, monkeypatch, stop_at: int) -> None:
    """Run ``whole`` uninterrupted; run ``cut`` until the checkpoint at ``stop_at``, kill it, --resume it."""
    main(argv_for(tmp_path / "whole"))
    checkpoint = checkpoints.checkpoint

    def interrupted(accelerator, args, progress):  # dies right after writing the checkpoint
        path = checkpoint(accelerator, args, progress)
        if progress.step == stop_at:
            raise _Interrupt
        return path

    monkeypatch.setattr(checkpoints, "checkpoint", interrupted)
    with pytest.raises(_Interrupt):
        main(argv_for(tmp_path / "cut"))
    monkeypatch.setattr(checkpoints, "checkpoint", checkpoint)
    latest = checkpoints.latest_checkpoint(tmp_path / "cut")
    assert latest.name == f"step-{stop_at:07d}"
    # the checkpoint holds what trains (here: adapter + head, as many values as the saved adapter), not the model
    in_checkpoint = load_file(str(latest / "model.safetensors"))
    assert sum(t.numel() for t in in_checkpoint.values()) == sum(t.numel() for t in adapter_tensors(tmp_path / "whole").values())
    main([*argv_for(tmp_path / "cut"), "--resume"])
    whole, resumed = adapter_tensors(tmp_path / "whole"), adapter_tensors(tmp_path / "cut")
    assert whole.keys() == resumed.keys()
    for name in whole:
        assert torch.equal(whole[name], resumed[name]), name
    a, b = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("whole", "cut"))
    assert a["validation"] == b["validation"] and a["train_samples"] == b["train_samples"]
    assert a.get("test") == b.get("test") and a["steps"] == b["steps"]


@pytest.mark.parametrize("strategy, extra", [("lora", []), ("bottleneck", ["--gradient-accumulation-steps", "2"])])
def test_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(tmp_path, data_root, tiny_bert, monkeypatch,
                                                                   strategy, extra):
    # evaluate only at the end, so the saved adapter is the final weights; dropout is on (RNG matters);
    # step 8 is mid-epoch (12 batches per epoch), so the resumed run must skip exactly the batches seen
    argv = ["--strategy", strategy, "--max-steps", "14", "--eval-every", "14", "--checkpoint-every", "4", *extra]
    run_interrupted_and_resumed(recipe("classify").main, lambda out: classify_args(data_root, tiny_bert, out, *argv),
                                tmp_path, monkeypatch, stop_at=8)


def test_resume_refuses_changed_flags_and_missing_checkpoints(tmp_path, data_root, tiny_bert):
    classify = recipe("classify")
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match=r"--resume=.*no complete checkpoint"):
        classify.main(classify_args(data_root, tiny_bert, out, "--max-steps", "2", "--resume"))
    classify.main(classify_args(data_root, tiny_bert, out, "--max-steps", "4", "--checkpoint-every", "2"))
    with pytest.raises(ConfigError, match=r"learning_rate.*differ from the interrupted run"):
        classify.main(classify_args(data_root, tiny_bert, out, "--max-steps", "4", "--checkpoint-every", "2",
                                    "--learning-rate", "0.1", "--resume"))
    with pytest.raises(ConfigError, match=r"--output-dir=.*already holds a run.*--resume.*--overwrite"):
        classify.main(classify_args(data_root, tiny_bert, out, "--max-steps", "4"))
    with pytest.raises(ConfigError, match=r"--overwrite=True: contradicts --resume"):
        classify.main(classify_args(data_root, tiny_bert, out, "--max-steps", "4", "--resume", "--overwrite"))


def test_early_stopping_stops_when_validation_stops_improving(tmp_path, data_root, tiny_bert):
    # a learning rate this small leaves every prediction unchanged: the 2nd evaluation is no better
    metrics = recipe("classify").main(classify_args(data_root, tiny_bert, tmp_path / "es", "--learning-rate", "1e-12",
                                                    "--eval-every", "1", "--patience", "1", "--max-steps", "50"))
    assert metrics["stopped_early"] and metrics["steps"] == 2 and metrics["best_step"] == 1


def test_classify_refuses_bad_flags(tmp_path, data_root, tiny_bert):
    classify = recipe("classify")
    with pytest.raises(ConfigError, match=r"--option='r16': is not KEY=VALUE"):
        classify.main(classify_args(data_root, tiny_bert, tmp_path / "a", "--option", "r16"))
    with pytest.raises(ConfigError, match=r"LoRA options=\['rank'\].*did you mean 'r'"):
        classify.main(classify_args(data_root, tiny_bert, tmp_path / "b", "--option", "rank=4"))
    with pytest.raises(ConfigError, match=r"--epochs=0: must be at least 1"):
        classify.main(classify_args(data_root, tiny_bert, tmp_path / "e", "--epochs", "0"))
    with pytest.raises(ConfigError, match=r"--patience=-1: must be at least 0. Fix: pass an integer >= 0"):
        classify.main(classify_args(data_root, tiny_bert, tmp_path / "f", "--patience", "-1"))
    with pytest.raises(ConfigError, match=r"--warmup-ratio=1.5: must be in \[0, 1\)"):
        classify.main(classify_args(data_root, tiny_bert, tmp_path / "c", "--warmup-ratio", "1.5"))
    with pytest.raises(ConfigError, match=r"--metrics='sst2'.*scores \(regression\)"):
        classify.main(classify_args(data_root, tiny_bert, tmp_path / "d", "--metrics", "sst2", task="stsb"))
    with pytest.raises(DataError, match=r"no such file or folder"):
        classify.main(["--data", str(tmp_path / "missing.tsv"), "--model", str(tiny_bert)])


def test_classify_trains_a_model_built_from_a_config_alone(tmp_path, data_root, tiny_bert):
    classify = recipe("classify")
    argv = ["--data", str(data_root / "sst2"), "--config-name", str(tiny_bert), "--tokenizer-name", str(tiny_bert),
            "--max-train-samples", "64", "--max-eval-samples", "32", "--batch-size", "8", "--max-steps", "3"]
    metrics = classify.main([*argv, "--output-dir", str(tmp_path / "scratch"), "--strategy", "lora"])
    assert metrics["config"]["model"] is None and "accuracy" in metrics["test"]
    # the adapter names its base as what it is, the config plus the seed, not the config folder's (absent) weights
    saved = json.loads((tmp_path / "scratch" / "adapter" / "adaptkit_config.json").read_text())
    assert saved["base_model"] == f"{tiny_bert.resolve()} (random weights: from_config after torch.manual_seed(42))"
    # random weights, seeded: a second build is the same model, so the saved LoRA adapter scores the same again
    again = classify.main([*argv, "--output-dir", str(tmp_path / "again"), "--strategy", "lora"])
    assert again["test"] == metrics["test"]
    # the seed is in the folder, so a base built with another seed is refused, naming the one that rebuilds it
    import transformers
    config = transformers.AutoConfig.from_pretrained(tiny_bert, num_labels=2)
    transformers.set_seed(7)
    with pytest.raises(BaseMismatchError, match=r"Fix: build the base as it was: transformers.set_seed\(42\)"):
        other = transformers.AutoModelForSequenceClassification.from_config(config)
        adaptkit.load(tmp_path / "scratch" / "adapter", other)
    with pytest.raises(ConfigError, match=r"--quantization='8bit': a model built from --config-name alone"):
        classify.main([*argv, "--output-dir", str(tmp_path / "q"), "--quantization", "8bit"])


# ---- causal_lm -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_gpt(tmp_path_factory, data_root) -> dict[str, Path]:
    """A 2-layer GPT-2 with a word-level tokenizer that has an eos and NO pad token, plus SST-2 turned
    into plain text (.txt) and into prompt/response pairs (review -> positive/negative)."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    table = data.read_table(data_root / "sst2" / "train.tsv")
    sentences = [t[0] for t in table.texts]
    folder = tmp_path_factory.mktemp("tiny-gpt")
    words = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    # "=>" marks where the answer starts (a token of its own, in the vocabulary)
    words.train_from_iterator(sentences + ["=>"] * 5,
                              trainers.WordLevelTrainer(special_tokens=["[UNK]", "</s>"], vocab_size=4000))
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=words, eos_token="</s>", unk_token="[UNK]")
    tokenizer.save_pretrained(folder / "model")
    config = transformers.GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=4, n_positions=128,
                                     bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(config).save_pretrained(folder / "model")
    pairs = folder / "pairs"
    pairs.mkdir()
    with open(pairs / "train.jsonl", "w") as f:
        for (sentence,), label in list(zip(table.texts, table.labels))[:400]:
            f.write(json.dumps({"prompt": f"{sentence} =>", "response": ["negative", "positive"][label]}) + "\n")
    text = folder / "text"
    text.mkdir()
    (text / "train.txt").write_text("\n".join(sentences[:160]) + "\n")
    (text / "test.txt").write_text("\n".join(sentences[160:200]) + "\n")
    return {"model": folder / "model", "pairs": pairs, "text": text}


def test_causal_lm_trains_on_the_response_only_and_learns_to_stop(tmp_path, tiny_gpt):
    causal_lm = recipe("causal_lm")
    metrics = causal_lm.main(["--model", str(tiny_gpt["model"]), "--data", str(tiny_gpt["pairs"]), "--strategy", "full",
                              "--output-dir", str(tmp_path / "run"), "--epochs", "3", "--batch-size", "16",
                              "--learning-rate", "1e-2", "--num-samples", "4"])
    assert metrics["format"] == "prompt_response" and metrics["metric"] == "perplexity"
    # 40 validation pairs, each scored on its 1-word answer + eos only (the prompt is masked)
    assert metrics["validation"]["num_tokens"] == 80 and metrics["validation"]["perplexity"] < 2.0
    for sample in metrics["samples"]:  # pad == eos here, yet the eos was trained on: answers end
        assert sample["stopped"] and sample["generated"] in ("positive", "negative"), sample


def test_causal_lm_labels_keep_the_eos_when_pad_is_eos(tiny_gpt):
    causal_lm = recipe("causal_lm")
    import transformers
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_gpt["model"])
    assert tokenizer.pad_token is None
    eos = tokenizer.eos_token_id
    short = batching.encode({"prompt": "a fine film :", "response": "positive"}, tokenizer, 64)
    long = batching.encode({"text": "a fine film with a great cast"}, tokenizer, 64)
    tokenizer.pad_token = tokenizer.eos_token  # as the recipe does
    batch = batching.causal_lm_loader([short, long], 2, tokenizer, shuffle=False).collate_fn([short, long])
    assert batch["labels"][0].tolist()[:6] == [-100, -100, -100, -100, tokenizer.convert_tokens_to_ids("positive"),
                                               eos]
    assert batch["labels"][0, 6:].eq(-100).all() and batch["input_ids"][0, 6:].eq(eos).all()  # padding only
    assert batch["attention_mask"][0].tolist() == [1] * 6 + [0] * 2
    assert batch["labels"][1].tolist() == batch["input_ids"][1].tolist() and batch["labels"][1, -1] == eos


CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} \n{% endfor %}"
                 "{% if add_generation_prompt %}assistant :{% endif %}")


def test_causal_lm_masks_alpaca_and_chat_prompts_and_packs_blocks(tiny_gpt):
    causal_lm = recipe("causal_lm")
    import transformers
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_gpt["model"])
    eos, word = tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids
    alpaca = batching.encode({"instruction": "rate it", "input": "a fine film", "output": "positive"}, tokenizer, 0)
    assert alpaca["labels"][-2:] == [word("positive"), eos] and set(alpaca["labels"][:-2]) == {-100}
    tokenizer.chat_template = CHAT_TEMPLATE
    chat = [{"role": "user", "content": "a fine film"}, {"role": "assistant", "content": "positive"},
            {"role": "user", "content": "a dull film"}, {"role": "assistant", "content": "negative"}]
    encoded = batching.encode({"messages": chat}, tokenizer, 0)
    trained = [t for t, label in zip(encoded["input_ids"], encoded["labels"]) if label != -100]
    # only the assistant's words (and what its template line puts after them) are trained on, the eos too
    assert word("positive") in trained and word("negative") in trained and word("fine") not in trained
    assert encoded["labels"][-1] == eos and word("dull") not in trained
    notes = []
    blocks = batching.pack([alpaca, encoded, alpaca], 8, notes)
    labels = alpaca["labels"] + encoded["labels"] + alpaca["labels"]
    whole = [labels[i:i + 8] for i in range(0, len(labels) - 7, 8)]
    assert all(len(b["input_ids"]) == len(b["labels"]) == 8 for b in blocks)
    # blocks of prompt only (no labelled token: a NaN loss) are dropped, the rest kept in order
    assert [b["labels"] for b in blocks] == [w for w in whole if set(w) != {-100}] and len(blocks) < len(whole)
    assert f"{len(whole) - len(blocks)} blocks held prompt tokens only, dropped" in notes[0]


def test_causal_lm_trains_on_packed_chats(tmp_path, tiny_gpt):
    import transformers
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_gpt["model"])
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(tmp_path / "model")
    shutil.copy(tiny_gpt["model"] / "config.json", tmp_path / "model")
    shutil.copy(tiny_gpt["model"] / "model.safetensors", tmp_path / "model")
    rows = [json.loads(line) for line in (tiny_gpt["pairs"] / "train.jsonl").read_text().splitlines()[:60]]
    with open(tmp_path / "chats.jsonl", "w") as f:
        for row in rows:
            f.write(json.dumps({"messages": [{"role": "user", "content": row["prompt"]},
                                             {"role": "assistant", "content": row["response"]}]}) + "\n")
    metrics = recipe("causal_lm").main(["--model", str(tmp_path / "model"), "--data", str(tmp_path / "chats.jsonl"),
                                        "--output-dir", str(tmp_path / "run"), "--block-size", "32", "--max-steps",
                                        "4", "--batch-size", "4", "--num-samples", "1", "--max-new-tokens", "3"])
    assert metrics["format"] == "messages" and metrics["block_size"] == 32 and metrics["steps"] == 4
    assert math.isfinite(metrics["validation"]["perplexity"]) and metrics["samples"][0]["prompt"].endswith("=>")


def test_causal_lm_on_plain_text_reports_test_perplexity_and_reloads(tmp_path, tiny_gpt):
    out = tmp_path / "text"
    metrics = recipe("causal_lm").main(["--model", str(tiny_gpt["model"]), "--data", str(tiny_gpt["text"]),
                                        "--output-dir", str(out), "--max-steps", "6", "--batch-size", "8",
                                        "--num-samples", "1", "--max-new-tokens", "5"])
    assert metrics["format"] == "text" and METRIC_FIELDS <= set(metrics)
    assert {"perplexity", "loss", "num_tokens"} == set(metrics["test"]) and math.isfinite(metrics["test"]["perplexity"])
    import transformers
    model = adaptkit.load(out / "adapter", transformers.AutoModelForCausalLM.from_pretrained(tiny_gpt["model"]))
    assert adaptkit.strategy_of(model).name == "lora"


def test_causal_lm_refuses_mixed_formats(tmp_path, tiny_gpt):
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text('{"text": "a"}\n{"prompt": "b", "response": "c"}\n')
    with pytest.raises(DataError, match=r"mixes two formats"):
        recipe("causal_lm").main(["--model", str(tiny_gpt["model"]), "--data", str(mixed)])
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "a"}\n{"text": \n')
    with pytest.raises(DataError, match=r"broken.jsonl, record 2.*not valid JSON"):
        recipe("causal_lm").main(["--model", str(tiny_gpt["model"]), "--data", str(broken)])


# ---- image_classify ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> dict[str, Path]:
    """scikit-learn's bundled 8x8 digits as PNG class folders (train/ + test/), and a tiny ViT from config."""
    import numpy as np
    import transformers
    from PIL import Image
    from sklearn.datasets import load_digits
    folder = tmp_path_factory.mktemp("digits")
    bunch = load_digits()
    for i, (image, label) in enumerate(zip(bunch.images[:600], bunch.target[:600])):
        target = folder / "data" / ("train" if i < 500 else "test") / str(label)
        target.mkdir(parents=True, exist_ok=True)
        Image.fromarray((image * 255 / 16).astype(np.uint8), mode="L").save(target / f"{i}.png")
    config = transformers.ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, intermediate_size=128)
    torch.manual_seed(0)
    transformers.ViTModel(config, add_pooling_layer=False).save_pretrained(folder / "vit")
    transformers.ViTImageProcessor(size={"height": 16, "width": 16}).save_pretrained(folder / "vit")
    return {"data": folder / "data", "model": folder / "vit"}


def image_args(digits: dict, out: Path, *extra: str) -> list[str]:
    return ["--model", str(digits["model"]), "--data", str(digits["data"]), "--output-dir", str(out),
            "--batch-size", "16", *extra]


def test_image_classify_on_digits(tmp_path, digits):
    out = tmp_path / "run"
    metrics = recipe("image_classify").main(image_args(digits, out, "--strategy", "full", "--epochs", "5",
                                                       "--learning-rate", "1e-3"))
    assert METRIC_FIELDS <= set(metrics) and metrics["classes"] == [str(d) for d in range(10)]
    assert set(metrics["test"]) == {"accuracy", "macro_f1", "predicted_classes"} and metrics["steps"] == 5 * 29  # 450/16
    assert metrics["test"]["accuracy"] > 0.25  # 10 classes: chance is 0.1 (0.43 measured)
    import transformers
    base = transformers.AutoModelForImageClassification.from_pretrained(digits["model"], num_labels=10)
    assert adaptkit.strategy_of(adaptkit.load(out / "adapter", base)).name == "full"


def test_image_classify_resumes_exactly(tmp_path, digits, monkeypatch):
    argv = ["--strategy", "lora", "--max-steps", "9", "--eval-every", "9", "--checkpoint-every", "3",
            "--max-train-samples", "96", "--max-eval-samples", "32"]
    run_interrupted_and_resumed(recipe("image_classify").main, lambda out: image_args(digits, out, *argv),
                                tmp_path, monkeypatch, stop_at=3)


def test_image_classify_refuses_a_folder_without_classes(tmp_path, digits):
    (tmp_path / "flat").mkdir()
    with pytest.raises(DataError, match=r"the folder has no train file.*image class folders"):
        recipe("image_classify").main(["--model", str(digits["model"]), "--data", str(tmp_path / "flat")])
    shutil.copytree(digits["data"] / "train" / "3", tmp_path / "one" / "3")
    with pytest.raises(DataError, match=r"one\[train\]=\['image'\]: the train split has no labels.*2\+ class sub-folders"):
        recipe("image_classify").main(["--model", str(digits["model"]), "--data", str(tmp_path / "one")])


# ---- the run machinery -------------------------------------------------------------------------------
def test_options_are_read_with_the_flags_and_a_malformed_one_is_refused_there(tmp_path):
    def parse(*options):
        argv = ["--output-dir", str(tmp_path / "out"), *(f for o in options for f in ("--option", o))]
        return training.RunArgs.parse(training.run_parser(None).parse_args(argv), "classify")

    assert parse("r=16", "targets=query,value", "use_dora=true", "init=gaussian", 'heads=["classifier"]').options \
        == {"r": 16, "targets": ["query", "value"], "use_dora": True, "init": "gaussian", "heads": ["classifier"]}
    with pytest.raises(ConfigError, match=r"--option='r': is not KEY=VALUE"):  # before any model loads
        parse("alpha=32", "r")


def test_early_stopping_treats_nan_as_no_improvement():
    def evaluations(patience: int, higher_is_better: bool, values: list[float]):
        progress = runs.Progress(SimpleNamespace(patience=patience), None, 10, 10, metric=("score", higher_is_better))
        improved = []
        for progress.step, value in enumerate(values, start=1):
            improved.append(progress.improved({"score": value}))
        return progress, improved

    stop, improved = evaluations(2, True, [math.nan, 0.5, 0.5])
    assert improved == [False, True, False] and not stop.should_stop and stop.best_step == 2
    stop, improved = evaluations(2, True, [math.nan, 0.5, 0.5, math.nan])
    assert improved[-1] is False and stop.should_stop and (stop.best, stop.best_step) == (0.5, 2)
    assert stop.best_metrics == {"score": 0.5} and math.isnan(stop.last_metrics["score"])
    restored = runs.Progress(SimpleNamespace(patience=2), None, 10, 10, metric=("score", True))
    restored.load_state_dict(json.loads(json.dumps(stop.state_dict())))  # a checkpoint's run_state.json
    assert restored.should_stop and (restored.best, restored.best_step, restored.bad_evals) == (0.5, 2, 2)
    lower, improved = evaluations(0, False, [3.0, 2.0, 2.5])
    assert improved == [True, True, False] and not lower.should_stop


def test_latest_checkpoint_skips_incomplete_folders(tmp_path):
    for name, complete in [("step-0000004", True), ("step-0000012", True), ("step-0000016", False),
                           (".tmp-step-0000020", True)]:
        folder = tmp_path / "checkpoints" / name
        folder.mkdir(parents=True)
        if complete:
            (folder / training.RUN_STATE).write_text("{}")
    assert checkpoints.latest_checkpoint(tmp_path).name == "step-0000012"
    assert checkpoints.latest_checkpoint(tmp_path / "nothing") is None


def test_write_json_replaces_atomically(tmp_path):
    path = tmp_path / "metrics.json"
    write_json(path, {"a": 1})
    write_json(path, {"a": 2})
    assert json.loads(path.read_text()) == {"a": 2} and [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_tensorboard_curves_when_tensorboard_is_installed(tmp_path, data_root, tiny_bert):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out = tmp_path / "tb"
    recipe("classify").main(classify_args(data_root, tiny_bert, out, "--max-steps", "4", "--eval-every", "2",
                                          "--log-every", "2"))
    events = EventAccumulator(str(out / "tensorboard" / "classify"))
    events.Reload()
    assert set(events.Tags()["scalars"]) == {"epoch", "loss", "lr", "train_seconds", "validation/accuracy",
                                             "validation/predicted_classes", "best"}
    assert [e.step for e in events.Scalars("validation/accuracy")] == [2, 4]


def test_each_evaluation_prints_one_console_line(tmp_path, data_root, tiny_bert, capsys):
    recipe("classify").main(classify_args(data_root, tiny_bert, tmp_path / "c", "--max-steps", "4", "--eval-every", "2",
                                          "--report-to", "none"))
    lines = [line for line in capsys.readouterr().out.splitlines() if ": validation accuracy" in line]
    assert [line.split(":")[0] for line in lines] == ["step 2/4", "step 4/4"] and "best accuracy" in lines[0]
    assert not (tmp_path / "c" / "tensorboard").exists()  # --report-to none: log.jsonl only


def test_report_to_a_missing_tracker_fails_before_anything_is_written(tmp_path, data_root, tiny_bert):
    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here")
    from adaptkit.errors import MissingDependencyError
    with pytest.raises(MissingDependencyError, match=r"--report-to='wandb': needs the wandb package.*pip install wandb"):
        recipe("classify").main(classify_args(data_root, tiny_bert, tmp_path / "w", "--report-to", "wandb"))
    assert not (tmp_path / "w").exists()
    with pytest.raises(ConfigError, match=r"'none' contradicts the others"):
        recipe("classify").main(classify_args(data_root, tiny_bert, tmp_path / "n", "--report-to", "none", "tensorboard"))


# ---- launched for real -------------------------------------------------------------------------------
def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


def test_classify_under_accelerate_launch_with_two_processes(tmp_path, data_root, tiny_bert):
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or shutil.which("accelerate")
    out = tmp_path / "ddp"
    with socket.socket() as probe:  # a free port: the default 29500 may be taken by another launch on this machine
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    command = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--main_process_port", port,
               "--mixed_precision", "no", "--dynamo_backend", "no", str(ROOT / "recipes" / "classify.py"),
               *classify_args(data_root, tiny_bert, out, "--max-steps", "6", "--checkpoint-every", "3",
                              "--processes", "2")]
    done = subprocess.run(command, env={**_env(), "ACCELERATE_USE_CPU": "1"}, capture_output=True, text=True,
                          timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_processes"] == 2 and metrics["steps"] == 6
    assert metrics["train_samples"] == 6 * 8 * 2  # each optimizer step saw one batch per process
    assert METRIC_FIELDS <= set(metrics)
    assert {p.name for p in (out / "checkpoints" / "step-0000006").glob("random_states_*")} == {
        "random_states_0.pkl", "random_states_1.pkl"}
    assert adaptkit.strategy_of(adaptkit.load(out / "adapter", _fresh(tiny_bert, 2))).name == "lora"


def _free_port() -> str:
    with socket.socket() as probe:  # the default 29500 may be taken by another launch on this machine
        probe.bind(("127.0.0.1", 0))
        return str(probe.getsockname()[1])


@pytest.mark.parametrize("name", ["classify", "causal_lm"])
def test_a_recipe_on_two_machines_finishes(tmp_path, data_root, tiny_bert, tiny_gpt, name):
    """Two `--num_machines 2` launches on 127.0.0.1, one process each (issue 29). classify as reported: each node in
    its own folder, as on two machines, where node 1 never sees the adapter node 0 wrote; it took that for "no
    evaluation improved", saved on its own (a collective) and both hung. causal_lm reloads the adapter on every
    process at the end, so its nodes share the output folder."""
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or shutil.which("accelerate")
    rows = (data_root / "sst2" / "train.tsv").read_text().splitlines()[:161]
    (tmp_path / "sst160.tsv").write_text("\n".join(rows) + "\n")
    if name == "classify":
        argv = ["--data", str(tmp_path / "sst160.tsv"), "--model", str(tiny_bert), "--output-dir", "run"]
    else:
        argv = ["--model", str(tiny_gpt["model"]), "--data", str(tiny_gpt["pairs"]), "--output-dir", str(tmp_path / "run"),
                "--num-samples", "0"]
    port = _free_port()
    nodes = []
    for rank in (0, 1):
        (tmp_path / f"node{rank}").mkdir()
        nodes.append(subprocess.Popen(
            [accelerate, "launch", "--multi_gpu", "--num_machines", "2", "--machine_rank", str(rank), "--num_processes",
             "2", "--main_process_ip", "127.0.0.1", "--main_process_port", port, "--mixed_precision", "no",
             "--dynamo_backend", "no", str(ROOT / "recipes" / f"{name}.py"), *argv, "--batch-size", "8",
             "--max-steps", "4", "--checkpoint-every", "0", "--report-to", "none", "--processes", "2"],
            cwd=tmp_path / f"node{rank}", env={**_env(), "ACCELERATE_USE_CPU": "1"}, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, start_new_session=True))
    try:
        logs = [node.communicate(timeout=240)[0] for node in nodes]
    finally:
        for node in nodes:  # the launcher and the training process it started (a hang leaves both)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(node.pid, signal.SIGKILL)
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(log[-2000:] for log in logs)
    assert not any("no evaluation improved" in log for log in logs)
    out = tmp_path / "node0" / "run" if name == "classify" else tmp_path / "run"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_processes"] == 2 and metrics["steps"] == 4 and metrics["best_step"] == 4


def test_compare_prints_one_row_per_strategy(tmp_path, data_root, tiny_bert, capsys, monkeypatch):
    monkeypatch.setenv("ADAPTKIT_DATA", str(data_root))
    rows = recipe("compare").main(["--model", str(tiny_bert), "--strategies", "linear_probe", "lora", "--steps", "3",
                                   "--output-dir", str(tmp_path), "--extra", "--max-train-samples", "64",
                                   "--max-eval-samples", "32"])
    assert [r["strategy"]["strategy"] for r in rows] == ["linear_probe", "lora"]
    printed = capsys.readouterr().out
    assert "dev accuracy" in printed and "linear_probe" in printed.splitlines()[-4]
    assert json.loads((tmp_path / "comparison.json").read_text())[1]["steps"] == 3
