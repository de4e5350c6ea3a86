"""Where and with what a benchmark number was measured: machine, load, git commit, package versions.

Every result JSON the benchmarks write carries these fields, so a number can always be traced back
to the code and the conditions that produced it. Nothing here imports torch (the runner stays light).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent  # the repository
PACKAGES = ("adaptkit", "torch", "transformers", "peft", "accelerate")


def versions() -> dict[str, str]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def git() -> dict[str, Any]:
    """The commit and whether tracked files differed from it (a dirty tree is not that commit's code)."""
    def run(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return ""
    try:  # porcelain lines are "XY path"; stripping the output would eat the first line's leading space
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        status = ""
    changed = [line[3:] for line in status.splitlines() if line.strip()]
    return {"sha": run("rev-parse", "HEAD") or None, "dirty_files": changed}


def machine(threads: int | None = None) -> dict[str, Any]:
    """CPU, cores, memory, OS and Python; ``threads`` is what the measured process uses."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                memory = int(line.split()[1]) * 1024
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": cpu, "logical_cores": os.cpu_count(), "usable_cores": usable, "memory_bytes": memory,
            "threads": threads, "os": platform.platform(), "python": platform.python_version(),
            "accelerator": "none (CPU)" if not _has_cuda() else "cuda"}


def _has_cuda() -> bool:
    return Path("/dev/nvidia0").exists()


def load_average() -> list[float]:
    """1/5/15-minute load averages: on a shared machine, the other work running beside a measurement."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def peak_rss_now() -> int | None:
    """This process's own peak resident memory (VmHWM), in bytes; None where /proc is missing.

    Not ``getrusage().ru_maxrss``: Linux carries a parent's peak into a child across fork + exec, so a
    child started by a 1.5 GB process reports at least 1.5 GB there whatever it used itself.
    The same read as ``adaptkit.recipes.runs.peak_rss_bytes``, kept here on purpose: importing adaptkit loads
    torch, and this module must stay torch-free so the runner's own (inherited) peak stays small.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def stamp(threads: int | None = None) -> dict[str, Any]:
    return {"measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "versions": versions(),
            "git": git(), "machine": machine(threads)}


def write_json(path: Path, data: Any) -> None:
    """Atomic: a reader (or a resumed runner) sees the old file or the complete new one, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)
