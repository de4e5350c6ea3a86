"""The bookkeeping the recipes share, so each recipe keeps only its task-specific code in view.

A recipe owns its model, data and training step; a :class:`Run` does everything around the step:
the evaluation schedule, early stopping, logs (JSONL, TensorBoard when installed), a tqdm bar,
checkpoints that resume exactly, and ``metrics.json``::

    run = Run(accelerator, args, model, optimizer, train_loader, evaluate=lambda: evaluate(model, val_loader),
              metric=("accuracy", True), max_steps=max_steps)
    run.resume(args.resume)                      # no-op without --resume
    for batch in run.batches(train_loader):      # epochs, resume position, stops at max steps / early stop
        with accelerator.accumulate(model):
            loss = model(**batch).loss
            ...
        run.step_done(loss)                      # logs; evaluates, saves the best adapter, checkpoints
    run.finish({...task metrics...}, summary)    # metrics.json beside the saved adapter

Exact resume: a checkpoint is ``accelerator.save_state`` (the trained tensors, optimizer, scheduler, every process's
RNG states, accelerate's accumulation counter) plus ``run_state.json`` (step, epoch, position in the
epoch, early-stopping state, time and samples so far). Shuffling is reseeded from ``seed + epoch``
every epoch, so the resumed run skips exactly the micro-batches already seen
(``accelerator.skip_first_batches``) and continues with the same batches, dropout masks and learning
rates as an uninterrupted run. Checkpoints are written to a temporary folder and renamed into place,
so a crash while saving never leaves a checkpoint that looks complete.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from adaptkit.errors import ConfigError
from adaptkit.recipes import guards
from adaptkit.recipes.training import (ADAPTER_DIR, CHECKPOINTS, LOG_FILE, METRICS_FILE, RUN_STATE, TENSORBOARD_DIR,
                               learning_rate)


# Flags that may change between a run and its resumption; every other flag must match, or the
# resumed run would silently train something else than the interrupted one.
_RESUMABLE_CHANGES = {"output_dir", "resume", "overwrite", "log_every", "checkpoint_every", "keep_checkpoints",
                      "processes"}


# ---- small pieces ------------------------------------------------------------------------------------
def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically: a reader sees the old file or the new one, never half of one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)


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


class Logger:
    """JSON lines (and TensorBoard scalars when tensorboard is installed), written by the main process only."""

    def __init__(self, output_dir: Path, enabled: bool, append: bool):
        self.enabled = enabled
        self.file = self.tensorboard = None
        if not enabled:
            return
        output_dir.mkdir(parents=True, exist_ok=True)
        self.file = open(output_dir / LOG_FILE, "a" if append else "w", encoding="utf-8")
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # optional: pip install tensorboard
            return
        self.tensorboard = SummaryWriter(str(output_dir / TENSORBOARD_DIR))

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record, default=str) + "\n")
        self.file.flush()
        if self.tensorboard is not None and "event" not in record:  # curves only: losses, lr, validation
            for key, value in _flatten(record).items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and key not in ("step", "epoch"):
                    self.tensorboard.add_scalar(key, value, record.get("step", 0))

    def close(self) -> None:
        for handle in (self.file, self.tensorboard):
            if handle is not None:
                handle.close()


def _flatten(record: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"validation": {"accuracy": 0.9}}`` -> ``{"validation/accuracy": 0.9}`` (TensorBoard tag names)."""
    out = {}
    for key, value in record.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}/"))
        else:
            out[f"{prefix}{key}"] = value
    return out


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


# ---- the run ---------------------------------------------------------------------------------------
class Run:
    """Schedule and state of one training run (see the module docstring for the loop it drives).

    ``evaluate`` is called with no arguments and returns the validation metrics; ``metric`` is
    ``(key, higher_is_better)`` of the one early stopping and best-adapter selection watch.
    """

    def __init__(self, accelerator, args: argparse.Namespace, model: torch.nn.Module,
                 optimizer: torch.optim.Optimizer, train_loader, *, evaluate: Callable[[], dict[str, float]],
                 metric: tuple[str, bool], max_steps: int):
        self.accelerator, self.args, self.model, self.optimizer = accelerator, args, model, optimizer
        self.evaluate, (self.metric, higher) = evaluate, metric
        self.output_dir = Path(args.output_dir)
        self.adapter_dir = self.output_dir / ADAPTER_DIR
        self.max_steps, self.batches_per_epoch = max_steps, len(train_loader)
        self.stopper = EarlyStopping(args.patience, higher)
        self.step = self.epoch = self.batch_in_epoch = 0
        self.samples, self.train_seconds = 0, 0.0
        self.done = self.stopped_early = False
        self.last_eval_step: int | None = None
        self.best_metrics: dict[str, float] = {}
        self._loss_sum, self._loss_count = 0.0, 0
        self._started = time.perf_counter()
        self._clock: float | None = None
        self.bar = None
        guards.require_examples(self.batches_per_epoch, getattr(args, "data", "the training data"), "training batches")
        self._data: dict[str, str] | None = None
        adapter_only_checkpoints(accelerator)
        if accelerator.is_main_process:
            self._lock = guards.lock_output_dir(self.output_dir)  # before --overwrite deletes anything
            if args.resume is None and args.overwrite:
                for name in (CHECKPOINTS, ADAPTER_DIR, METRICS_FILE, LOG_FILE, TENSORBOARD_DIR):
                    path = self.output_dir / name
                    shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
            self.output_dir.mkdir(parents=True, exist_ok=True)
        accelerator.wait_for_everyone()
        self.logger = Logger(self.output_dir, accelerator.is_main_process, append=args.resume is not None)

    # ---- resume ----------------------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        """The flags (and process count) this run was started with; a resumed run must match them."""
        flags = {k: (str(v) if isinstance(v, Path) else v) for k, v in sorted(vars(self.args).items())}
        return {**flags, "num_processes": self.accelerator.num_processes}

    def resume(self, where: str | None) -> None:
        """Restore everything from a checkpoint (``"latest"``: the newest in --output-dir); None: fresh start."""
        if where is None:
            return
        path = latest_checkpoint(self.output_dir) if where == "latest" else Path(where)
        if path is None or not (path / RUN_STATE).is_file():
            raise ConfigError(field="--resume", value=str(path or self.output_dir / CHECKPOINTS),
                              problem="no complete checkpoint there",
                              fix="point --resume at a checkpoints/step-N folder, or drop --resume to start afresh")
        state = guards.read_checkpoint(path, RUN_STATE)
        saved, now = state["config"], self.config()
        changed = sorted(k for k in set(saved) | set(now)
                         if k not in _RESUMABLE_CHANGES and saved.get(k) != now.get(k))
        if changed:
            raise ConfigError(field="--resume", value={k: [saved.get(k), now.get(k)] for k in changed},
                              problem="these flags differ from the interrupted run (was, now)",
                              fix="resume with the same flags, or start a new run in another --output-dir")
        guards.check_same_data(state.get("data"), self.data_fingerprint())
        self.accelerator.load_state(str(path))
        self.step, self.epoch, self.batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        self.samples, self.train_seconds = state["samples"], state["train_seconds"]
        self.last_eval_step, self.best_metrics = state["last_eval_step"], state["best_metrics"]
        self.stopper.load_state_dict(state["early_stopping"])
        self.logger.log({"step": self.step, "event": "resumed", "checkpoint": str(path)})

    def data_fingerprint(self) -> dict[str, str]:
        """Checksums of the local data files, kept in each checkpoint: a resume on changed data is refused."""
        if self._data is None:
            self._data = guards.data_fingerprint(getattr(self.args, key, None)
                                                 for key in ("data", "train_file", "validation_file", "test_file"))
        return self._data

    # ---- the loop --------------------------------------------------------------------------------
    def batches(self, loader) -> Iterator[Any]:
        """Micro-batches until max steps or early stopping, starting where a resumed run stopped."""
        from accelerate import skip_first_batches
        from tqdm.auto import tqdm

        self.bar = tqdm(total=self.max_steps, initial=self.step, desc="train", dynamic_ncols=True,
                        disable=not self.accelerator.is_local_main_process)
        self._clock = time.perf_counter()
        while not self.done and self.step < self.max_steps:
            loader.set_epoch(self.epoch)  # reseeds shuffling: epoch e always sees the same order
            source = skip_first_batches(loader, self.batch_in_epoch) if self.batch_in_epoch else loader
            for batch in _rng_neutral(source):
                self.batch_in_epoch += 1
                self.samples += _batch_len(batch) * self.accelerator.num_processes
                yield batch
                if self.done:
                    break
        self._pause()
        self.bar.close()

    def step_done(self, loss: torch.Tensor) -> None:
        """Call after every micro-batch. At an optimizer step: log, evaluate, stop, checkpoint when due."""
        value = float(loss.detach())
        guards.check_finite_loss(value, self.step + 1)
        self._loss_sum += value
        self._loss_count += 1
        if not self.accelerator.sync_gradients:
            return
        self.step += 1
        epoch_end = self.batch_in_epoch >= self.batches_per_epoch
        if epoch_end:  # roll over now, so a checkpoint taken here resumes at the next epoch's start
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0
        self.bar.update(1)
        if self.step % self.args.log_every == 0 or self.step == self.max_steps:
            self._log_loss()
        every = self.args.eval_every
        if (every and self.step % every == 0) or (not every and epoch_end) or self.step >= self.max_steps:
            self._evaluate()
        if self.step >= self.max_steps:
            self.done = True
        every = self.args.checkpoint_every
        if every and self.step % every == 0 and not self.done:
            self.checkpoint()

    def _log_loss(self) -> None:
        totals = self.accelerator.reduce(torch.tensor([self._loss_sum, self._loss_count],
                                                      device=self.accelerator.device), reduction="sum")
        loss = (totals[0] / totals[1]).item()
        self._loss_sum, self._loss_count = 0.0, 0
        self.bar.set_postfix(loss=f"{loss:.4f}")
        self.logger.log({"step": self.step, "epoch": self.epoch, "loss": loss,
                         "lr": self.optimizer.param_groups[0]["lr"], "train_seconds": round(self._now(), 3)})

    def _evaluate(self) -> None:
        running = self._pause()
        metrics = self.evaluate()
        self.model.train()
        if self.metric not in metrics:
            raise ConfigError(field="metric", value=self.metric, problem=f"not among the results {sorted(metrics)}",
                              fix="watch one of the keys the evaluation returns")
        self.last_eval_step = self.step
        improved = self.stopper.update(float(metrics[self.metric]), self.step)
        if improved:
            self.best_metrics = {k: float(v) for k, v in metrics.items()}
            self.save_adapter()
        self.logger.log({"step": self.step, "epoch": self.epoch, "validation": metrics, "best": improved})
        if self.stopper.should_stop:
            self.done = self.stopped_early = True
            self.logger.log({"step": self.step, "event": "early_stop",
                             "reason": f"{self.args.patience} evaluations without a better {self.metric}"})
        self._resume_clock(running)

    def save_adapter(self) -> None:
        from adaptkit.distributed import save_adapter
        guards.check_finite_weights(self.accelerator.unwrap_model(self.model), self.step)  # a NaN is never "best"
        save_adapter(self.accelerator, self.model, self.adapter_dir)  # every process: FSDP shards are gathered

    def checkpoint(self) -> Path:
        """Save everything needed to continue exactly from here; atomic (temporary folder, then rename)."""
        from adaptkit.folders import replace_dir
        running = self._pause()
        folder = self.output_dir / CHECKPOINTS
        final, tmp = folder / f"step-{self.step:07d}", folder / f".tmp-step-{self.step:07d}"
        if self.accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self.accelerator.wait_for_everyone()
        self.accelerator.save_state(str(tmp))  # every process writes its own RNG states
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            write_json(tmp / RUN_STATE, {
                "step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                "samples": self.samples, "train_seconds": self.train_seconds,
                "last_eval_step": self.last_eval_step, "best_metrics": self.best_metrics,
                "early_stopping": self.stopper.state_dict(), "config": self.config(),
                "data": self.data_fingerprint(), "files": guards.digests(tmp, skip=[RUN_STATE])})
            replace_dir(tmp, final)
            old = sorted((p for p in folder.glob("step-*") if p != final), key=lambda p: p.name)
            for stale in old[: max(0, len(old) - self.args.keep_checkpoints + 1)]:
                shutil.rmtree(stale, ignore_errors=True)
            self.logger.log({"step": self.step, "event": "checkpoint", "path": str(final)})
        self.accelerator.wait_for_everyone()
        self._resume_clock(running)
        return final

    # ---- the end ---------------------------------------------------------------------------------
    def finish(self, results: dict[str, Any], summary) -> dict[str, Any]:
        """Write metrics.json beside the adapter: task results + parameters, memory, time, throughput."""
        if self.last_eval_step is None:  # stopped before any evaluation: the last weights are all there is
            self._evaluate()
        if not self.adapter_dir.is_dir():  # no evaluation ever improved (e.g. NaN): keep the last weights
            self.save_adapter()
        acc = self.accelerator
        peak = acc.gather(torch.tensor([peak_rss_bytes()], device=acc.device)).max().item()
        metrics = {
            **results,
            "validation": self.best_metrics, "metric": self.metric, "best_step": self.stopper.best_step,
            "steps": self.step, "max_steps": self.max_steps, "epochs": round(self.step / max(1, math.ceil(
                self.batches_per_epoch / self.args.gradient_accumulation_steps)), 3),
            "stopped_early": self.stopped_early, "train_samples": self.samples,
            "train_seconds": round(self.train_seconds, 3), "total_seconds": round(self._wall(), 3),
            "samples_per_second": round(self.samples / self.train_seconds, 3) if self.train_seconds else None,
            "trainable_parameters": summary.trainable, "total_parameters": summary.total,
            "trainable_percent": round(summary.percent, 4), "adapter_bytes": summary.adapter_bytes,
            "peak_rss_bytes": int(peak), "num_processes": acc.num_processes, "device": str(acc.device),
            "distributed_type": str(acc.distributed_type.value), "mixed_precision": str(acc.mixed_precision),
            "adapter_dir": ADAPTER_DIR, "learning_rate": learning_rate(self.args), "config": self.config(),
            "versions": versions(),
        }
        if torch.cuda.is_available():
            metrics["peak_gpu_memory_bytes"] = int(torch.cuda.max_memory_allocated())
        if acc.is_main_process:
            write_json(self.output_dir / METRICS_FILE, metrics)
            self._card(results)
        self.logger.log({"step": self.step, "event": "finished", **{k: v for k, v in results.items()}})
        self.logger.close()
        acc.wait_for_everyone()
        return metrics

    def _card(self, results: dict[str, Any]) -> None:
        """Name the data and the measured metrics in the saved adapter's model card."""
        from adaptkit import card
        if not (self.adapter_dir / "README.md").is_file():
            return
        args = self.args
        source = getattr(args, "data", None) or getattr(args, "dataset_name", None) or getattr(args, "train_file", None)
        numbers = {k: v for k, v in _flatten({"validation": self.best_metrics, **results}).items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)}
        card.write_training(self.adapter_dir, data=f"{source or 'not recorded'}: {self.samples:,} training samples, "
                                                   f"{self.step} optimizer steps", metrics=numbers)

    # ---- time: train_seconds counts training steps only, not evaluation or checkpoint writing ------
    def _now(self) -> float:
        return self.train_seconds + (time.perf_counter() - self._clock if self._clock is not None else 0.0)

    def _pause(self) -> bool:
        """Stop the training clock; True when it was running."""
        running = self._clock is not None
        self.train_seconds = self._now()
        self._clock = None
        return running

    def _resume_clock(self, running: bool) -> None:
        if running:
            self._clock = time.perf_counter()

    def _wall(self) -> float:
        return time.perf_counter() - self._started


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
