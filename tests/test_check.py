"""adaptkit.check: the whole setup validated from the config alone, every problem reported at once."""

from __future__ import annotations

import json

import pytest
import transformers
from conftest import FAMILIES, tiny_model

from adaptkit import errors
from adaptkit.check import CheckReport, check

# (family, strategy) pairs that cannot work, and what the message must say
REFUSED = {("distilbert", "prefix"): "past_key_values", ("vit", "prefix"): "pixel_values"}


def _config(family: str):
    return FAMILIES[family][0]()


def _folder_with_only_a_config(tmp_path, family="bert", **extra):
    config = _config(family)
    for key, value in extra.items():
        setattr(config, key, value)
    config.save_pretrained(tmp_path / "model")
    return tmp_path / "model"


def test_a_folder_with_only_config_json_is_enough(tmp_path):
    folder = _folder_with_only_a_config(tmp_path)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json"]  # no weights at all
    report = check(folder, "lora", num_labels=3)
    assert report.ok and report.model_class == "BertForSequenceClassification" and report.task == "seq_cls"
    # trainable parameters are counted on the adapted skeleton, exactly as on a real model
    import adaptkit
    real = adaptkit.summary(adaptkit.adapt(tiny_model("bert", num_labels=3), "lora"))
    assert (report.trainable, report.total) == (real.trainable, real.total)


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("strategy", ["lora", "bottleneck", "prefix", "linear_probe", "full"])
def test_every_family_and_strategy_from_a_config(family, strategy):
    report = check(_config(family), strategy, raise_on_error=False)
    refused = (family, strategy) in REFUSED
    assert report.ok != refused, str(report)
    if refused:
        assert REFUSED[(family, strategy)] in str(report.problems[0])


def test_every_problem_is_reported_at_once(tmp_path):
    folder = _folder_with_only_a_config(tmp_path)
    with pytest.raises(errors.ConfigErrors) as info:
        check(folder, "lora", options={"r": 0, "alpha": "16", "tragets": ["query"], "targets": ["quary", "nope"]},
              quantization="2bit", processes=64, num_labels=0)
    kinds = [type(e).__name__ for e in info.value.errors]
    assert kinds == ["ConfigError", "UnknownOptionError", "ConfigTypeError", "ConfigError", "ConfigError",
                     "ProcessCountError", "TargetNotFoundError", "TargetNotFoundError"], kinds
    text = str(info.value)
    for expected in ("num_labels=0", "'tragets' -> did you mean 'targets'", "LoRA.alpha='16'", "LoRA.r=0",
                     "quantization='2bit'", "processes=64", "'quary'", "did you mean 'query'", "'nope'"):
        assert expected in text
    assert text.startswith("8 problem(s):")
    assert all(e.fix for e in info.value.errors)  # each with its fix
    assert isinstance(info.value.report, CheckReport)


def test_strategy_x_quantization(monkeypatch):
    with pytest.raises(errors.ConfigErrors, match=r"strategy='full on a 4bit model'.*Fix: drop the quantization"):
        check(_config("bert"), "full", quantization="4bit")
    assert check(_config("bert"), "lora", quantization="8bit").ok
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(errors.ConfigErrors) as info:
        check(_config("bert"), "lora", quantization="8bit")
    assert isinstance(info.value.errors[0], errors.MissingDependencyError)
    assert "pip install 'adaptkit[bitsandbytes]'" in str(info.value)


def test_prefix_x_gradient_checkpointing_and_image_models():
    with pytest.raises(errors.ConfigErrors, match=r"gradient_checkpointing=True: PEFT refuses prefix tuning"):
        check(_config("bert"), "prefix", gradient_checkpointing=True)
    assert check(_config("bert"), "lora", gradient_checkpointing=True).ok
    with pytest.raises(errors.ConfigErrors, match=r"task=\"seq_cls for model type 'vit'\".*choose a task this model "
                                                  r"supports: \['image_cls', 'base'\]"):
        check(_config("vit"), "lora", task="seq_cls")


def test_processes_against_the_launcher(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(errors.ConfigErrors, match=r"processes=2: the launcher started 1 process\(es\). Fix: launch "
                                                  r"with ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu"):
        check(_config("bert"), "lora", processes=2)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert check(_config("bert"), "lora", processes=2).ok
    monkeypatch.delenv("WORLD_SIZE")
    report = check(_config("bert"), "lora", processes=2)
    assert report.ok and "accelerate launch" in report.notes[0]  # not launched yet: how to launch it
    with pytest.raises(errors.ConfigErrors, match=r"processes='2': expected an int"):
        check(_config("bert"), "lora", processes="2")


def test_num_labels(tmp_path):
    trained = _folder_with_only_a_config(tmp_path, num_labels=3, architectures=["BertForSequenceClassification"])
    with pytest.raises(errors.ConfigErrors, match=r"num_labels=2: the checkpoint's BertForSequenceClassification head "
                                                  r"has 3 labels. Fix: use num_labels=3"):
        check(trained, "lora", num_labels=2)
    assert check(trained, "lora", num_labels=3).ok
    with pytest.raises(errors.ConfigErrors, match=r"num_labels=2: has no meaning for task 'causal_lm'"):
        check(_config("gpt2"), "lora", task="causal_lm", num_labels=2)
    with pytest.raises(errors.ConfigErrors, match=r"num_labels=2.5: expected an int"):
        check(_config("bert"), "lora", num_labels=2.5)


def test_decoder_classifiers_need_a_pad_token():
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4)  # pad_token_id None
    with pytest.raises(errors.ConfigErrors, match=r"config.pad_token_id=None: GPT2ForSequenceClassification.*Fix: set "
                                                  r"model.config.pad_token_id"):
        check(config, "lora", task="seq_cls")
    config.pad_token_id = 0
    assert check(config, "lora", task="seq_cls").ok


def test_model_sources(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(errors.ConfigErrors, match=r"model='/no/such/folder': is neither an existing folder"):
        check("/no/such/folder", "lora")
    with pytest.raises(errors.ConfigErrors, match=r"model='someone/not-downloaded': is not a local folder and not in "
                                                  r"the hub cache"):
        check("someone/not-downloaded", "lora")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    with pytest.raises(errors.ConfigErrors, match=r"model=.*broken"):
        check(tmp_path / "broken", "lora")
    with pytest.raises(errors.ConfigErrors, match=r"model=3: expected a path"):
        check(3, "lora")
    assert check(_folder_with_only_a_config(tmp_path) / "config.json", "lora").ok  # config.json itself


def test_a_loaded_model_is_checked_by_its_class_and_left_untouched():
    model = tiny_model("gpt2", "causal_lm")
    before = {n: p.clone() for n, p in model.state_dict().items()}
    report = check(model, "lora")
    assert report.ok and report.model_class == "GPT2LMHeadModel" and report.task == "causal_lm"
    assert not hasattr(model, "peft_config") and all(p.device.type == "cpu" for p in model.parameters())
    assert all((before[n] == p).all() for n, p in model.state_dict().items())


def test_peft_methods_and_their_targets():
    assert check(_config("bert"), "ia3").ok
    with pytest.raises(errors.ConfigErrors, match=r"ia3.target_modules='quary'.*did you mean 'query'"):
        check(_config("bert"), "ia3", options={"target_modules": ["quary"], "feedforward_modules": []})
    with pytest.raises(errors.ConfigErrors, match=r"ia3.target_modules=None: PEFT has no default targets"):
        check(_config("vit"), "ia3")


def test_a_string_target_is_checked_as_peft_reads_it():
    assert check(_config("bert"), "lora", options={"target_modules": r".*\.(query|value)"}).ok
    with pytest.raises(errors.ConfigErrors, match=r"LoRA.targets='query': a string is a regex full-matched"):
        check(_config("bert"), "lora", options={"targets": "query"})


def test_the_report_prints_and_serialises(tmp_path):
    report = check(_config("bert"), "bogus", raise_on_error=False)
    text = str(report)
    assert "1 problem(s):" in text and "[UnknownStrategyError]" in text and "Fix:" in text
    assert json.dumps(report.problems[0].field)
    assert str(check(_config("bert"), "lora")).endswith("OK: no problems found")


def test_the_task_comes_from_the_config():
    from adaptkit.skeleton import infer_task
    config = _config("gpt2")
    assert infer_task(config) == "seq_cls"  # no architectures: a bare backbone is taken as a classifier
    config.architectures = ["GPT2LMHeadModel"]
    assert infer_task(config) == "causal_lm"
    config = _config("t5")
    config.architectures = ["T5ForConditionalGeneration"]
    assert infer_task(config) == "seq2seq"
    assert infer_task(_config("vit")) == "image_cls"


def test_strategy_objects_dicts_and_peft_configs():
    from peft import LoraConfig

    import adaptkit
    assert check(_config("bert"), adaptkit.LoRA(r=4, targets=["query"])).ok
    assert check(_config("bert"), LoraConfig(r=4, target_modules=["query", "value"])).ok
    with pytest.raises(errors.ConfigErrors, match=r"LoRA.r=0: must be positive"):
        check(_config("bert"), {"strategy": "lora", "r": 0})
    with pytest.raises(errors.ConfigErrors, match=r"LoRA.targets='quary'"):
        check(_config("bert"), adaptkit.LoRA(targets=["quary"]))
