"""Checkpoints a recipe can resume from exactly: what they hold, how they are written, how a resume is checked.

* :func:`checkpoint` writes ``save_state`` (only the tensors that train: :func:`adapter_only_checkpoints`,
  plus optimizer, scheduler, RNG states and the registered ``runs.Progress``) into a temporary folder, then
  ``run_state.json`` (the flags, the data's checksums and every file's), then renames it into place and drops
  the oldest beyond ``--keep-checkpoints``: a crash while saving never leaves a checkpoint that looks complete,
  nor deletes the last good one first (Accelerate's ``automatic_checkpoint_naming`` + ``total_limit`` deletes
  before it saves).
* :func:`resume` refuses a damaged checkpoint, flags that differ from the interrupted run's and changed data,
  then ``load_state``.
"""

from __future__ import annotations

import argparse
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from adaptkit.errors import ConfigError
from adaptkit.folders import write_json
from adaptkit.recipes import guards
from adaptkit.recipes.training import CHECKPOINTS, RUN_STATE

if TYPE_CHECKING:  # the type only: runs imports this module
    from adaptkit.recipes.runs import Progress

# Flags that may change between a run and its resumption; every other flag must match, or the
# resumed run would silently train something else than the interrupted one.
_RESUMABLE_CHANGES = {"output_dir", "resume", "overwrite", "log_every", "checkpoint_every", "keep_checkpoints",
                      "processes", "report_to"}

def adapter_only_checkpoints(accelerator) -> None:
    """Make ``accelerator.save_state`` write only the tensors that train (plus buffers, which a frozen
    base can still update, e.g. batch-norm statistics) instead of the whole model, and ``load_state``
    put them back, refusing a checkpoint that lacks any of them. Whole models (full fine-tuning) are
    saved whole. FSDP and DeepSpeed save their own way and pass through untouched."""
    if getattr(accelerator, "_adaptkit_adapter_only", False):
        return
    accelerator._adaptkit_adapter_only = True
    accelerator.register_save_state_pre_hook(_keep_trained)
    accelerator.register_load_state_pre_hook(_load_trained)


def _kept_names(model: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> set[str]:
    trained = {p.data_ptr() for p in model.parameters() if p.requires_grad}
    buffers = {name for name, _ in model.named_buffers()}
    return {k for k, v in state.items() if v.data_ptr() in trained or k in buffers}


def _keep_trained(models: list, weights: list, output_dir: str) -> None:
    for i, (model, state) in enumerate(zip(models, weights)):
        if any(not p.requires_grad for p in model.parameters()):
            weights[i] = {k: v for k, v in state.items() if k in _kept_names(model, state)}


def _load_trained(models: list, input_dir: str) -> None:
    from safetensors.torch import load_file
    for i, model in enumerate(models):
        path = Path(input_dir) / f"model{f'_{i}' if i else ''}.safetensors"
        saved = load_file(str(path), device=str(next(model.parameters()).device))
        unexpected = model.load_state_dict(saved, strict=False).unexpected_keys
        state = model.state_dict()
        covered = {state[k].data_ptr() for k in saved if k in state}  # shared tensors are written once
        lost = sorted(k for k in _kept_names(model, state) if state[k].data_ptr() not in covered)
        if unexpected or lost:
            raise ConfigError(field="--resume", value=str(path),
                              problem=f"the checkpoint does not hold this model's trained tensors (missing "
                                      f"{lost[:3]}, unexpected {sorted(unexpected)[:3]})",
                              fix="resume with the strategy and options the checkpoint was written with")
    models.clear()  # loaded here; accelerate would load them strictly, as whole models


def latest_checkpoint(output_dir: Path) -> Path | None:
    """The newest complete checkpoint (complete = has run_state.json; temporary folders start with '.')."""
    folder = Path(output_dir) / CHECKPOINTS
    done = [p for p in folder.glob("step-*") if (p / RUN_STATE).is_file()] if folder.is_dir() else []
    return max(done, key=lambda p: int(p.name.split("-")[1]), default=None)



def run_config(args: argparse.Namespace, accelerator) -> dict[str, Any]:
    """The flags (and process count) a run was started with; a resumed run must match them."""
    flags = {k: (str(v) if isinstance(v, Path) else v) for k, v in sorted(vars(args).items())}
    return {**flags, "num_processes": accelerator.num_processes}


def resume(accelerator, args: argparse.Namespace, progress: Progress) -> None:
    """``--resume``: refuse changed flags, then ``load_state`` (model, optimizer, scheduler, RNGs, Progress)."""
    if args.resume is None:
        return
    path = latest_checkpoint(args.output_dir) if args.resume == "latest" else Path(args.resume)
    if path is None or not (path / RUN_STATE).is_file():
        raise ConfigError(field="--resume", value=str(path or Path(args.output_dir) / CHECKPOINTS),
                          problem="no complete checkpoint there",
                          fix="point --resume at a checkpoints/step-N folder, or drop --resume to start afresh")
    state = guards.read_checkpoint(path, RUN_STATE)  # refuses a damaged checkpoint (checksums of its files)
    saved, now = state["config"], run_config(args, accelerator)
    changed = sorted(k for k in set(saved) | set(now) if k not in _RESUMABLE_CHANGES and saved.get(k) != now.get(k))
    if changed:
        raise ConfigError(field="--resume", value={k: [saved.get(k), now.get(k)] for k in changed},
                          problem="these flags differ from the interrupted run (was, now)",
                          fix="resume with the same flags, or start a new run in another --output-dir")
    guards.check_same_data(state.get("data"), data_fingerprint(args))
    accelerator.load_state(str(path))
    accelerator.print(f"resumed from {path} at step {progress.step}")


def checkpoint(accelerator, args: argparse.Namespace, progress: Progress) -> Path:
    """Save everything needed to continue exactly from here; atomic (temporary folder, then rename)."""
    from adaptkit.folders import replace_dir
    folder = Path(args.output_dir) / CHECKPOINTS
    final, tmp = folder / f"step-{progress.step:07d}", folder / f".tmp-step-{progress.step:07d}"
    with progress.paused():
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp))  # every process writes its own RNG states
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            # the position again, readable (load_state restores it from the registered Progress), the flags, the
            # data's checksums and every file's, which resume checks before it loads anything
            write_json(tmp / RUN_STATE, {**progress.state_dict(), "config": run_config(args, accelerator),
                                         "data": data_fingerprint(args), "files": guards.digests(tmp, skip=[RUN_STATE])})
            replace_dir(tmp, final)
            old = sorted((p for p in folder.glob("step-*") if p != final), key=lambda p: p.name)
            for stale in old[: max(0, len(old) - args.keep_checkpoints + 1)]:
                shutil.rmtree(stale, ignore_errors=True)
        accelerator.wait_for_everyone()
    return final


def data_fingerprint(args: argparse.Namespace) -> dict[str, str]:
    """Checksums of the local data files, kept in each checkpoint: a resume on changed data is refused."""
    return guards.data_fingerprint(getattr(args, key, None) for key in ("data", "train_file", "validation_file",
                                                                      "test_file"))
