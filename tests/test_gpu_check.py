"""benchmarks/gpu_check.py stays runnable while no GPU is lent: its --cpu mode on a tiny Llama.

One configuration (QLoRA, the most fragile path: bitsandbytes 4-bit), without the DDP part: that is
recipes/minimal.py under 2 processes, which tests/test_distributed.py already launches (and which cost
another ~50 s here). The GPU run uses the same code with the 0.5B model (benchmarks/gpu_check.py docstring).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_runs_on_cpu(tmp_path):
    pytest.importorskip("bitsandbytes")
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "ACCELERATE_USE_CPU")}
    env.update({"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
    out = tmp_path / "check.json"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--cpu", "--configs", "lora_4bit",
                           "--no-ddp", "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    result = json.loads(out.read_text())
    (row,) = result["rows"]
    assert row["config"] == "lora_4bit" and row["quantization"] == "4bit"
    assert row["measured"] > 0 and row["step_seconds"] > 0 and row["trainable"] > 0
    assert result["estimates"]["lora_4bit"]["peak"] > 0
    assert result["ddp"] == {"skipped": "--no-ddp"}
    assert "lora_4bit" in "\n".join(result["table"])
