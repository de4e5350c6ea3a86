"""The ratio benchmarks compare like with like: `python benchmarks/ratios.py overhead` times adaptkit's LoRA
against the LoRA a user writes by hand with PEFT, which is only fair while both train the same tensors.

When LoRA began to train the pooler, the hand-written side went on training the old set, and the benchmark
refused to run ("the two sides train different parameter counts"). Nothing in the suite noticed. This test
makes such a drift fail here, on a tiny BERT, in seconds.
"""

from __future__ import annotations

import sys
from pathlib import Path

from peft import get_peft_model

import adaptkit
from conftest import tiny_model

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import ratios  # noqa: E402


def trainable(model) -> dict[str, tuple]:
    return {n: tuple(p.shape) for n, p in model.named_parameters() if p.requires_grad}


def test_the_hand_written_peft_side_trains_exactly_what_adaptkit_s_default_lora_trains():
    ours = trainable(adaptkit.adapt(tiny_model("bert"), "lora"))
    hand = trainable(get_peft_model(tiny_model("bert"), ratios.hand_lora_config()))
    assert ours == hand
    # the pooler trains in full, with no low-rank update on top, on both sides
    assert any("pooler" in n and "modules_to_save" in n for n in hand)
    assert not any("pooler" in n and "lora_" in n for n in hand)
