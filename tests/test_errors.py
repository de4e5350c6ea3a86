"""Bad input everywhere a user types something: each case gets a typed error naming field, value and fix,
raised before any work starts, and nothing is left half-written."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from conftest import tiny_inputs, tiny_model

import adaptkit
from adaptkit import errors
from adaptkit.sanity import sanity_check
from adaptkit.strategies import REGISTRY

FIELDS = [(name, f.name) for name, cls in sorted(REGISTRY.items()) for f in dataclasses.fields(cls)]


def test_every_option_of_every_strategy_is_under_test():
    assert len(FIELDS) >= 15
    assert {name for name, _ in FIELDS} == {name for name, cls in REGISTRY.items() if dataclasses.fields(cls)}


def test_full_takes_no_options():
    with pytest.raises(errors.UnknownOptionError, match=r"Full options=\['lr'\]: unknown option.*valid options are \[\]"):
        adaptkit.adapt(tiny_model("bert"), "full", lr=1e-5)


@pytest.mark.parametrize("name,field", FIELDS)
def test_a_wrong_type_names_the_strategy_field_and_its_type(name, field):
    cls = REGISTRY[name]
    with pytest.raises(errors.ConfigTypeError, match=rf"{cls.__name__}\.{field}=<object.*expected .*Fix: pass a"):
        cls(**{field: object()})
    assert issubclass(errors.ConfigTypeError, TypeError)


@pytest.mark.parametrize("name,typo,meant", [("lora", "alpah", "alpha"), ("bottleneck", "reduction_factr",
                         "reduction_factor"), ("prefix", "num_virtual_token", "num_virtual_tokens"),
                         ("linear_probe", "head", "heads")])
def test_a_mistyped_option_gets_did_you_mean(name, typo, meant):
    with pytest.raises(errors.UnknownOptionError, match=rf"'{typo}' -> did you mean '{meant}'"):
        adaptkit.adapt(tiny_model("bert"), name, **{typo: 1})


@pytest.mark.parametrize("options,match", [
    ({"r": 0}, r"LoRA.r=0: must be positive. Fix:"),
    ({"dropout": 1.0}, r"LoRA.dropout=1.0: must be in \[0, 1\)"),
    ({"targets": []}, r"LoRA.targets=\[\]: is empty"),
    ({"init": "__import__('os')"}, r"LoRA.init=.*Fix: use one of"),
])
def test_bad_lora_values_are_refused_at_construction(options, match):
    with pytest.raises(errors.ConfigError, match=match):
        adaptkit.LoRA(**options)


def test_a_lora_rank_above_what_the_layers_can_hold_is_refused_before_anything_is_built():
    # tiny BERT: hidden 32, intermediate 64; PEFT would build 2 x r x 32 parameters per layer (r=10**6: 64M each)
    with pytest.raises(errors.ConfigError, match=r"LoRA.r=1000000: exceeds the rank an update of .* \(32, 32\) can "
                                                 r"have \(32\).*Fix: use r <= 32"):
        adaptkit.adapt(tiny_model("bert"), "lora", r=10**6)
    # the bound is the smallest targeted layer: only the 32 x 64 intermediate layer adapted allows r = 32, not 33
    assert adaptkit.adapt(tiny_model("bert"), "lora", r=32, targets=["intermediate.dense"])
    with pytest.raises(errors.ConfigError, match=r"LoRA.r=33: .*intermediate.dense \(32, 64\)"):
        adaptkit.adapt(tiny_model("bert"), "lora", r=33, targets=["intermediate.dense"])


@pytest.mark.parametrize("given,match", [
    (["nope"], r"ia3.target_modules='nope': matches no module in this model. Fix: .*names include"),
    ("nope", r"ia3.target_modules='nope': a string is a regex .* matches no module. Fix: .*'\.\*nope'"),
])
def test_a_peft_pass_through_target_that_matches_nothing_is_a_typed_error(given, match):
    # PEFT raised its own NoMatchingPeftModuleError ("No modules were targeted ...") without the names there are
    with pytest.raises(errors.TargetNotFoundError, match=match):
        adaptkit.adapt(tiny_model("bert"), "ia3", target_modules=given, feedforward_modules=[])


def test_bad_values_of_the_other_strategies():
    with pytest.raises(errors.ConfigError, match=r"Bottleneck.activation='relu6x'.*Fix: choose one of"):
        adaptkit.Bottleneck(activation="relu6x")
    with pytest.raises(errors.ConfigError, match=r"Bottleneck.variant=.houlsbi.: must be one of"):
        adaptkit.Bottleneck(variant="houlsbi")
    with pytest.raises(errors.ConfigError, match=r"Bottleneck.reduction_factor=64: leaves no bottleneck"):
        adaptkit.adapt(tiny_model("bert"), "bottleneck", reduction_factor=64)  # hidden 32 // 64 = 0
    with pytest.raises(errors.ConfigError, match=r"Prefix.projection_hidden=-1"):
        adaptkit.Prefix(projection_hidden=-1)


def test_strategy_names_and_types():
    with pytest.raises(errors.UnknownStrategyError, match=r"strategy='bottlenek'.*did you mean 'bottleneck'"):
        adaptkit.adapt(tiny_model("bert"), "bottlenek")
    with pytest.raises(errors.ConfigTypeError, match=r"strategy=3: expected a name"):
        adaptkit.adapt(tiny_model("bert"), 3)
    with pytest.raises(errors.UnknownStrategyError, match=r"strategy='loraa'"):
        adaptkit.adapt(tiny_model("bert"), {"strategy": "loraa"})


@pytest.mark.parametrize("strategy,options,field", [
    ("lora", {"targets": ["quary"]}, "LoRA.targets"),
    ("lora", {"heads": ["clasifier"]}, "LoRA.heads"),
    ("prefix", {"heads": ["classifer"]}, "Prefix.heads"),
    ("linear_probe", {"heads": ["classifer"]}, "LinearProbe.heads"),
])
def test_target_names_that_match_nothing(strategy, options, field):
    model = tiny_model("bert")
    before = {n: p.clone() for n, p in model.state_dict().items()}
    with pytest.raises(errors.TargetNotFoundError, match=rf"{field}='\w+': matches no module.*did you mean"):
        adaptkit.adapt(model, strategy, **options)
    assert adaptkit.strategy_of(model) is None  # refused before anything changed
    assert all(torch.equal(before[n], p) for n, p in model.state_dict().items())


@pytest.mark.parametrize("strategy", ["lora", "bottleneck", "prefix", "linear_probe", "full", "ia3"])
def test_adapting_twice_is_refused(strategy):
    model = adaptkit.adapt(tiny_model("bert"), strategy)
    with pytest.raises(errors.AlreadyAdaptedError, match=r"model=.*already adapted.*Fix: start from a freshly"):
        adaptkit.adapt(model, "lora")


def test_save_merge_and_sanity_check_need_an_adapted_model(tmp_path):
    plain = tiny_model("bert")
    for call in (lambda: adaptkit.save(plain, tmp_path / "x"), lambda: adaptkit.merge(plain),
                 lambda: sanity_check(plain, tiny_inputs("bert"))):
        with pytest.raises(errors.NotAdaptedError, match=r"model='BertForSequenceClassification': was not adapted"):
            call()
    assert not (tmp_path / "x").exists()


# ---- saved folders: tampering is refused and nothing in them is executed ------------------------------
def _saved(tmp_path, strategy="bottleneck"):
    folder = tmp_path / "adapter"
    adaptkit.save(adaptkit.adapt(tiny_model("bert"), strategy), folder)
    return folder, json.loads((folder / "adaptkit_config.json").read_text())


def _tamper(folder, data):
    (folder / "adaptkit_config.json").write_text(json.dumps(data))


@pytest.mark.parametrize("change,error,match", [
    (lambda d: d.update(hook="os.system('touch PWNED')"), errors.AdapterFormatError, r"is not an adaptkit-adapter/1"),
    (lambda d: d.update(format="adaptkit-adapter/99"), errors.AdapterFormatError, r"adaptkit-adapter/1"),
    (lambda d: d["strategy"].update(reduction_factor="__import__('os').system('touch PWNED')"),
     errors.ConfigTypeError, r"Bottleneck.reduction_factor=.*expected int"),
    (lambda d: d["strategy"].update(extra=1), errors.UnknownOptionError, r"unknown option\(s\)"),
    (lambda d: d["strategy"].update(strategy="os.system"), errors.UnknownStrategyError, r"strategy='os.system'"),
    (lambda d: d.update(strategy="bottleneck"), errors.AdapterFormatError, r"strategy='bottleneck': must be an object"),
])
def test_a_tampered_config_raises_and_executes_nothing(tmp_path, monkeypatch, change, error, match):
    folder, data = _saved(tmp_path)
    change(data)
    _tamper(folder, data)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(error, match=match):
        adaptkit.load(folder, tiny_model("bert"))
    assert not (tmp_path / "PWNED").exists()


def test_a_config_that_is_not_json(tmp_path):
    folder, _ = _saved(tmp_path)
    (folder / "adaptkit_config.json").write_text("{'strategy': 'lora'")
    with pytest.raises(errors.AdapterFormatError, match=r"cannot be read.*Fix: restore it from a good copy"):
        adaptkit.load(folder, tiny_model("bert"))


def test_loading_a_folder_that_is_not_an_adapter(tmp_path):
    with pytest.raises(errors.AdapterFormatError, match=r"is not a folder"):
        adaptkit.load(tmp_path / "missing", tiny_model("bert"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(errors.AdapterFormatError, match=r"holds neither adaptkit_config.json nor adapter_config"):
        adaptkit.load(tmp_path / "empty", tiny_model("bert"))


def test_save_refuses_a_file_and_a_base_model_folder(tmp_path):
    model = adaptkit.adapt(tiny_model("bert"), "lora")
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(errors.ConfigError, match=r"directory=.*notes.txt.*is a file, not a folder.*Fix: pass a new"):
        adaptkit.save(model, tmp_path / "notes.txt")
    tiny_model("bert").save_pretrained(tmp_path / "base")
    before = {p.name: p.read_bytes() for p in (tmp_path / "base").iterdir()}
    with pytest.raises(errors.ConfigError, match=r"base/(config.json|model.safetensors).*adaptkit did not write.*"
                                                 r"from_pretrained would load it.*Fix: move or rename"):
        adaptkit.save(model, tmp_path / "base")
    assert {p.name: p.read_bytes() for p in (tmp_path / "base").iterdir()} == before
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "notes.txt"]  # no temp folder left


@pytest.mark.parametrize("strategy", ["lora", "bottleneck", "prefix", "linear_probe", "full", "ia3"])
def test_num_labels_mismatch_on_load_is_a_typed_error(tmp_path, strategy):
    adaptkit.save(adaptkit.adapt(tiny_model("bert", num_labels=2), strategy), tmp_path / "a")
    with pytest.raises(errors.AdapterFormatError, match=r"(num_labels|shape)"):
        adaptkit.load(tmp_path / "a", tiny_model("bert", num_labels=3))


@pytest.mark.parametrize("options,error,match", [
    ({"target_modul": ["query"]}, errors.UnknownOptionError, r"ia3 options=\['target_modul'\].*did you mean "
                                                             r"'target_modules'"),
    ({"target_modules": 3}, errors.ConfigTypeError, r"ia3.target_modules=3: expected"),
    ({"target_modules": ["key"], "feedforward_modules": ["query"]}, errors.ConfigError,
     r"ia3 options=.*refused by PEFT: `feedforward_modules` should be a subset"),
])
def test_peft_method_options_are_typed_errors_too(options, error, match):
    with pytest.raises(error, match=match):
        adaptkit.adapt(tiny_model("bert"), "ia3", **options)


# ---- one type check per public call, naming the argument --------------------------------------------------
def test_wrong_argument_types_at_the_public_api_name_the_argument(tmp_path):
    from peft import LoraConfig
    lora = adaptkit.adapt(tiny_model("bert"), "lora")
    adaptkit.save(lora, tmp_path / "a")
    cases = [
        (lambda: adaptkit.load(tmp_path / "a", "str"), errors.ConfigTypeError, r"base_model='str': is not a torch model"),
        (lambda: adaptkit.load(3, tiny_model("bert")), errors.ConfigTypeError, r"directory=3: expected a folder path"),
        (lambda: adaptkit.save(lora, 123), errors.ConfigTypeError, r"directory=123: expected a folder path, got int"),
        (lambda: adaptkit.save(lora, None), errors.ConfigTypeError, r"directory=None: expected a folder path, got NoneType"),
        (lambda: adaptkit.summary("x"), errors.ConfigTypeError, r"model='str': is not a torch model"),
        (lambda: adaptkit.merge(None), errors.ConfigTypeError, r"model='NoneType': is not a torch model"),
        (lambda: adaptkit.adapt(tiny_model("bert"), LoraConfig(task_type="CAUSAL_LM")), errors.ConfigError,
         r"LoraConfig.task_type='CAUSAL_LM': does not match BertForSequenceClassification \(SEQ_CLS\).*Fix: use "
         r"task_type='SEQ_CLS'"),
        (lambda: adaptkit.add_adapter(lora, "p", "prefix"), errors.UnsupportedError,
         r"strategy='lora \+ prefix': named adapters need one PEFT method\. Fix: add an adapter of the model's"),
    ]
    for call, error, match in cases:
        with pytest.raises(error, match=match):
            call()
    assert sorted(lora.peft_config) == ["default"]
