"""Checkpoints that resume bit for bit and hold nothing that runs code, and --resume's guards (docs/recipes.md)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import load
from safetensors.torch import load_file

from adaptkit.errors import AdaptkitError, CheckpointError, ConfigError
from adaptkit.folders import digest, files_under, replace_dir, write_json, write_text
from adaptkit.recipes.training import CHECKPOINTS, LOG_FILE, RUN_STATE, RunArgs

# Flags that may change between a run and its resumption; every other flag must match, or the resumed run would
# silently train something else than the interrupted one. max_steps / epochs may grow (the run is extended).
_RESUMABLE_CHANGES = {"output_dir", "resume", "overwrite", "log_every", "checkpoint_every", "keep_checkpoints",
                      "processes", "report_to", "max_steps", "epochs"}
_FIX = "resume from an earlier checkpoint, or start afresh with --overwrite"


def adapter_only(accelerator) -> None:
    """``save_state`` writes only the trained tensors and buffers (batch-norm statistics update under a frozen base);
    ``load_state`` puts them back, refusing a checkpoint that lacks any. FSDP and DeepSpeed save their own way."""
    accelerator.register_save_state_pre_hook(_keep_trained)
    accelerator.register_load_state_pre_hook(_load_trained)


def _kept_names(model: torch.nn.Module, state) -> set[str]:
    trained = {p.data_ptr() for p in model.parameters() if p.requires_grad}
    buffers = {name for name, _ in model.named_buffers()}
    return {k for k, v in state.items() if v.data_ptr() in trained or k in buffers}


def _keep_trained(models: list, weights: list, output_dir: str) -> None:
    for i, (model, state) in enumerate(zip(models, weights)):
        if any(not p.requires_grad for p in model.parameters()):
            weights[i] = {k: v for k, v in state.items() if k in _kept_names(model, state)}


def _load_trained(models: list, input_dir: str) -> None:
    for i, model in enumerate(models):
        path = Path(input_dir) / f"model{f'_{i}' if i else ''}.safetensors"
        try:
            saved = load_file(str(path), device=str(next(model.parameters()).device))
        except Exception as exc:  # safetensors' own error type for a zeroed or truncated file
            raise CheckpointError(str(path), type(exc).__name__, f"cannot be read: {exc}", _FIX) from None
        unexpected = model.load_state_dict(saved, strict=False).unexpected_keys
        state = model.state_dict()
        covered = {state[k].data_ptr() for k in saved if k in state}  # shared tensors are written once
        lost = sorted(k for k in _kept_names(model, state) if state[k].data_ptr() not in covered)
        if unexpected or lost:
            raise ConfigError("--resume", str(path), f"does not hold this model's trained tensors (missing {lost[:3]}, "
                              f"unexpected {sorted(unexpected)[:3]})", "resume with the strategy it was written with")
    models.clear()  # loaded here; accelerate would load them strictly, as whole models


def latest_checkpoint(output_dir: Path) -> Path | None:
    """The newest checkpoint with a run_state.json (temporary folders start with '.')."""
    steps = (Path(output_dir) / CHECKPOINTS).glob("step-*")
    done = [p for p in steps if re.fullmatch(r"step-\d+", p.name) and (p / RUN_STATE).is_file()]
    return max(done, key=lambda p: int(p.name.split("-")[1]), default=None)


def resume(accelerator, run: RunArgs, progress) -> None:
    """--resume: refuse a damaged checkpoint and changed flags or data, then ``load_state`` and the position."""
    if run.resume is None:
        return
    path = latest_checkpoint(run.output_dir) if run.resume == "latest" else Path(run.resume).expanduser()
    if path is None or not (path / RUN_STATE).is_file():
        raise ConfigError("--resume", str(path or run.output_dir / CHECKPOINTS), "no complete checkpoint there",
                          "point --resume at a checkpoints/step-N folder, or drop --resume to start afresh")
    state = read_checkpoint(path)
    saved, now = state["config"], run.config(accelerator.num_processes)
    changed = sorted(k for k in set(saved) | set(now) if k not in _RESUMABLE_CHANGES and saved.get(k) != now.get(k))
    if progress.max_steps < state["max_steps"]:  # fewer steps than the run planned: another schedule
        changed += [k for k in ("max_steps", "epochs") if saved.get(k) != now.get(k)] or ["max_steps"]
    if changed:
        raise ConfigError("--resume", {k: [saved.get(k), now.get(k)] for k in changed}, "these flags differ from the "
                          "interrupted run (was, now); only a higher --max-steps or --epochs may change",
                          "resume with the same flags, or start a new run in another --output-dir")
    data = data_fingerprint(run)
    was = state.get("data", data)  # a checkpoint from before fingerprints were kept: nothing to compare
    if moved := sorted(k for k in set(was) | set(data) if was.get(k) != data.get(k)):
        raise CheckpointError("--resume", moved[:3], "the data changed since the interrupted run started (checksums "
                              "differ)", "restore the data files, or start a new run")
    try:
        accelerator.load_state(str(path))
    except AdaptkitError:
        raise
    except Exception as exc:  # whatever torch, safetensors or pickle raise on a damaged file: one typed refusal
        raise CheckpointError(str(path), type(exc).__name__, f"cannot be loaded: {str(exc).splitlines()[0][:200]}",
                              "resume from an earlier checkpoint") from None
    try:
        progress.load_state_dict(state)
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(str(path / RUN_STATE), repr(exc), "holds a malformed position", _FIX) from None
    if progress.max_steps > state["max_steps"]:
        progress.notes.append(f"--resume: extended from {state['max_steps']} to {progress.max_steps} optimizer steps; "
                              "the learning-rate schedule is laid out over the new total from here on")
    log = run.output_dir / LOG_FILE
    if accelerator.is_main_process and log.is_file() and not log.is_symlink():  # later steps are logged again
        lines = log.read_text(encoding="utf-8").splitlines(keepends=True)
        write_text(log, "".join(line for line in lines if _step(line) <= progress.step))
    accelerator.print(f"resumed from {path} at step {progress.step}", *progress.notes[-1:], sep="\n")


def _step(line: str) -> float:
    try:
        return float(json.loads(line).get("step") or 0)
    except (ValueError, AttributeError):
        return float("inf")  # a torn last line of a killed run


def checkpoint(accelerator, run: RunArgs, progress) -> Path:
    """``save_state`` and run_state.json into a temporary folder renamed into place; prune to --keep-checkpoints."""
    folder = run.output_dir / CHECKPOINTS
    final, tmp = folder / f"step-{progress.step:07d}", folder / f".tmp-step-{progress.step:07d}"
    with progress.paused():
        if accelerator.is_main_process:
            remove_checkpoint(tmp)  # of a killed run
            tmp.mkdir(parents=True, exist_ok=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp))  # every process writes its own RNG states
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            write_json(tmp / RUN_STATE, {**progress.state_dict(), "config": run.config(accelerator.num_processes),
                                         "data": data_fingerprint(run), "files": digests(tmp, skip=RUN_STATE)})
            replace_dir(tmp, final)
            old = sorted(p for p in folder.glob("step-*") if p != final and (p / RUN_STATE).is_file())
            for stale in old[: max(0, len(old) - run.keep_checkpoints + 1)]:
                remove_checkpoint(stale)
        accelerator.wait_for_everyone()
    return final


def remove_checkpoint(folder: Path) -> None:
    """Delete the files a checkpoint lists if unchanged (a killed one's: save_state's by name), then run_state.json."""
    try:
        listed = json.loads((folder / RUN_STATE).read_text(encoding="utf-8")).get("files") \
            if (folder / RUN_STATE).is_file() else dict.fromkeys(files_under(folder))
    except (OSError, ValueError, AttributeError):
        return
    if isinstance(listed, dict):
        remove_owned(folder, {**{k: v for k, v in listed.items() if CHECKPOINT_FILE.fullmatch(k)}, RUN_STATE: None})


def digests(folder: Path, skip: str = "") -> dict[str, str]:
    """sha256 of each file below ``folder`` but ``skip``; links are left out (a checkpoint holding one is refused)."""
    return {rel: h for rel in files_under(folder) if rel != skip and (h := digest(Path(folder) / rel))}


# What save_state writes (read back with weights_only=True; FSDP's sharded folders are guarded by the digests) and
# run_state.json; never custom_checkpoint_N.pkl, which Accelerate unpickles with weights_only=False.
CHECKPOINT_FILE = re.compile(r"(model|optimizer|scheduler|sampler)(_\d+)?\.(safetensors|bin)|random_states_\d+\.pkl|"
                             r"scaler\.pt|run_state\.json|(pytorch_model_fsdp|optimizer)_\d+/[\w.]+")
_STATE_TYPES = {"step": int, "epoch": int, "batch_in_epoch": int, "samples": int, "train_seconds": (int, float),
                "best_metrics": dict, "early_stopping": dict, "config": dict, "files": dict, "max_steps": int}


def read_checkpoint(folder: Path) -> dict[str, Any]:
    """A checkpoint's run state, once its files are all listed and unchanged and its RNG states load without pickle."""
    folder, fix = Path(folder), (f"resume from an earlier checkpoint (--resume {Path(folder).parent}/step-N), or start "
                                 "afresh with --overwrite")
    path = folder / RUN_STATE
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:
        raise CheckpointError(str(path), type(exc).__name__, f"cannot be read: {exc}", fix) from None
    wrong = [k for k, kind in _STATE_TYPES.items() if not isinstance(state, dict) or not isinstance(state.get(k), kind)
             or isinstance(state.get(k), bool)]
    if wrong:
        raise CheckpointError(field=str(path), value=wrong, problem="lacks these entries, or they have the wrong type "
                              f"(expected {', '.join(f'{k}: {_STATE_TYPES[k]}' for k in wrong)})", fix=fix)
    for rel in files_under(folder):  # links to folders included
        if (folder / rel).is_symlink() or not CHECKPOINT_FILE.fullmatch(rel):
            raise CheckpointError(str(folder / rel), None, "is not part of an adaptkit checkpoint", fix)
    for rel, expected in state["files"].items():
        file = folder / str(rel)
        if not CHECKPOINT_FILE.fullmatch(str(rel)) or not file.is_file():
            raise CheckpointError(field=str(file), value=None, problem="is missing from the checkpoint", fix=fix)
        if digest(file) != expected:
            raise CheckpointError(str(file), f"{file.stat().st_size} bytes", "changed since the checkpoint was written "
                                  "(truncated or damaged)", fix)
    for file in sorted(folder.glob("random_states_*.pkl")):
        try:
            load(file)  # accelerate.utils.load: torch.load(weights_only=True) with numpy's RNG arrays
        except Exception as exc:  # truncated, or a pickle that would run code (refused by weights_only=True)
            raise CheckpointError(field=str(file), value=f"{file.stat().st_size} bytes", problem=f"cannot be loaded "
                                  f"safely ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})", fix=fix) from None
    return state


def remove_owned(folder: Path, listing: dict[str, str | None]) -> None:
    """Delete the files of ``listing`` (rel path -> sha256, or None: ours by name) that still hold what adaptkit wrote,
    then the emptied folders; nothing outside ``folder``, nothing through a link."""
    folder, emptied = Path(folder), set()
    if folder.is_symlink() or not folder.is_dir():
        return
    for rel, expected in listing.items():
        path = folder / rel
        if path.resolve().is_relative_to(folder.resolve()) and path.is_file() and not path.is_symlink() \
                and expected in (None, digest(path)):
            path.unlink()
            emptied.update(p for p in path.parents if p.is_relative_to(folder))
    for empty in sorted(emptied, key=lambda p: -len(p.parts)):
        if empty.is_dir() and not empty.is_symlink() and not any(empty.iterdir()):
            empty.rmdir()


def data_fingerprint(run: RunArgs) -> dict[str, str]:
    """sha256 of each local data file (a folder: its files), kept in each checkpoint: resume refuses changed data."""
    out: dict[str, str] = {}
    for source in (run.flags[k] for k in ("data", "train_file", "validation_file", "test_file") if run.flags.get(k)):
        path = Path(str(source)).expanduser().resolve()  # ./data/ds and data/ds are one file
        files = [path] if path.is_file() else [path / rel for rel in files_under(path)]
        out.update({str(file): h for file in files if (h := digest(file.resolve()))})  # links followed: into a cache
    return out
