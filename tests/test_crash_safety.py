"""A process killed with SIGKILL in the middle of ``adaptkit.save`` never leaves a broken adapter.

A child process saves version 1, changes its trained tensors, and starts saving version 2 with the
strategy's save patched to write half the weights file and then wait; the parent kills it there with
SIGKILL. The folder at the target name must still be version 1 and load; whatever the killed save left
behind lies beside it under a name starting with a dot. (SIGKILL during *training* with ``--resume`` is
tested with the recipes, tests/test_recipes.py.)
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
from adaptkit.strategies.base import WEIGHTS_NAME

target, strategy, moment, ready = Path(sys.argv[1]), sys.argv[2], sys.argv[3], Path(sys.argv[4])
model = adaptkit.adapt(tiny_model("bert"), strategy)
if moment != "first-save":
    adaptkit.save(model, target)                      # version 1, complete
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
    def half_save(self, model, directory):
        original(self, model, directory)
        weights = Path(directory) / WEIGHTS_NAME
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # half written
        stop_here()
    cls.save = half_save
else:  # "after-swap": version 2 is in place, the old folder not yet deleted
    shutil.rmtree = lambda *a, **k: stop_here()
adaptkit.save(model, target)
"""


def _kill_during_save(tmp_path: Path, strategy: str, moment: str) -> Path:
    target, ready = tmp_path / "adapter", tmp_path / "ready"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    child = subprocess.Popen([sys.executable, "-c", CHILD.format(tests=str(TESTS)), str(target), strategy, moment,
                              str(ready)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
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


@pytest.mark.parametrize("strategy", ["bottleneck", "lora"])
def test_killed_while_writing_the_previous_adapter_stays_intact(tmp_path, strategy):
    target = _kill_during_save(tmp_path, strategy, "mid-write")
    loaded = adaptkit.load(target, tiny_model("bert"))
    version1 = adaptkit.adapt(tiny_model("bert"), strategy)  # same seeds: what the child saved first
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
