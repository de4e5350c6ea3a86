"""What a recipe's loop needs that Accelerate lacks: the output-folder claim, the run's position, checkpoints that
resume exactly and hold nothing that runs code, the log, the adapter kept, metrics.json. The loop itself stays in
each recipe, where it can be read."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import resource
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch
from accelerate import skip_first_batches
from accelerate.utils import load
from filelock import FileLock, Timeout
from safetensors.torch import load_file
from tqdm.auto import tqdm

from adaptkit import card
from adaptkit.distributed import save_adapter as save_on_every_process
from adaptkit.errors import AdaptkitError, CheckpointError, ConfigError, RunLockedError
from adaptkit.folders import replace_dir, write_json
from adaptkit.recipes import guards
from adaptkit.recipes.training import (ADAPTER_DIR, CHECKPOINTS, LOCK_NAME, LOG_FILE, MANIFEST, METRICS_FILE, RUN_STATE,
                                       TENSORBOARD_DIR, RunArgs, learning_rate)
from adaptkit.versions import installed


# ---- the output folder -----------------------------------------------------------------------------------
def claim_output_dir(accelerator, run: RunArgs) -> FileLock | None:
    """Lock ``--output-dir`` (the OS drops it even on SIGKILL); with --overwrite, delete what the earlier run wrote."""
    lock = lock_folder(run.output_dir, "--output-dir") if accelerator.is_main_process else None
    if lock is not None and run.overwrite:
        _remove_earlier_run(run.output_dir)
    accelerator.wait_for_everyone()
    return lock


def lock_folder(folder: Path, flag: str) -> FileLock:
    """Create ``folder`` and hold it for this run; a second run on it is refused, naming the holder's pid."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(flag, str(folder), f"cannot be created ({err.strerror})", "pass a writable folder") from None
    if (folder / LOCK_NAME).is_symlink():
        raise ConfigError(flag, str(folder), f"its {LOCK_NAME} is a link", "remove it, or pass another folder")
    # one instance per path in this process: a later run in it takes over from an earlier one that raised
    lock = FileLock(folder / LOCK_NAME, timeout=0, is_singleton=True, on_acquired=_write_pid)
    try:
        lock.acquire()
    except Timeout:
        holder = (folder / LOCK_NAME).read_text(errors="replace").strip() or "another process"
        raise RunLockedError(flag, str(folder), f"is in use by a run ({holder})",
                             "wait for that run to finish, or pass another folder") from None
    return lock


def _write_pid(fd: int) -> None:
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()}\n".encode())


def _remove_earlier_run(out: Path) -> None:
    """--overwrite: delete only what the earlier run listed or named as its own; a user's files stay."""
    for step in sorted((out / CHECKPOINTS).glob("*step-*")) if (out / CHECKPOINTS).is_dir() else []:
        if not re.fullmatch(r"(\.tmp-)?step-\d+", step.name):
            continue  # a user's folder
        if (step / RUN_STATE).is_file():
            remove_checkpoint(step)
        else:  # the temporary folder of a killed checkpoint: Accelerate's files by name
            remove_owned(step, checkpoint_files(step))
    remove_owned(out / ADAPTER_DIR, _manifest(out))
    events = (out / TENSORBOARD_DIR).rglob("events.out.tfevents.*") if (out / TENSORBOARD_DIR).is_dir() else []
    remove_owned(out / TENSORBOARD_DIR, {str(p.relative_to(out / TENSORBOARD_DIR)): None for p in events})
    remove_owned(out, {METRICS_FILE: None, LOG_FILE: None, MANIFEST: None})


def _manifest(out: Path) -> dict[str, str]:
    """The adapter files the last save wrote (rel path -> sha256)."""
    try:
        data = json.loads((out / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return {}
    files = data.get(ADAPTER_DIR) if isinstance(data, dict) else None
    return {str(k): str(v) for k, v in files.items()} if isinstance(files, dict) else {}


def save_adapter(accelerator, model, run: RunArgs, step: int) -> None:
    """Save into --output-dir/adapter (every process: FSDP gathers) and list what it wrote for --overwrite."""
    guards.check_finite_weights(accelerator.unwrap_model(model), step)  # a NaN is never "best"
    adapter = run.output_dir / ADAPTER_DIR
    before = digests(adapter) if accelerator.is_main_process and adapter.is_dir() else {}
    save_on_every_process(accelerator, model, adapter)
    if accelerator.is_main_process:
        ours = _manifest(run.output_dir)
        written = {rel: h for rel, h in digests(adapter).items() if before.get(rel) != h or ours.get(rel) == h}
        write_json(run.output_dir / MANIFEST, {ADAPTER_DIR: written})


def keep_adapter(accelerator, model, run: RunArgs, progress: Progress) -> None:
    """When no evaluation improved (NaN each time), keep the last weights. Decided from state every process shares,
    not from a file: a save is a collective, and on two machines only one sees the folder."""
    if progress.stopper.best_step is not None:
        return
    accelerator.print(f"no evaluation improved on validation ({progress.metric} was NaN each time): "
                      f"the adapter kept is the last weights, step {progress.step}")
    save_adapter(accelerator, model, run, progress.step)


# ---- the run's position ------------------------------------------------------------------------------------
class EarlyStopping:
    """Counts evaluations without improvement; NaN (e.g. a correlation of constant predictions) never improves."""

    def __init__(self, patience: int, higher_is_better: bool):
        self.patience, self.higher_is_better = patience, higher_is_better
        self.best: float | None = None
        self.best_step: int | None = None
        self.bad_evals = 0

    def update(self, value: float, step: int) -> bool:
        better = not math.isnan(value) and (
            self.best is None or (value > self.best if self.higher_is_better else value < self.best))
        if better:
            self.best, self.best_step, self.bad_evals = float(value), step, 0
        else:
            self.bad_evals += 1
        return better

    @property
    def should_stop(self) -> bool:
        return self.patience > 0 and self.bad_evals >= self.patience


class Progress:
    """Where a run is (step, epoch, batch, samples, seconds, early stopping); saved as JSON in each checkpoint."""

    def __init__(self, run: RunArgs, accelerator, max_steps: int, batches_per_epoch: int, metric: tuple[str, bool]):
        self.accelerator, self.max_steps, self.batches_per_epoch = accelerator, max_steps, batches_per_epoch
        self.metric, higher = metric
        self.stopper = EarlyStopping(run.patience, higher)
        self.step = self.epoch = self.batch_in_epoch = self.samples = 0
        self.train_seconds, self.epoch_end, self.stopped_early = 0.0, False, False
        self.best_metrics: dict[str, float] = {}
        self.last_metrics: dict[str, float] = {}  # what the last weights scored: the kept ones if none was best
        self.constant_steps: list[int] = []  # evaluations whose predictions collapsed (guards.constant_output)
        self.notes: list[str] = []
        self._loss = [0.0, 0]  # sum and count of micro-batch losses since the last log line
        self._clock: float | None = None
        self._started = time.perf_counter()

    @property
    def done(self) -> bool:
        return self.stopped_early or self.step >= self.max_steps

    def epoch_batches(self, loader) -> Iterator[Any]:
        """This epoch's micro-batches, skipping those a resumed run already trained on."""
        loader.set_epoch(self.epoch)  # reseeds shuffling: epoch e always sees the same order
        source = skip_first_batches(loader, self.batch_in_epoch) if self.batch_in_epoch else loader
        # bank the time since the last pause before restarting the clock (an epoch may end without an evaluation)
        self.train_seconds, self._clock = self.seconds(), time.perf_counter()
        for batch in _rng_neutral(source):
            self.batch_in_epoch += 1
            self.samples += _batch_len(batch) * self.accelerator.num_processes
            yield batch

    def optimizer_step(self, loss: torch.Tensor) -> bool:
        """Count one micro-batch; True when it completed an optimizer step."""
        value = float(loss.detach())
        guards.check_finite_loss(value, self.step + 1)  # a NaN or inf loss stops the run, naming the step
        self._loss[0] += value
        self._loss[1] += 1
        if not self.accelerator.sync_gradients:
            return False
        self.step += 1
        self.epoch_end = self.batch_in_epoch >= self.batches_per_epoch
        if self.epoch_end:  # roll over now, so a checkpoint taken here resumes at the next epoch's start
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0
        return True

    def due(self, every: int) -> bool:
        """Every ``every`` steps (0: at each epoch's end), and at the last step."""
        return (every and self.step % every == 0) or (not every and self.epoch_end) or self.step >= self.max_steps

    def mean_loss(self) -> float:
        totals = self.accelerator.reduce(torch.tensor(self._loss, device=self.accelerator.device), reduction="sum")
        self._loss = [0.0, 0]
        return (totals[0] / totals[1]).item()

    def improved(self, scores: dict[str, float]) -> bool:
        """Record an evaluation; True when it is the best so far (keep this adapter)."""
        if self.metric not in scores:
            raise ConfigError("metric", self.metric, f"not among the results {sorted(scores)}", "watch one of them")
        self.last_metrics = {k: float(v) for k, v in scores.items()}
        if guards.constant_output(scores):
            self.constant_steps.append(self.step)
        better = self.stopper.update(float(scores[self.metric]), self.step)
        if better:
            self.best_metrics = dict(self.last_metrics)
        return better

    def kept_metrics(self) -> dict[str, float]:
        return self.best_metrics or self.last_metrics

    @contextlib.contextmanager
    def paused(self):
        running = self._clock is not None
        self.train_seconds, self._clock = self.seconds(), None
        try:
            yield
        finally:
            if running:
                self._clock = time.perf_counter()

    def seconds(self) -> float:
        return self.train_seconds + (time.perf_counter() - self._clock if self._clock is not None else 0.0)

    def state_dict(self) -> dict[str, Any]:
        s = self.stopper
        return {"step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch, "samples": self.samples,
                "train_seconds": self.seconds(), "max_steps": self.max_steps, "best_metrics": self.best_metrics,
                "last_metrics": self.last_metrics, "constant_steps": self.constant_steps,
                "early_stopping": {"best": s.best, "best_step": s.best_step, "bad_evals": s.bad_evals}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.epoch, self.batch_in_epoch = int(state["step"]), int(state["epoch"]), int(state["batch_in_epoch"])
        self.samples, self.train_seconds = int(state["samples"]), float(state["train_seconds"])
        self.best_metrics, self.last_metrics = dict(state["best_metrics"]), dict(state["last_metrics"])
        self.constant_steps = [int(step) for step in state["constant_steps"]]
        stop = state["early_stopping"]
        self.stopper.best, self.stopper.best_step, self.stopper.bad_evals = stop["best"], stop["best_step"], int(stop["bad_evals"])


# ---- checkpoints and --resume -----------------------------------------------------------------------------
# Flags that may change between a run and its resumption; every other flag must match, or the resumed run would
# silently train something else than the interrupted one. max_steps / epochs may grow (the run is extended).
_RESUMABLE_CHANGES = {"output_dir", "resume", "overwrite", "log_every", "checkpoint_every", "keep_checkpoints",
                      "processes", "report_to", "max_steps", "epochs"}


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
            raise CheckpointError(str(path), type(exc).__name__, f"cannot be read: {exc}",
                                  "resume from an earlier checkpoint, or start afresh with --overwrite") from None
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
    folder = Path(output_dir) / CHECKPOINTS
    done = [p for p in folder.glob("step-*") if re.fullmatch(r"step-\d+", p.name) and (p / RUN_STATE).is_file()] \
        if folder.is_dir() else []
    return max(done, key=lambda p: int(p.name.split("-")[1]), default=None)


def resume(accelerator, run: RunArgs, progress: Progress) -> None:
    """--resume: refuse a damaged checkpoint and changed flags or data, then ``load_state`` and the position. Nothing is
    registered with ``register_for_checkpointing``: Accelerate restores those through pickle."""
    if run.resume is None:
        return
    path = latest_checkpoint(run.output_dir) if run.resume == "latest" else Path(run.resume).expanduser()
    if path is None or not (path / RUN_STATE).is_file():
        raise ConfigError("--resume", str(path or run.output_dir / CHECKPOINTS), "no complete checkpoint there",
                          "point --resume at a checkpoints/step-N folder, or drop --resume to start afresh")
    state = read_checkpoint(path, RUN_STATE)
    saved, now = state["config"], run.config(accelerator.num_processes)
    changed = sorted(k for k in set(saved) | set(now) if k not in _RESUMABLE_CHANGES and saved.get(k) != now.get(k))
    if progress.max_steps < state["max_steps"]:  # fewer steps than the run planned: another schedule
        changed += [k for k in ("max_steps", "epochs") if saved.get(k) != now.get(k)] or ["max_steps"]
    if changed:
        raise ConfigError("--resume", {k: [saved.get(k), now.get(k)] for k in changed}, "these flags differ from the "
                          "interrupted run (was, now); only a higher --max-steps or --epochs may change",
                          "resume with the same flags, or start a new run in another --output-dir")
    check_same_data(state.get("data"), data_fingerprint(run))
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
        raise CheckpointError(str(path / RUN_STATE), repr(exc), "holds a malformed position",
                              "resume from an earlier checkpoint, or start afresh with --overwrite") from None
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
    """``save_state`` and run_state.json (position, flags, data and file checksums) into a temporary folder, renamed
    into place; the oldest beyond --keep-checkpoints go, and only the files they listed."""
    folder = run.output_dir / CHECKPOINTS
    final, tmp = folder / f"step-{progress.step:07d}", folder / f".tmp-step-{progress.step:07d}"
    with progress.paused():
        if accelerator.is_main_process:
            remove_owned(tmp, checkpoint_files(tmp))
            tmp.mkdir(parents=True, exist_ok=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp))  # every process writes its own RNG states
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            # the position, readable; the flags, the data's checksums and every file's, checked before resume loads
            write_json(tmp / RUN_STATE, {**progress.state_dict(), "config": run.config(accelerator.num_processes),
                                         "data": data_fingerprint(run), "files": digests(tmp, skip=[RUN_STATE])})
            replace_dir(tmp, final)
            old = sorted((p for p in folder.glob("step-*") if p != final and (p / RUN_STATE).is_file()), key=lambda p: p.name)
            for stale in old[: max(0, len(old) - run.keep_checkpoints + 1)]:
                remove_checkpoint(stale)
        accelerator.wait_for_everyone()
    return final


def remove_checkpoint(folder: Path) -> None:
    """Delete the files a checkpoint lists (if unchanged), then run_state.json: a user's file stays."""
    try:
        listed = json.loads((folder / RUN_STATE).read_text(encoding="utf-8")).get("files")
    except (OSError, ValueError, AttributeError):
        return
    if isinstance(listed, dict):
        remove_owned(folder, {k: v for k, v in listed.items() if CHECKPOINT_FILE.fullmatch(str(k))})
        remove_owned(folder, {RUN_STATE: None})


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def digests(folder: Path, skip: Iterable[str] = ()) -> dict[str, str]:
    folder, skip = Path(folder), set(skip)
    return {p.relative_to(folder).as_posix(): _sha256(p) for p in sorted(folder.rglob("*"))
            if p.is_file() and p.relative_to(folder).as_posix() not in skip}


# What save_state writes (read back with weights_only=True; FSDP's sharded folders are guarded by the digests) and
# run_state.json; never custom_checkpoint_N.pkl, which Accelerate unpickles with weights_only=False.
CHECKPOINT_FILE = re.compile(r"(model|optimizer|scheduler|sampler)(_\d+)?\.(safetensors|bin)|random_states_\d+\.pkl|"
                             r"scaler\.pt|run_state\.json|(pytorch_model_fsdp|optimizer)_\d+/[\w.]+")
_CHECKPOINT_DIR = re.compile(r"(pytorch_model_fsdp|optimizer)_\d+")
_STATE_TYPES = {"step": int, "epoch": int, "batch_in_epoch": int, "samples": int, "train_seconds": (int, float),
                "best_metrics": dict, "early_stopping": dict, "config": dict, "files": dict, "max_steps": int}


def read_checkpoint(folder: Path, state_name: str) -> dict[str, Any]:
    """A checkpoint's run state, once its files are all listed and unchanged and its RNG states load without pickle's
    code execution (Accelerate swallows an unreadable RNG state and resumes on other random numbers)."""
    folder, fix = Path(folder), (f"resume from an earlier checkpoint (--resume {Path(folder).parent}/step-N), or start "
                                 "afresh with --overwrite")
    path = folder / state_name
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:
        raise CheckpointError(field=str(path), value=type(exc).__name__, problem=f"cannot be read: {exc}", fix=fix) from None
    wrong = [k for k, kind in _STATE_TYPES.items() if not isinstance(state, dict) or not isinstance(state.get(k), kind)
             or isinstance(state.get(k), bool)]
    if wrong:
        raise CheckpointError(field=str(path), value=wrong, problem="lacks these entries, or they have the wrong type "
                              f"(expected {', '.join(f'{k}: {_STATE_TYPES[k]}' for k in wrong)})", fix=fix)
    for file in sorted(folder.rglob("*")):
        rel = file.relative_to(folder).as_posix()
        if file.is_symlink() or not (_CHECKPOINT_DIR if file.is_dir() else CHECKPOINT_FILE).fullmatch(rel):
            raise CheckpointError(str(file), None, "is not part of an adaptkit checkpoint", fix)
    for rel, expected in state["files"].items():
        file = folder / str(rel)
        if not CHECKPOINT_FILE.fullmatch(str(rel)) or not file.is_file():
            raise CheckpointError(field=str(file), value=None, problem="is missing from the checkpoint", fix=fix)
        if _sha256(file) != expected:
            raise CheckpointError(str(file), f"{file.stat().st_size} bytes", "changed since the checkpoint was written "
                                  "(truncated or damaged)", fix)
    for file in sorted(folder.glob("random_states_*.pkl")):
        try:
            load(file)  # accelerate.utils.load: torch.load(weights_only=True) with numpy's RNG arrays
        except Exception as exc:  # truncated, or a pickle that would run code (refused by weights_only=True)
            raise CheckpointError(field=str(file), value=f"{file.stat().st_size} bytes", problem=f"cannot be loaded "
                                  f"safely ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})", fix=fix) from None
    return state


def checkpoint_files(folder: Path) -> dict[str, None]:
    """A killed checkpoint's files (unlisted): those named as save_state names them."""
    rels = (p.relative_to(folder).as_posix() for p in Path(folder).rglob("*")) if Path(folder).is_dir() else ()
    return {rel: None for rel in rels if CHECKPOINT_FILE.fullmatch(rel)}


def remove_owned(folder: Path, listing: dict[str, str | None]) -> None:
    """Delete the files of ``listing`` (rel path -> sha256, or None: ours by name) that still hold what adaptkit wrote,
    then the emptied folders; nothing outside ``folder``, nothing through a link."""
    folder, emptied = Path(folder), set()
    if folder.is_symlink() or not folder.is_dir():
        return
    for rel, digest in listing.items():
        path = folder / rel
        if path.resolve().is_relative_to(folder.resolve()) and path.is_file() and not path.is_symlink() \
                and digest in (None, _sha256(path)):
            path.unlink()
            emptied.update(p for p in path.parents if p.is_relative_to(folder))
    for empty in sorted(emptied, key=lambda p: -len(p.parts)):
        if empty.is_dir() and not empty.is_symlink() and not any(empty.iterdir()):
            empty.rmdir()


def data_fingerprint(run: RunArgs) -> dict[str, str]:
    """sha256 of each local data file (a folder: its files), kept in each checkpoint: resume refuses changed data."""
    out: dict[str, str] = {}
    for source in (run.flags.get(k) for k in ("data", "train_file", "validation_file", "test_file")):
        if source is None:
            continue
        path = Path(os.path.expanduser(str(source))).resolve()  # ./data/ds and data/ds are one file
        if path.is_file():
            out[str(path)] = _sha256(path)
        elif path.is_dir():
            out.update({str(path / rel): h for rel, h in digests(path).items()})
    return out


def check_same_data(saved: dict[str, str] | None, now: dict[str, str]) -> None:
    if saved is None:  # a checkpoint from before fingerprints were kept
        return
    changed = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
    if changed:
        raise CheckpointError("--resume", changed[:3], "the data changed since the interrupted run started (checksums "
                              "differ)", "restore the data files, or start a new run")


# ---- the log and the end of a run ---------------------------------------------------------------------------
class Log:
    """A progress bar and a console line per evaluation beside ``accelerator.log``."""

    def __init__(self, accelerator, run: RunArgs, progress: Progress):
        self.accelerator, self.run, self.progress = accelerator, run, progress
        flags = run.config(accelerator.num_processes)
        accelerator.init_trackers(run.recipe, config={k: v if isinstance(v, (int, float, str, bool)) else str(v)
                                                      for k, v in flags.items()})
        self.bar = tqdm(total=progress.max_steps, initial=progress.step, desc="train", dynamic_ncols=True,
                        disable=not accelerator.is_local_main_process)

    def step(self, optimizer) -> None:
        """After each optimizer step: the bar, and a loss line every --log-every steps and at the last."""
        self.bar.update(1)
        if self.progress.step % self.run.log_every == 0 or self.progress.step >= self.progress.max_steps:
            loss = self.progress.mean_loss()  # a collective: every process, every time
            self.bar.set_postfix(loss=f"{loss:.4f}")
            self.accelerator.log({"epoch": self.progress.epoch, "loss": loss, "lr": optimizer.param_groups[0]["lr"],
                                  "train_seconds": round(self.progress.seconds(), 3)}, step=self.progress.step)

    def evaluation(self, scores: dict[str, float], best: bool) -> None:
        p = self.progress
        self.accelerator.log({"epoch": p.epoch, **{f"validation/{k}": v for k, v in scores.items()}, "best": int(best)},
                             step=p.step)
        if self.accelerator.is_local_main_process:
            collapsed = guards.constant_output(scores)
            shown = ", ".join(f"{k} {v:.4f}" for k, v in scores.items())
            self.bar.write(f"step {p.step}/{p.max_steps}: validation {shown}; best {p.metric} {p.stopper.best} at step "
                           f"{p.stopper.best_step}" + (", adapter kept" if best else "")
                           + (f"; WARNING: {collapsed}" if collapsed else ""))


def finish(log: Log, results: dict[str, Any], summary, lock: FileLock | None) -> dict[str, Any]:
    """Write metrics.json and the card's results, end the trackers and release the output folder."""
    accelerator, run, p = log.accelerator, log.run, log.progress
    # An adapter kept although its output collapsed is warned about, not refused: the run did what was asked, and a
    # learning-rate sweep is meant to find such rates. What must not happen is that it goes unnoticed.
    collapsed = guards.collapse_warning({"validation": p.kept_metrics(), "test": results.get("test") or {}},
                                        learning_rate(run))
    warnings = [collapsed] if collapsed else []
    peak = accelerator.gather(torch.tensor([peak_rss_bytes()], device=accelerator.device)).max().item()
    metrics = {
        **results, "validation": p.kept_metrics(), "metric": p.metric, "best_step": p.stopper.best_step,
        "constant_predictions": [f"validation at step {step}" for step in p.constant_steps]
                                + (["test"] if guards.constant_output(results.get("test") or {}) else []),
        "warnings": warnings, "notes": p.notes, "steps": p.step, "max_steps": p.max_steps,
        "epochs": round(p.step / max(1, math.ceil(p.batches_per_epoch / run.gradient_accumulation_steps)), 3),
        "stopped_early": p.stopped_early, "train_samples": p.samples,
        "train_seconds": round(p.train_seconds, 3), "total_seconds": round(time.perf_counter() - p._started, 3),
        "samples_per_second": round(p.samples / p.train_seconds, 3) if p.train_seconds else None,
        "trainable_parameters": summary.trainable, "total_parameters": summary.total,
        "trainable_percent": round(summary.percent, 4), "adapter_bytes": summary.adapter_bytes,
        "peak_rss_bytes": int(peak), "num_processes": accelerator.num_processes, "device": str(accelerator.device),
        "distributed_type": str(accelerator.distributed_type.value), "mixed_precision": str(accelerator.mixed_precision),
        "adapter_dir": ADAPTER_DIR, "learning_rate": learning_rate(run), "config": run.config(accelerator.num_processes),
        "versions": {n: installed(n) or "not installed" for n in ("adaptkit", "torch", "transformers", "peft", "accelerate")},
    }
    if torch.cuda.is_available():
        metrics["peak_gpu_memory_bytes"] = int(torch.cuda.max_memory_allocated())
    if accelerator.is_main_process:
        write_json(run.output_dir / METRICS_FILE, metrics)
        if (run.output_dir / ADAPTER_DIR / "README.md").is_file():  # the model card names the data and the results
            source = run.flags.get("data") or run.flags.get("dataset_name") or run.flags.get("train_file")
            numbers = {k: v for k, v in _flatten({"validation": p.best_metrics, **results}).items()
                       if isinstance(v, (int, float)) and not isinstance(v, bool)}
            card.write_training(run.output_dir / ADAPTER_DIR, metrics=numbers, data=f"{source or 'not recorded'}: "
                                f"{p.samples:,} training samples, {p.step} optimizer steps")
    log.bar.close()
    for warning in warnings:  # last, below the bar and the test line, where it is seen
        accelerator.print(warning, file=sys.stderr)
    accelerator.wait_for_everyone()
    accelerator.end_training()  # closes the trackers (log.jsonl too) and ends the process group
    if lock is not None:
        lock.release()
    return metrics


def peak_rss_bytes() -> int:
    """Linux's VmHWM: ru_maxrss is inherited across fork + exec (a 14 MB child of an 800 MB launcher reads 795 MB)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # macOS reports bytes


def _flatten(record: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in record.items():
        out.update(_flatten(value, f"{prefix}{key}/") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return out


def _rng_neutral(loader) -> Iterator[Any]:
    """Iterate ``loader`` with its start-up RNG draw on a forked RNG: a resumed run starts its epoch at another
    moment, and that draw would shift every later dropout mask."""
    iterator = iter(loader)
    with torch.random.fork_rng(devices=[]):
        first = next(iterator, _END)
    if first is not _END:
        yield first
        yield from iterator


_END = object()


def _batch_len(batch: Any) -> int:
    first = next(iter(batch.values())) if isinstance(batch, Mapping) else batch[0]  # BatchEncoding is a Mapping
    return int(first.shape[0])
