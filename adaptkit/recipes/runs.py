"""What a recipe's loop needs beyond Accelerate: the output-folder claim, the run's position, the log, metrics.json."""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import re
import resource
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import torch
from accelerate import skip_first_batches
from accelerate.utils import find_batch_size
from filelock import FileLock, Timeout
from tqdm.auto import tqdm
from transformers.utils import flatten_dict

from adaptkit import card
from adaptkit.distributed import save_adapter as save_on_every_process
from adaptkit.errors import ConfigError, RunLockedError
from adaptkit.folders import files_under, owned_files, write_json
from adaptkit.recipes import guards
from adaptkit.recipes.checkpoints import remove_checkpoint, remove_owned
from adaptkit.recipes.training import (ADAPTER_DIR, CHECKPOINTS, LOCK_NAME, LOG_FILE, MANIFEST, METRICS_FILE,
                                       TENSORBOARD_DIR, RunArgs, learning_rate)
from adaptkit.versions import installed


def claim_output_dir(accelerator, run: RunArgs) -> FileLock | None:
    """Lock ``--output-dir`` (the OS drops it even on SIGKILL); with --overwrite, delete what the earlier run wrote:
    only what it listed or named as its own, so a user's files stay."""
    out = run.output_dir
    lock = lock_folder(out, "--output-dir") if accelerator.is_main_process else None
    if lock is not None and run.overwrite:
        for step in sorted((out / CHECKPOINTS).glob("*step-*")):
            if re.fullmatch(r"(\.tmp-)?step-\d+", step.name):  # else a user's folder
                remove_checkpoint(step)
        remove_owned(out / ADAPTER_DIR, dict.fromkeys(owned_files(out / ADAPTER_DIR)))  # by its manifest's sha256
        events = [r for r in files_under(out / TENSORBOARD_DIR) if Path(r).name.startswith("events.out.tfevents.")]
        remove_owned(out / TENSORBOARD_DIR, dict.fromkeys(events))
        remove_owned(out, dict.fromkeys([METRICS_FILE, LOG_FILE, MANIFEST]))  # MANIFEST: written by earlier versions
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


def save_adapter(accelerator, model, run: RunArgs, step: int) -> None:
    """Save into --output-dir/adapter: every process calls it (FSDP gathers)."""
    guards.check_finite_weights(accelerator.unwrap_model(model), step)  # a NaN is never "best"
    save_on_every_process(accelerator, model, run.output_dir / ADAPTER_DIR)


def keep_adapter(accelerator, model, run: RunArgs, progress: Progress) -> None:
    """None improved (NaN each time): keep the last weights. Decided from shared state: a save is a collective."""
    if progress.best_step is None:
        accelerator.print(f"no evaluation improved on validation ({progress.metric} was NaN each time): "
                          f"the adapter kept is the last weights, step {progress.step}")
        save_adapter(accelerator, model, run, progress.step)


class Progress:
    """Where a run is (step, epoch, batch, samples, seconds, early stopping); saved as JSON in each checkpoint."""

    def __init__(self, run: RunArgs, accelerator, max_steps: int, batches_per_epoch: int, metric: tuple[str, bool]):
        self.accelerator, self.max_steps, self.batches_per_epoch = accelerator, max_steps, batches_per_epoch
        (self.metric, self.higher_is_better), self.patience = metric, run.patience
        self.best, self.best_step, self.bad_evals = None, None, 0  # early stopping: best value, its step, evals since
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

    @property
    def should_stop(self) -> bool:
        """--patience evaluations in a row without improvement (0: never)."""
        return self.patience > 0 and self.bad_evals >= self.patience

    def epoch_batches(self, loader) -> Iterator[Any]:
        """This epoch's micro-batches, skipping those a resumed run already trained on."""
        loader.set_epoch(self.epoch)  # reseeds shuffling: epoch e always sees the same order
        batches = iter(skip_first_batches(loader, self.batch_in_epoch) if self.batch_in_epoch else loader)
        # bank the time since the last pause before restarting the clock (an epoch may end without an evaluation)
        self.train_seconds, self._clock = self.seconds(), time.perf_counter()
        # the loader's start-up RNG draw on a forked RNG: a resumed run starts its epoch at another moment, and that
        # draw would shift every later dropout mask
        with torch.random.fork_rng(devices=[]):
            first = list(itertools.islice(batches, 1))
        for batch in itertools.chain(first, batches):
            self.batch_in_epoch += 1
            self.samples += find_batch_size(batch) * self.accelerator.num_processes
            yield batch

    def optimizer_step(self, loss: torch.Tensor) -> bool:
        """Count one micro-batch; True when it completed an optimizer step."""
        value = float(loss.detach())
        guards.check_finite_loss(value, self.step + 1)  # a NaN or inf loss stops the run, naming the step
        self._loss = [self._loss[0] + value, self._loss[1] + 1]
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
        """Record an evaluation; True when it is the best so far (keep this adapter). NaN never improves."""
        if self.metric not in scores:
            raise ConfigError("metric", self.metric, f"not among the results {sorted(scores)}", "watch one of them")
        self.last_metrics = {k: float(v) for k, v in scores.items()}
        if guards.constant_output(scores):
            self.constant_steps.append(self.step)
        value = self.last_metrics[self.metric]
        better = not math.isnan(value) and (
            self.best is None or (value > self.best if self.higher_is_better else value < self.best))
        if better:
            self.best, self.best_step, self.bad_evals, self.best_metrics = value, self.step, 0, dict(self.last_metrics)
        else:
            self.bad_evals += 1
        return better

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
        return {"step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch, "samples": self.samples,
                "train_seconds": self.seconds(), "max_steps": self.max_steps, "best_metrics": self.best_metrics,
                "last_metrics": self.last_metrics, "constant_steps": self.constant_steps,
                "early_stopping": {"best": self.best, "best_step": self.best_step, "bad_evals": self.bad_evals}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.epoch, self.samples = int(state["step"]), int(state["epoch"]), int(state["samples"])
        self.batch_in_epoch, self.train_seconds = int(state["batch_in_epoch"]), float(state["train_seconds"])
        self.best_metrics, self.last_metrics = dict(state["best_metrics"]), dict(state["last_metrics"])
        self.constant_steps = [int(step) for step in state["constant_steps"]]
        stop = state["early_stopping"]
        self.best, self.best_step, self.bad_evals = stop["best"], stop["best_step"], int(stop["bad_evals"])


class Log:
    """A progress bar and a console line per evaluation beside ``accelerator.log``."""

    def __init__(self, accelerator, run: RunArgs, progress: Progress):
        self.accelerator, self.run, self.progress = accelerator, run, progress
        accelerator.init_trackers(run.recipe, config={k: v if isinstance(v, (int, float, str, bool)) else str(v)
                                                      for k, v in run.config(accelerator.num_processes).items()})
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
            self.bar.write(f"step {p.step}/{p.max_steps}: validation {shown}; best {p.metric} {p.best} at step "
                           f"{p.best_step}" + (", adapter kept" if best else "")
                           + (f"; WARNING: {collapsed}" if collapsed else ""))


def finish(log: Log, results: dict[str, Any], summary, lock: FileLock | None) -> dict[str, Any]:
    """Write metrics.json and the card's results, end the trackers and release the output folder."""
    accelerator, run, p = log.accelerator, log.run, log.progress
    kept = p.best_metrics or p.last_metrics  # the last weights' scores if no evaluation was best
    # An adapter kept although its output collapsed is warned about, not refused: the run did what was asked, and a
    # learning-rate sweep is meant to find such rates. What must not happen is that it goes unnoticed.
    lr = learning_rate(run)
    collapsed = guards.collapse_warning({"validation": kept, "test": results.get("test") or {}}, lr)
    peak = accelerator.gather(torch.tensor([peak_rss_bytes()], device=accelerator.device)).max().item()
    metrics = {
        **results, "validation": kept, "metric": p.metric, "best_step": p.best_step,
        "constant_predictions": [f"validation at step {step}" for step in p.constant_steps]
                                + (["test"] if guards.constant_output(results.get("test") or {}) else []),
        "warnings": [collapsed] if collapsed else [], "notes": p.notes, "steps": p.step, "max_steps": p.max_steps,
        "epochs": round(p.step / max(1, math.ceil(p.batches_per_epoch / run.gradient_accumulation_steps)), 3),
        "stopped_early": p.stopped_early, "train_samples": p.samples,
        "train_seconds": round(p.train_seconds, 3), "total_seconds": round(time.perf_counter() - p._started, 3),
        "samples_per_second": round(p.samples / p.train_seconds, 3) if p.train_seconds else None,
        "trainable_parameters": summary.trainable, "total_parameters": summary.total,
        "trainable_percent": round(summary.percent, 4), "adapter_bytes": summary.adapter_bytes,
        "peak_rss_bytes": int(peak), "num_processes": accelerator.num_processes, "device": str(accelerator.device),
        "distributed_type": accelerator.distributed_type.value, "mixed_precision": str(accelerator.mixed_precision),
        "adapter_dir": ADAPTER_DIR, "learning_rate": lr, "config": run.config(accelerator.num_processes),
        "versions": {name: installed(name) or "not installed"
                     for name in ("adaptkit", "torch", "transformers", "peft", "accelerate")},
    }
    if torch.cuda.is_available():
        metrics["peak_gpu_memory_bytes"] = int(torch.cuda.max_memory_allocated())
    if accelerator.is_main_process:
        write_json(run.output_dir / METRICS_FILE, metrics)
        if (run.output_dir / ADAPTER_DIR / "README.md").is_file():  # the model card names the data and the results
            source = run.flags.get("data") or run.flags.get("dataset_name") or run.flags.get("train_file")
            numbers = {k: v for k, v in flatten_dict({"validation": p.best_metrics, **results}, delimiter="/").items()
                       if isinstance(v, (int, float)) and not isinstance(v, bool)}
            card.write_training(run.output_dir / ADAPTER_DIR, metrics=numbers, data=f"{source or 'not recorded'}: "
                                f"{p.samples:,} training samples, {p.step} optimizer steps")
    log.bar.close()
    if collapsed:  # last, below the bar and the test line, where it is seen
        accelerator.print(collapsed, file=sys.stderr)
    accelerator.wait_for_everyone()
    accelerator.end_training()  # closes the trackers (log.jsonl too) and ends the process group
    if lock is not None:
        lock.release()
    return metrics


def peak_rss_bytes() -> int:
    """Linux's VmHWM: ru_maxrss is inherited across fork + exec (a 14 MB child of an 800 MB launcher reads 795 MB)."""
    with contextlib.suppress(OSError):
        if found := re.search(r"^VmHWM:\s*(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE):
            return int(found[1]) * 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # macOS reports bytes
