"""What a recipe's loop calls for what Accelerate does not do: exact resume, the flag guard, logs, metrics.json.

The loop itself is in each recipe, where it can be read (as in accelerate's
``examples/by_feature/checkpointing.py`` and litgpt's ``finetune/lora.py``). The pieces here:

* :class:`Progress`: step, epoch, position in the epoch, samples, training time and the early-stopping
  state. Registered with ``accelerator.register_for_checkpointing``, so ``save_state`` /
  ``load_state`` carry it with the model, optimizer, scheduler and every process's RNG states.
  ``Progress.epoch(loader)`` yields one epoch's micro-batches from where a resumed run stopped
  (``accelerate.skip_first_batches``); shuffling is reseeded from ``seed + epoch``, so a resumed run
  sees the same batches, dropout masks and learning rates as an uninterrupted one.
* Checkpoints and ``--resume``: ``adaptkit.recipes.checkpoints``.
* :class:`Log`: ``log.jsonl``, the ``--report-to`` trackers (``accelerator.log``), a progress bar and one
  console line per evaluation. :func:`finish` writes ``metrics.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import resource
import shutil
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Iterator

import torch

from adaptkit.errors import ConfigError
from adaptkit.folders import write_json
from adaptkit.recipes import guards
from adaptkit.recipes.checkpoints import adapter_only_checkpoints, run_config
from adaptkit.recipes.training import (ADAPTER_DIR, CHECKPOINTS, LOG_FILE, METRICS_FILE, TENSORBOARD_DIR,
                                       learning_rate)



# ---- small pieces ------------------------------------------------------------------------------------
def peak_rss_bytes() -> int:
    """Peak resident memory of this process.

    Linux: VmHWM from /proc, not ru_maxrss, which a child inherits from its parent across fork + exec
    (a 14 MB child of an 800 MB launcher reports 795 MB). Elsewhere ru_maxrss (macOS reports bytes).
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version
    out = {}
    for name in ("adaptkit", "torch", "transformers", "peft", "accelerate"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


class EarlyStopping:
    """Counts evaluations without improvement; NaN (e.g. a correlation of constant predictions) never improves."""

    def __init__(self, patience: int, higher_is_better: bool):
        self.patience, self.higher_is_better = patience, higher_is_better
        self.best: float | None = None
        self.best_step: int | None = None
        self.bad_evals = 0

    def update(self, value: float, step: int) -> bool:
        """Record one evaluation; True when it is the best so far."""
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

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_step": self.best_step, "bad_evals": self.bad_evals}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.best_step, self.bad_evals = state["best"], state["best_step"], state["bad_evals"]


def _flatten(record: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"validation": {"accuracy": 0.9}}`` -> ``{"validation/accuracy": 0.9}`` (TensorBoard tag names)."""
    out = {}
    for key, value in record.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}/"))
        else:
            out[f"{prefix}{key}"] = value
    return out


class Progress:
    """Where a run is: optimizer steps, epoch and micro-batch in it, samples and training seconds, early stopping.

    ``state_dict`` / ``load_state_dict`` make it checkpointable (``accelerator.register_for_checkpointing``).
    Training time counts training steps only: evaluation and checkpoints run inside ``paused()``.
    """

    def __init__(self, args: argparse.Namespace, accelerator, max_steps: int, batches_per_epoch: int,
                 metric: tuple[str, bool]):
        self.args, self.accelerator, self.max_steps, self.batches_per_epoch = args, accelerator, max_steps, batches_per_epoch
        guards.require_examples(batches_per_epoch, getattr(args, "data", None) or "the training data", "training batches")
        adapter_only_checkpoints(accelerator)  # save_state / load_state: the trained tensors, not the whole model
        claim_output_dir(accelerator, args)
        self.metric, higher = metric
        self.stopper = EarlyStopping(args.patience, higher)
        self.step = self.epoch = self.batch_in_epoch = self.samples = 0
        self.train_seconds, self.epoch_end, self.stopped_early = 0.0, False, False
        self.best_metrics: dict[str, float] = {}
        self.last_metrics: dict[str, float] = {}  # what the last weights scored: the kept ones if none was best
        self.constant_steps: list[int] = []  # evaluations whose predictions collapsed (guards.constant_output)
        self.last_eval_step: int | None = None
        self._loss = [0.0, 0]  # sum and count of micro-batch losses since the last log line
        self._clock: float | None = None
        self._started = time.perf_counter()

    @property
    def done(self) -> bool:
        return self.stopped_early or self.step >= self.max_steps

    def epoch_batches(self, loader) -> Iterator[Any]:
        """This epoch's micro-batches, skipping those a resumed run already trained on."""
        from accelerate import skip_first_batches
        loader.set_epoch(self.epoch)  # reseeds shuffling: epoch e always sees the same order
        source = skip_first_batches(loader, self.batch_in_epoch) if self.batch_in_epoch else loader
        # bank the time since the last pause before restarting the clock: resetting it alone dropped the end of every
        # epoch that did not close with an evaluation (train_seconds then fell back at each new epoch)
        self.train_seconds, self._clock = self.seconds(), time.perf_counter()
        for batch in _rng_neutral(source):
            self.batch_in_epoch += 1
            self.samples += _batch_len(batch) * self.accelerator.num_processes
            yield batch

    def optimizer_step(self, loss: torch.Tensor) -> bool:
        """Count one micro-batch; True when it completed an optimizer step (gradient accumulation aside)."""
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
        """The mean micro-batch loss since the last call, over every process."""
        totals = self.accelerator.reduce(torch.tensor(self._loss, device=self.accelerator.device), reduction="sum")
        self._loss = [0.0, 0]
        return (totals[0] / totals[1]).item()

    def improved(self, scores: dict[str, float]) -> bool:
        """Record an evaluation; True when it is the best so far on the watched metric (keep this adapter)."""
        if self.metric not in scores:
            raise ConfigError(field="metric", value=self.metric, problem=f"not among the results {sorted(scores)}",
                              fix="watch one of the keys the evaluation returns")
        self.last_eval_step = self.step
        self.last_metrics = {k: float(v) for k, v in scores.items()}
        if guards.constant_output(scores):
            self.constant_steps.append(self.step)
        better = self.stopper.update(float(scores[self.metric]), self.step)
        if better:
            self.best_metrics = dict(self.last_metrics)
        return better

    def kept_metrics(self) -> dict[str, float]:
        """Validation scores of the adapter a run keeps: the best, or the last weights when none improved (NaN)."""
        return self.best_metrics or self.last_metrics

    @contextlib.contextmanager
    def paused(self):
        """Stop the training clock for evaluation or checkpointing."""
        running = self._clock is not None
        self.train_seconds = self.seconds()
        self._clock = None
        try:
            yield
        finally:
            if running:
                self._clock = time.perf_counter()

    def seconds(self) -> float:
        return self.train_seconds + (time.perf_counter() - self._clock if self._clock is not None else 0.0)

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch, "samples": self.samples,
                "train_seconds": self.seconds(), "best_metrics": self.best_metrics,
                "last_eval_step": self.last_eval_step, "early_stopping": self.stopper.state_dict(),
                "last_metrics": self.last_metrics, "constant_steps": self.constant_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.epoch, self.batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        self.samples, self.train_seconds, self.best_metrics = state["samples"], state["train_seconds"], state["best_metrics"]
        self.last_eval_step = state["last_eval_step"]
        self.stopper.load_state_dict(state["early_stopping"])
        # absent from checkpoints written before these were kept
        self.last_metrics, self.constant_steps = state.get("last_metrics", {}), state.get("constant_steps", [])


class Log:
    """``log.jsonl`` and the ``--report-to`` trackers (main process), a progress bar, a console line per evaluation."""

    def __init__(self, accelerator, args: argparse.Namespace, progress: Progress, name: str):
        from tqdm.auto import tqdm
        self.accelerator, self.args, self.progress = accelerator, args, progress
        self.file = None
        if accelerator.is_main_process:
            self.file = open(Path(args.output_dir) / LOG_FILE, "a" if args.resume else "w", encoding="utf-8")
        flags = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in sorted(vars(args).items())}
        accelerator.init_trackers(name, config=flags)
        self.bar = tqdm(total=progress.max_steps, initial=progress.step, desc="train", dynamic_ncols=True,
                        disable=not accelerator.is_local_main_process)

    def write(self, record: dict[str, Any]) -> None:
        if self.file is not None:
            self.file.write(json.dumps({"step": self.progress.step, **record}, default=str) + "\n")
            self.file.flush()
        if "event" not in record:  # curves only: losses, learning rate, validation
            self.accelerator.log({k: v for k, v in _flatten(record).items() if isinstance(v, (int, float))
                                  and not isinstance(v, bool) and k != "epoch"}, step=self.progress.step)

    def step(self, optimizer) -> None:
        """After each optimizer step: the bar, and a loss line every --log-every steps and at the last."""
        self.bar.update(1)
        if self.progress.step % self.args.log_every == 0 or self.progress.step >= self.progress.max_steps:
            self.loss(optimizer)

    def loss(self, optimizer) -> None:
        loss = self.progress.mean_loss()
        self.bar.set_postfix(loss=f"{loss:.4f}")
        self.write({"epoch": self.progress.epoch, "loss": loss, "lr": optimizer.param_groups[0]["lr"],
                    "train_seconds": round(self.progress.seconds(), 3)})

    def evaluation(self, scores: dict[str, float], best: bool) -> None:
        p = self.progress
        self.write({"epoch": p.epoch, "validation": scores, "best": best})
        if self.accelerator.is_local_main_process:
            shown = ", ".join(f"{k} {v:.4f}" for k, v in scores.items())
            collapsed = guards.constant_output(scores)
            self.bar.write(f"step {p.step}/{p.max_steps}: validation {shown}; best {p.metric} "
                           f"{p.stopper.best} at step {p.stopper.best_step}" + (", adapter kept" if best else "")
                           + (f"; WARNING: {collapsed}" if collapsed else ""))

    def close(self) -> None:
        self.bar.close()
        if self.file is not None:
            self.file.close()
        self.accelerator.end_training()


# ---- what Accelerate does not do ----------------------------------------------------------------------
_LOCKS: dict[Path, Any] = {}  # output folder -> the open lock file this process holds (adaptkit.recipes.guards)


def claim_output_dir(accelerator, args: argparse.Namespace) -> None:
    """Lock ``--output-dir`` for this run (one run per folder), then, with ``--overwrite``, delete what an earlier
    run wrote there (nothing else). Called once data and model are ready, so a refused start writes nothing."""
    out = Path(args.output_dir)
    if accelerator.is_main_process:
        # held until this process ends or runs again here: runs in one process follow each other, so an
        # earlier one that raised holds it no more
        stale = _LOCKS.pop(out.resolve(), None)
        if stale is not None:
            stale.close()
        _LOCKS[out.resolve()] = guards.lock_output_dir(out)
        if args.resume is None and args.overwrite:
            for name in (CHECKPOINTS, ADAPTER_DIR, METRICS_FILE, LOG_FILE, TENSORBOARD_DIR):
                path = out / name
                shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    accelerator.wait_for_everyone()


def save_adapter(accelerator, model, args: argparse.Namespace, step: int) -> None:
    """``adaptkit.save`` into ``--output-dir/adapter``; every process takes part (FSDP shards are gathered)."""
    from adaptkit.distributed import save_adapter
    guards.check_finite_weights(accelerator.unwrap_model(model), step)  # a NaN is never "best"
    save_adapter(accelerator, model, Path(args.output_dir) / ADAPTER_DIR)


def keep_adapter(accelerator, model, args: argparse.Namespace, progress: Progress) -> None:
    """After the loop: when no evaluation ever improved (its metric was NaN each time, e.g. constant predictions),
    no adapter was kept; keep the last weights, and say so, so that the test split and ``adaptkit.load`` find one."""
    if (Path(args.output_dir) / ADAPTER_DIR).is_dir():
        return
    accelerator.print(f"no evaluation improved on validation ({progress.metric} was NaN each time): "
                      f"the adapter kept is the last weights, step {progress.step}")
    save_adapter(accelerator, model, args, progress.step)


def finish(accelerator, args, model, progress: Progress, log: Log, results: dict[str, Any], summary) -> dict[str, Any]:
    """Write metrics.json beside the adapter: task results + parameters, memory, time, throughput."""
    keep_adapter(accelerator, model, args, progress)
    # An adapter kept although its output collapsed (one value, one class) is warned about, not refused: the run did
    # what was asked, metrics.json reports the collapsed model truthfully, and a learning-rate sweep is meant to find
    # such rates. What must not happen is that it goes unnoticed.
    collapsed = guards.collapse_warning({"validation": progress.kept_metrics(), "test": results.get("test") or {}},
                                        learning_rate(args))
    warnings = [collapsed] if collapsed else []
    peak = accelerator.gather(torch.tensor([peak_rss_bytes()], device=accelerator.device)).max().item()
    p = progress
    metrics = {
        **results,
        "validation": p.kept_metrics(), "metric": p.metric, "best_step": p.stopper.best_step,
        "constant_predictions": [f"validation at step {step}" for step in p.constant_steps]
                                + (["test"] if guards.constant_output(results.get("test") or {}) else []),
        "warnings": warnings,
        "steps": p.step, "max_steps": p.max_steps, "epochs": round(p.step / max(1, math.ceil(
            p.batches_per_epoch / args.gradient_accumulation_steps)), 3),
        "stopped_early": p.stopped_early, "train_samples": p.samples,
        "train_seconds": round(p.train_seconds, 3), "total_seconds": round(time.perf_counter() - p._started, 3),
        "samples_per_second": round(p.samples / p.train_seconds, 3) if p.train_seconds else None,
        "trainable_parameters": summary.trainable, "total_parameters": summary.total,
        "trainable_percent": round(summary.percent, 4), "adapter_bytes": summary.adapter_bytes,
        "peak_rss_bytes": int(peak), "num_processes": accelerator.num_processes, "device": str(accelerator.device),
        "distributed_type": str(accelerator.distributed_type.value), "mixed_precision": str(accelerator.mixed_precision),
        "adapter_dir": ADAPTER_DIR, "learning_rate": learning_rate(args), "config": run_config(args, accelerator),
        "versions": versions(),
    }
    if torch.cuda.is_available():
        metrics["peak_gpu_memory_bytes"] = int(torch.cuda.max_memory_allocated())
    if accelerator.is_main_process:
        write_json(Path(args.output_dir) / METRICS_FILE, metrics)
        _card(args, progress, results)
    log.write({"event": "finished", **results})
    for warning in warnings:  # last, below the bar and the test line, where it is seen
        accelerator.print(warning, file=sys.stderr)
    accelerator.wait_for_everyone()
    log.close()  # accelerator.end_training: closes the trackers and ends the process group
    return metrics


def _card(args, progress: Progress, results: dict[str, Any]) -> None:
    """Name the data and the measured metrics in the saved adapter's model card."""
    from adaptkit import card
    adapter_dir = Path(args.output_dir) / ADAPTER_DIR
    if not (adapter_dir / "README.md").is_file():
        return
    source = getattr(args, "data", None) or getattr(args, "dataset_name", None) or getattr(args, "train_file", None)
    numbers = {k: v for k, v in _flatten({"validation": progress.best_metrics, **results}).items()
               if isinstance(v, (int, float)) and not isinstance(v, bool)}
    card.write_training(adapter_dir, data=f"{source or 'not recorded'}: {progress.samples:,} training samples, "
                                          f"{progress.step} optimizer steps", metrics=numbers)


def _rng_neutral(loader) -> Iterator[Any]:
    """Iterate ``loader`` without the global RNG draw that starting a torch DataLoader makes.

    A DataLoader without its own generator draws a worker seed from the global RNG when an epoch
    starts. A resumed run starts its (partial) epoch at another moment than the interrupted run
    did, so that draw would shift every later dropout mask; the draw is made on a forked RNG instead.
    """
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
