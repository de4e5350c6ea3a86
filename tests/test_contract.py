"""The contract every registered strategy keeps, on every model family where it makes sense.

The list of strategies under test is built from the registry and checked against it, so a new
strategy file is covered automatically and the parametrization can never silently be empty.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import FAMILY_TASKS, tiny_inputs, tiny_labels, tiny_model

import adaptkit
from adaptkit import errors
from adaptkit.strategies import REGISTRY

# strategy spec under test -> the registry name it exercises
STRATEGIES = {
    "lora": "lora",
    "bottleneck": "bottleneck",
    "bottleneck:houlsby": "bottleneck",
    "prefix": "prefix",
    "linear_probe": "linear_probe",
    "full": "full",
    "ia3": "peft",
}

# Combinations that cannot work, each refused with UnsupportedError (documented in docs/strategies.md).
UNSUPPORTED = {
    ("prefix", "distilbert"): "past_key_values",   # DistilBERT's forward takes no past_key_values
    ("prefix", "vit"): "pixel_values",             # no token sequence to prefix
    ("ia3", "distilbert"): "target_modules",       # PEFT has no IA3 table entry; needs explicit targets
    ("ia3", "vit"): "target_modules",
}

# Strategies whose adapted model must equal the base model exactly at initialisation.
IDENTITY_AT_INIT = {"lora", "bottleneck", "bottleneck:houlsby", "linear_probe", "full", "ia3"}


def adapt(model, spec):
    name, _, variant = spec.partition(":")
    options = {"variant": variant} if variant else {}
    if name == "bottleneck":
        # tiny models have hidden 32: the default factor 16 leaves 2 ReLU units, which can both be dead
        options["reduction_factor"] = 4
    return adaptkit.adapt(model, name, **options)


def test_every_registered_strategy_is_under_test():
    assert REGISTRY, "the registry is empty"
    assert set(STRATEGIES.values()) == set(REGISTRY)
    assert len(FAMILY_TASKS) >= 9  # 7 families, causal-LM and classifier variants


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_config_defaults_roundtrip_and_unknown_keys(name):
    cls = REGISTRY[name]
    config = cls()
    data = config.to_dict()
    assert data["strategy"] == name
    assert cls.from_dict(data) == config
    with pytest.raises(errors.UnknownOptionError, match="not_an_option"):
        cls.from_dict({**data, "not_an_option": 1})
    # JSON-able: what save writes must read back
    import json
    assert cls.from_dict(json.loads(json.dumps(data))) == config


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_wrong_types_are_refused(name):
    cls = REGISTRY[name]
    fields = [f for f in dataclasses.fields(cls)]
    if not fields:
        pytest.skip(f"{name} has no options")
    field = fields[0]
    with pytest.raises(errors.ConfigTypeError, match=f"{cls.__name__}.{field.name}"):
        cls(**{field.name: object()})


CASES = [(spec, fam, task) for spec in STRATEGIES for fam, task in FAMILY_TASKS]


def _ids(case):
    return f"{case[0]}-{case[1]}-{case[2]}"


def _adapt_or_refused(spec, family, task):
    model = tiny_model(family, task)
    key = (spec.split(":")[0], family)
    if key in UNSUPPORTED:
        with pytest.raises(errors.UnsupportedError, match=UNSUPPORTED[key]):
            adapt(model, spec)
        pytest.skip(f"{spec} on {family} is refused by design")
    return model, adapt(model, spec)


def _forward(model, family, task, inputs):
    out = model(**inputs)
    return out.logits


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_contract(case, tmp_path):
    spec, family, task = case
    base_model = tiny_model(family, task)
    inputs = tiny_inputs(family, task)
    with torch.no_grad():
        reference = base_model(**inputs).logits
    model, adapted = _adapt_or_refused(spec, family, task)

    # 1. at init, identity where the strategy promises it
    adapted.eval()
    with torch.no_grad():
        at_init = _forward(adapted, family, task, inputs)
    if spec in IDENTITY_AT_INIT:
        assert torch.equal(at_init, reference), f"{spec} changed outputs at init"

    # 2. the base is frozen (except full), something trains
    trainable = {n for n, p in adapted.named_parameters() if p.requires_grad}
    assert trainable, "nothing trains"
    frozen = {n for n, p in adapted.named_parameters() if not p.requires_grad}
    if spec == "full":
        assert not frozen
    else:
        assert frozen
        summary = adaptkit.summary(adapted)
        assert 0 < summary.trainable < summary.total

    # 3. two optimizer steps change exactly the trainable tensors (two: zero-initialised up/B
    #    projections give their partners no gradient in the first step)
    before = {n: p.detach().clone() for n, p in adapted.named_parameters()}
    optimizer = torch.optim.Adam([p for p in adapted.parameters() if p.requires_grad], lr=1e-2)
    adapted.train()
    labels = tiny_labels(family, task, inputs)
    for _ in range(2):
        loss = adapted(**inputs, labels=labels).loss
        assert torch.isfinite(loss)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    changed = {n for n, p in adapted.named_parameters() if not torch.equal(p, before[n])}
    assert changed == trainable, f"changed-but-frozen: {changed - trainable}, trainable-unchanged: {trainable - changed}"

    # 4. save -> load into a fresh base reproduces the outputs exactly
    adapted.eval()
    with torch.no_grad():
        trained = _forward(adapted, family, task, inputs)
    adaptkit.save(adapted, tmp_path / "adapter")
    reloaded = adaptkit.load(tmp_path / "adapter", tiny_model(family, task)).eval()
    with torch.no_grad():
        assert torch.equal(_forward(reloaded, family, task, inputs), trained)
    assert not any(p.suffix in (".bin", ".pt", ".pth", ".pkl") for p in (tmp_path / "adapter").iterdir())

    # 5. merge folds (within 1e-5) or refuses clearly
    config = adaptkit.strategy_of(adapted)
    if config.mergeable:
        merged = adaptkit.merge(adapted)
        assert adaptkit.strategy_of(merged) is None
        assert type(merged).__module__.startswith("transformers.")
        with torch.no_grad():
            torch.testing.assert_close(_forward(merged, family, task, inputs), trained, atol=1e-5, rtol=0)
    else:
        with pytest.raises(errors.NotMergeableError, match="Fix:"):
            adaptkit.merge(adapted)


@pytest.mark.parametrize("spec", sorted(STRATEGIES))
def test_adapting_twice_is_refused(spec):
    model = adapt(tiny_model("bert"), spec)
    with pytest.raises(errors.AlreadyAdaptedError, match="add_adapter"):
        adaptkit.adapt(model, "lora")
    # also when the caller kept the original object (PEFT wraps it and injects in place)
    original = tiny_model("bert")
    adapt(original, spec)
    with pytest.raises(errors.AlreadyAdaptedError):
        adaptkit.adapt(original, "lora")


# ---- a tensor the user unfroze after adapt: saved and loaded back, or refused at save naming it (issue 29 #11) ----
@pytest.mark.parametrize("name", ["bottleneck", "linear_probe"])
def test_a_tensor_the_user_unfroze_is_saved_and_loaded_back(name, tmp_path):
    model = adapt(tiny_model("bert"), name)
    norm = model.bert.embeddings.LayerNorm
    norm.requires_grad_(True)
    with torch.no_grad():
        norm.weight.add_(0.3)
    inputs = tiny_inputs("bert")
    trained = model.eval()(**inputs).logits
    adaptkit.save(model, tmp_path / "a")  # 18e00d1: load then refused its own folder ("2 unexpected")
    loaded = adaptkit.load(tmp_path / "a", tiny_model("bert"), trainable=True)
    assert torch.equal(loaded.bert.embeddings.LayerNorm.weight, norm.weight)
    assert torch.equal(loaded.eval()(**inputs).logits, trained)
    assert loaded.bert.embeddings.LayerNorm.weight.requires_grad  # trains on, and saves again


def test_a_tensor_the_user_unfroze_outside_a_peft_adapter_is_refused_at_save(tmp_path):
    model = adaptkit.adapt(tiny_model("bert"), "lora")
    model.get_base_model().bert.embeddings.LayerNorm.requires_grad_(True)
    # 18e00d1: saved without it, and the reload differed silently
    with pytest.raises(errors.UnsupportedError, match=r"trainable tensors=\['base_model\.model\.bert\.embeddings\."
                       r"LayerNorm\.weight', .*2 trainable tensor\(s\) outside the adapter.*Fix: name their modules"):
        adaptkit.save(model, tmp_path / "a")
    assert not (tmp_path / "a").exists()
    # the fix it names: trained and saved with the adapter
    model = adaptkit.adapt(tiny_model("bert"), "lora", heads=["classifier", "embeddings.LayerNorm"])
    with torch.no_grad():
        model.get_base_model().bert.embeddings.LayerNorm.modules_to_save["default"].weight.add_(0.3)
    inputs = tiny_inputs("bert")
    adaptkit.save(model, tmp_path / "b")
    reloaded = adaptkit.load(tmp_path / "b", tiny_model("bert"))
    assert torch.equal(reloaded(**inputs).logits, model.eval()(**inputs).logits)
