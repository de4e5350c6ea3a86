"""FSDP2 on 2 CPU processes: what runs, what is refused, and the adapter saved whole.

Accelerate 1.15 does not run FSDP on CPU: `ACCELERATE_USE_CPU=1 accelerate launch --use_fsdp` silently
becomes DDP, and transformers still builds the model on the meta device in process 1, which crashed
the classify recipe (`Cannot copy out of meta tensor`). adaptkit refuses that launch with the fix
(tested below through the recipe). FSDP2 itself is driven directly with torch's ``fully_shard`` in
tests/fsdp2_worker.py (one 2-process launch): lora, bottleneck and full each train 20 steps sharded
and once unsharded in one process on the same global batch; the saved tensors must be whole and agree
within 1e-4, and a LoRA run resumed from a sharded step-10 checkpoint must end where it would have.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

import adaptkit
from adaptkit import distributed, errors, placement
from conftest import tiny_model

ROOT = Path(__file__).resolve().parents[1]
CPU_LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no"]
LAUNCH_ENV = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "ACCELERATE_USE_CPU", "ACCELERATE_USE_FSDP", distributed.EXPECTED_ENV)


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_ENV}
    env.update({"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
                "PYTHONPATH": str(ROOT), "ACCELERATE_USE_CPU": "1"})
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    (weights,) = folder.glob("*.safetensors")  # PEFT's adapter_model.safetensors or a native strategy's file
    return load_file(str(weights))


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fsdp2")
    proc = _run([*CPU_LAUNCH, "--multi_gpu", str(ROOT / "tests" / "fsdp2_worker.py"), str(out)])
    # torchrun's agent may abort at exit after a finished run: judge by what the run wrote
    assert (out / "results.json").is_file(), proc.stderr[-3000:]
    return out


@pytest.mark.parametrize("strategy", ["lora", "bottleneck", "full"])
def test_fully_shard_really_shards_every_trainable_tensor(sharded, strategy):
    seen = json.loads((sharded / "results.json").read_text())
    assert seen["world"] == 2
    info = seen[strategy]
    assert info["dtensors"] == info["trainable"] > 0
    assert info["local_numel"] < info["full_numel"]  # each process held a part


@pytest.mark.parametrize("strategy", ["lora", "bottleneck", "full"])
def test_saved_whole_and_equal_to_one_process_with_the_same_global_batch(sharded, strategy):
    one, two = _tensors(sharded / strategy / "one"), _tensors(sharded / strategy / "sharded")
    assert sorted(one) == sorted(two) and one
    assert {k: v.shape for k, v in one.items()} == {k: v.shape for k, v in two.items()}  # whole, not a shard
    assert max((one[k] - two[k]).abs().max().item() for k in one) <= 1e-4
    assert adaptkit.load(sharded / strategy / "sharded", tiny_model("bert"))  # it loads like any adapter


def test_resumed_from_a_sharded_checkpoint_ends_where_the_run_through_ended(sharded):
    whole, again = _tensors(sharded / "lora" / "sharded"), _tensors(sharded / "lora" / "resumed")
    assert sorted(whole) == sorted(again)
    assert all(torch.equal(whole[k], again[k]) for k in whole)


def test_fsdp_launch_on_cpu_is_refused_before_anything_loads(tmp_path):
    # before: rank 1 crashed with `Cannot copy out of meta tensor; no data!` and rank 0 lost its peer
    proc = _run([*CPU_LAUNCH, "--use_fsdp", "--fsdp_version", "2", str(ROOT / "recipes" / "classify.py"),
                 "--data", str(tmp_path / "none"), "--model", str(tmp_path / "none"), "--processes", "2",
                 "--output-dir", str(tmp_path / "out")])
    assert proc.returncode != 0
    assert ("UnsupportedError: accelerate launch --use_fsdp='running as MULTI_CPU': Accelerate enables FSDP on "
            "GPUs only") in proc.stderr
    assert "Fix: on CPU drop --use_fsdp" in proc.stderr
    assert not (tmp_path / "out").exists()


# ---- what cannot be sharded, refused before accelerator.prepare (no launch needed) --------------------
FSDP = SimpleNamespace(distributed_type=SimpleNamespace(value="FSDP"))


def test_prefix_under_fsdp_is_refused():
    model = adaptkit.adapt(tiny_model("bert"), "prefix")
    with pytest.raises(errors.UnsupportedError, match=r"strategy='prefix': under FSDP.*Fix: use lora or bottleneck"):
        distributed.check_sharded_model(FSDP, model)
    distributed.check_sharded_model(SimpleNamespace(distributed_type=SimpleNamespace(value="MULTI_CPU")), model)


@pytest.mark.parametrize("strategy", ["lora", "bottleneck", "full", "linear_probe"])
def test_strategies_that_fsdp_can_shard_pass(strategy):
    distributed.check_sharded_model(FSDP, adaptkit.adapt(tiny_model("bert"), strategy))


def test_sharded_parameters_cannot_be_saved_by_one_process(tmp_path):
    """A DTensor parameter (what fully_shard leaves) makes adaptkit.save refuse: it would write a shard."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import distribute_tensor

    if dist.is_initialized():
        pytest.skip("a process group already exists in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = adaptkit.adapt(tiny_model("bert"), "lora")
        mesh = init_device_mesh("cpu", (1,))
        name, p = next((n, p) for n, p in model.named_parameters() if p.requires_grad)
        owner = model.get_submodule(name.rpartition(".")[0])
        expected = p.detach().clone()
        owner.weight = torch.nn.Parameter(distribute_tensor(p.detach(), mesh))
        for write in (adaptkit.save, lambda m, d: m.save_pretrained(d)):  # the Trainer's way too: one writer, one rule
            with pytest.raises(errors.UnsupportedError, match=r"sharded by FSDP.*Fix: call "
                                                              r"adaptkit.distributed.save_adapter"):
                write(model, tmp_path / "a")
        gathered = distributed.gather_trained(model)
        assert torch.equal(gathered[name], expected)
        adaptkit.save(model, tmp_path / "a", _gathered=gathered)
        assert torch.equal(_tensors(tmp_path / "a")[name.replace(".default", "")], expected)
    finally:
        dist.destroy_process_group()


def test_a_sharded_native_adapter_frozen_after_training_is_still_gathered_and_saved(tmp_path):
    """torch's state dict leaves frozen parameters out for a frozen base; a native strategy's trained tensors that
    were frozen since (OWNED) must still be gathered, as adaptkit.save writes them unsharded."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import distribute_tensor

    if dist.is_initialized():
        pytest.skip("a process group already exists in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = adaptkit.adapt(tiny_model("bert"), "bottleneck")
        name, p = next((n, p) for n, p in model.named_parameters() if p.requires_grad and n.endswith(".weight"))
        owner = model.get_submodule(name.rpartition(".")[0])
        owner.weight = torch.nn.Parameter(distribute_tensor(p.detach(), init_device_mesh("cpu", (1,))))
        expected = p.detach().clone()
        model.requires_grad_(False)  # training done; what trained stays what is saved
        gathered = distributed.gather_trained(model)
        assert torch.equal(gathered[name], expected)
        adaptkit.save(model, tmp_path / "a", _gathered=gathered)
        assert torch.equal(_tensors(tmp_path / "a")[name], expected)
    finally:
        dist.destroy_process_group()


@pytest.fixture
def tiny_folder(tmp_path) -> Path:
    tiny_model("bert", "base").save_pretrained(tmp_path / "tiny")
    return tmp_path / "tiny"


def test_fsdp_qlora_settings_are_applied_and_integer_storage_refused(tiny_folder, monkeypatch):
    pytest.importorskip("bitsandbytes")
    from adaptkit.quantization import load_model, quantized_linears
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    plain = adaptkit.adapt(load_model(str(tiny_folder), "seq_cls", "4bit", num_labels=2), "lora")
    with pytest.raises(errors.UnsupportedError, match=r"bnb_4bit_quant_storage=\['torch.uint8'\]: under FSDP.*"
                                                      r"left unsharded"):
        distributed.check_sharded_model(FSDP, plain)
    # under an FSDP launch load_model packs 4-bit weights in the model's dtype and leaves placement to FSDP
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert placement.device_map() is None
    with pytest.raises(errors.UnsupportedError, match=r"device_map=\{'': 0\}: under FSDP the model must load whole"):
        placement.device_map({"": 0})
    model = load_model(str(tiny_folder), "seq_cls", "4bit", num_labels=2, dtype=torch.bfloat16)
    assert {m.weight.dtype for m in quantized_linears(model).values()} == {torch.bfloat16}
    assert model.config.quantization_config.bnb_4bit_quant_storage == torch.bfloat16
    model = adaptkit.adapt(model, "lora")
    distributed.check_sharded_model(FSDP, model)
    loss = model(input_ids=torch.randint(3, 99, (2, 8)), labels=torch.tensor([0, 1])).loss
    loss.backward()
    assert torch.isfinite(loss)


def test_8bit_under_fsdp_is_refused(tiny_folder):
    pytest.importorskip("bitsandbytes")
    from adaptkit.quantization import load_model
    model = adaptkit.adapt(load_model(str(tiny_folder), "seq_cls", "8bit", num_labels=2), "lora")
    with pytest.raises(errors.UnsupportedError, match=r"quantization='8bit': under FSDP: 8-bit weights cannot be "
                                                      r"sharded.*Fix: use quantization='4bit'"):
        distributed.check_sharded_model(FSDP, model)
