"""Checkpoints a recipe can resume from exactly, and nothing in them that can run code.

* :func:`adapter_only` makes ``save_state`` write the tensors that train, not the whole model.
* :func:`checkpoint` writes ``save_state`` (weights, optimizer, scheduler, every process's RNG states) into a temporary
  folder, then ``run_state.json`` (the position in the run, as JSON: the flags, the data's checksums and every file's),
  renames it into place, and drops the oldest beyond ``--keep-checkpoints``, deleting only the files it listed.
* :func:`resume` refuses a damaged or foreign checkpoint and changed flags or data (a higher --max-steps or --epochs
  extends the run), then ``load_state``. Nothing is registered with ``register_for_checkpointing``: Accelerate
  restores those objects through pickle with ``weights_only=False``.
"""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file

from adaptkit.errors import AdaptkitError, CheckpointError, ConfigError
from adaptkit.folders import replace_dir, write_json
from adaptkit.recipes import guards
from adaptkit.recipes.training import CHECKPOINTS, LOG_FILE, RUN_STATE, RunArgs

if TYPE_CHECKING:  # the type only: runs imports this module
    from adaptkit.recipes.runs import Progress

# Flags that may change between a run and its resumption; every other flag must match, or the resumed run would
# silently train something else than the interrupted one. max_steps / epochs may grow (the run is extended).
_RESUMABLE_CHANGES = {"output_dir", "resume", "overwrite", "log_every", "checkpoint_every", "keep_checkpoints",
                      "processes", "report_to", "max_steps", "epochs"}


def adapter_only(accelerator) -> None:
    """Make ``accelerator.save_state`` write only the tensors that train (plus buffers, which a frozen base can still
    update, e.g. batch-norm statistics) and ``load_state`` put them back, refusing a checkpoint that lacks any.
    Whole models (full fine-tuning) are saved whole; FSDP and DeepSpeed save their own way."""
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
            raise CheckpointError(field=str(path), value=type(exc).__name__, problem=f"cannot be read: {exc}",
                                  fix="resume from an earlier checkpoint, or start afresh with --overwrite") from None
        unexpected = model.load_state_dict(saved, strict=False).unexpected_keys
        state = model.state_dict()
        covered = {state[k].data_ptr() for k in saved if k in state}  # shared tensors are written once
        lost = sorted(k for k in _kept_names(model, state) if state[k].data_ptr() not in covered)
        if unexpected or lost:
            raise ConfigError(field="--resume", value=str(path), problem=f"the checkpoint does not hold this model's "
                              f"trained tensors (missing {lost[:3]}, unexpected {sorted(unexpected)[:3]})",
                              fix="resume with the strategy and options the checkpoint was written with")
    models.clear()  # loaded here; accelerate would load them strictly, as whole models


def latest_checkpoint(output_dir: Path) -> Path | None:
    """The newest complete checkpoint (complete = has run_state.json; temporary folders start with '.')."""
    folder = Path(output_dir) / CHECKPOINTS
    done = [p for p in folder.glob("step-*") if re.fullmatch(r"step-\d+", p.name) and (p / RUN_STATE).is_file()] \
        if folder.is_dir() else []
    return max(done, key=lambda p: int(p.name.split("-")[1]), default=None)


def resume(accelerator, run: RunArgs, progress: Progress) -> None:
    """``--resume``: refuse a damaged checkpoint and changed flags or data, then ``load_state`` and the position."""
    if run.resume is None:
        return
    path = latest_checkpoint(run.output_dir) if run.resume == "latest" else Path(run.resume).expanduser()
    if path is None or not (path / RUN_STATE).is_file():
        raise ConfigError(field="--resume", value=str(path or run.output_dir / CHECKPOINTS),
                          problem="no complete checkpoint there",
                          fix="point --resume at a checkpoints/step-N folder, or drop --resume to start afresh")
    state = guards.read_checkpoint(path, RUN_STATE)
    saved, now = state["config"], run.config(accelerator.num_processes)
    changed = sorted(k for k in set(saved) | set(now) if k not in _RESUMABLE_CHANGES and saved.get(k) != now.get(k))
    if progress.max_steps < state["max_steps"]:  # fewer steps than the run planned: another schedule
        changed += [k for k in ("max_steps", "epochs") if saved.get(k) != now.get(k)] or ["max_steps"]
    if changed:
        raise ConfigError(field="--resume", value={k: [saved.get(k), now.get(k)] for k in changed},
                          problem="these flags differ from the interrupted run (was, now); only a higher --max-steps "
                                  "or --epochs may change", fix="resume with the same flags, or start a new run in "
                                                                "another --output-dir")
    guards.check_same_data(state.get("data"), data_fingerprint(run))
    try:
        accelerator.load_state(str(path))
    except AdaptkitError:
        raise
    except (RuntimeError, OSError, EOFError, ValueError, KeyError, TypeError, pickle.UnpicklingError) as exc:
        raise CheckpointError(field=str(path), value=type(exc).__name__, problem=f"cannot be loaded: "
                              f"{str(exc).splitlines()[0][:200]}", fix="resume from an earlier checkpoint, or start "
                                                                       "afresh with --overwrite") from None
    try:
        progress.load_state_dict(state)
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(field=str(path / RUN_STATE), value=repr(exc), problem="holds a malformed position",
                              fix="resume from an earlier checkpoint, or start afresh with --overwrite") from None
    if progress.max_steps > state["max_steps"]:
        progress.notes.append(f"--resume: extended from {state['max_steps']} to {progress.max_steps} optimizer steps; "
                              "the learning-rate schedule is laid out over the new total from here on")
    if accelerator.is_main_process:  # lines logged after the checkpoint are logged again by this run
        log = run.output_dir / LOG_FILE
        if log.is_file() and not log.is_symlink():
            lines = log.read_text(encoding="utf-8").splitlines(keepends=True)
            tmp = log.with_name(f".{LOG_FILE}.tmp")
            tmp.write_text("".join(line for line in lines if _step(line) <= progress.step), encoding="utf-8")
            tmp.replace(log)
    accelerator.print(f"resumed from {path} at step {progress.step}", *progress.notes[-1:], sep="\n")


def _step(line: str) -> float:
    try:
        return float(json.loads(line).get("step") or 0)
    except (ValueError, AttributeError):
        return float("inf")  # a torn last line of a killed run


def checkpoint(accelerator, run: RunArgs, progress: Progress) -> Path:
    """Save everything needed to continue exactly from here; atomic (temporary folder, then rename)."""
    folder = run.output_dir / CHECKPOINTS
    final, tmp = folder / f"step-{progress.step:07d}", folder / f".tmp-step-{progress.step:07d}"
    with progress.paused():
        if accelerator.is_main_process:
            guards.remove_owned(tmp, guards.checkpoint_files(tmp))
            tmp.mkdir(parents=True, exist_ok=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp))  # every process writes its own RNG states
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            # the position, readable; the flags, the data's checksums and every file's, checked before resume loads
            write_json(tmp / RUN_STATE, {**progress.state_dict(), "config": run.config(accelerator.num_processes),
                                         "data": data_fingerprint(run), "files": guards.digests(tmp, skip=[RUN_STATE])})
            replace_dir(tmp, final)
            old = sorted((p for p in folder.glob("step-*") if p != final and (p / RUN_STATE).is_file()), key=lambda p: p.name)
            for stale in old[: max(0, len(old) - run.keep_checkpoints + 1)]:
                remove_checkpoint(stale)
        accelerator.wait_for_everyone()
    return final


def remove_checkpoint(folder: Path) -> None:
    """Delete the files a checkpoint's run_state.json lists (if unchanged), then run_state.json: a user's file stays."""
    try:
        listed = json.loads((folder / RUN_STATE).read_text(encoding="utf-8")).get("files")
    except (OSError, ValueError, AttributeError):
        return
    if isinstance(listed, dict):
        guards.remove_owned(folder, {k: v for k, v in listed.items() if guards.CHECKPOINT_FILE.fullmatch(str(k))})
        guards.remove_owned(folder, {RUN_STATE: None})


def data_fingerprint(run: RunArgs) -> dict[str, str]:
    """Checksums of the local data files, kept in each checkpoint: a resume on changed data is refused."""
    return guards.data_fingerprint(run.flags.get(k) for k in ("data", "train_file", "validation_file", "test_file"))

