"""The pieces a recipe builds its loop from: flags (:class:`RunArgs`), Accelerator, optimizer, schedule, evaluation."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import os
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import transformers
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.state import AcceleratorState
from accelerate.tracking import GeneralTracker
from accelerate.utils import ProjectConfiguration, set_seed

from adaptkit.cli import parse_options
from adaptkit.distributed import check_sharding, require_processes
from adaptkit.errors import ConfigError, MissingDependencyError
from adaptkit.names import FROM_CONFIG_SEED, TASKS
from adaptkit.quantization import load_model, refuse_remote_code
from adaptkit.recipes import guards, metrics

# what a run writes into --output-dir
ADAPTER_DIR, METRICS_FILE, LOG_FILE, CHECKPOINTS, RUN_STATE = "adapter", "metrics.json", "log.jsonl", "checkpoints", "run_state.json"
TENSORBOARD_DIR = "tensorboard"  # the trackers' logging_dir: `tensorboard --logdir OUTPUT_DIR/tensorboard`
LOCK_NAME, MANIFEST = ".adaptkit-run.lock", ".adaptkit-run.json"  # one run per folder; the files it wrote (--overwrite)
TRACKERS = ("tensorboard", "wandb", "mlflow")  # --report-to values, each its package's import name
# Per strategy, a rate that holds on every task of the strategy benchmark, or on four of five where none does
# (lora, linear_probe, ia3): benchmarks/results/REPORT.md, "The recipe's default learning rates", has the sweeps.
# A parameter-efficient method needs a far larger step than full fine-tuning.
DEFAULT_LR = {"full": 1e-4, "lora": 5e-4, "bottleneck": 3e-3, "prefix": 3e-2, "linear_probe": 3e-2, "ia3": 3e-2}
OTHER_LR = DEFAULT_LR["lora"]  # other PEFT methods (loha, lokr, ...) are mostly low-rank variants of LoRA
PATH_FLAGS = ("data", "train_file", "validation_file", "test_file", "model", "config_name", "tokenizer_name")


def _flag(default: Any = None, help: str | None = None, **argparse_options) -> Any:  # noqa: A002 - argparse's name
    factory = {"default_factory": lambda: list(default)} if isinstance(default, list) else {"default": default}
    return dataclasses.field(**factory, metadata={"help": help, **argparse_options})


@dataclasses.dataclass
class RunArgs:
    """The flags every recipe shares, typed and checked once (:meth:`parse`); ``flags`` keeps the whole command line
    (the recipe's own flags too) for the resume guard and the card."""
    model: str | None = _flag(None, "model folder or hub id (classify: default the bundled all-MiniLM-L6-v2)")
    config_name: str | None = _flag(None, "a config to build the model from: with --model its weights load into it; "
                                          "without, random weights seeded by --seed (recorded as config + seed)")
    tokenizer_name: str | None = _flag(None, "tokenizer (or image processor); default: --model, else --config-name")
    strategy: str = _flag("lora", "lora, bottleneck, prefix, linear_probe, full, or any PEFT method (ia3, loha, ...)")
    option: list[str] = _flag([], "a strategy option, repeatable: --option r=16 --option targets=query,value (values "
                                  "are JSON when they parse, comma lists become lists)", action="extend", metavar="K=V")
    quantization: Literal["none", "8bit", "4bit"] = _flag("none", "load the base quantized with bitsandbytes")
    dtype: Literal["float32", "bfloat16", "float16", None] = _flag(None, "dtype the base weights load in (default: the "
                                                                         "checkpoint's); adapters and new heads stay fp32")
    mixed_precision: Literal["no", "bf16", "fp16", None] = _flag(None, "Accelerate autocast; default: the launcher's")
    output_dir: Path | None = _flag(None, "where logs, checkpoints, adapter and metrics go")
    seed: int = _flag(42)
    processes: int | None = _flag(None, "how many processes you launched; checked (`accelerate launch --cpu "
                                        "--num_processes 2` silently runs one)")
    epochs: int = _flag(3)
    max_steps: int = _flag(0, "optimizer steps; overrides --epochs when > 0")
    batch_size: int = _flag(32, "per process, per micro-batch")
    gradient_accumulation_steps: int = _flag(1)
    learning_rate: float | None = _flag(None, f"default: {DEFAULT_LR} by strategy, other PEFT methods {OTHER_LR}")
    weight_decay: float = _flag(0.01)
    warmup_ratio: float = _flag(0.06, "linear warm-up over this share of the steps")
    max_grad_norm: float = _flag(1.0)
    eval_every: int = _flag(0, "evaluate every N optimizer steps (0: each epoch)")
    patience: int = _flag(3, "stop after this many evaluations without improvement (0: never stop early)")
    log_every: int = _flag(10)
    report_to: list[str] = _flag(["tensorboard"], "trackers (accelerate's log_with); log.jsonl is always written",
                                 choices=[*TRACKERS, "all", "none"])
    checkpoint_every: int = _flag(200, "optimizer steps between checkpoints, and one at the end (0: none)")
    keep_checkpoints: int = _flag(1)
    resume: str | None = _flag(None, "continue a run: its latest checkpoint, or this folder; a higher --max-steps or "
                                     "--epochs extends it", nargs="?", const="latest", metavar="CHECKPOINT")
    overwrite: bool = _flag(False, "start afresh in an --output-dir that holds a run (deletes only what it wrote)")
    recipe: str = dataclasses.field(default="", init=False)
    max_length: int | None = dataclasses.field(default=None, init=False)  # guards.fit_max_length settles it
    flags: dict[str, Any] = dataclasses.field(default_factory=dict, init=False)
    options: dict[str, Any] = dataclasses.field(default_factory=dict, init=False)  # --option, read as `adaptkit check`

    @classmethod
    def parse(cls, args: argparse.Namespace, recipe: str) -> RunArgs:
        guards.check_numbers(args)
        if not 0.0 <= args.warmup_ratio < 1.0:
            raise ConfigError(field="--warmup-ratio", value=args.warmup_ratio, problem="must be in [0, 1)", fix="use 0.06")
        if args.resume is not None and args.overwrite:
            raise ConfigError("--overwrite", True, "contradicts --resume (continue or start afresh?)", "drop one")
        trackers(args.report_to)  # a missing wandb/mlflow fails now, not after the model loaded
        for name in (args.model, args.config_name, args.tokenizer_name):
            refuse_remote_code(name)  # custom code (auto_map) refused before any from_pretrained could ask to run it
        # '~' expanded once, here: the adapter, the log and the lock all go to the same folder
        out = Path(os.path.expanduser(str(args.output_dir or Path("outputs") / f"{recipe}-{args.strategy}")))
        check_output_dir(out, resume=args.resume is not None, overwrite=args.overwrite)
        run = cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if f.init and f.name != "output_dir"},
                  output_dir=out)
        run.recipe, run.max_length, run.flags = recipe, getattr(args, "max_length", None), dict(vars(args))
        run.options = parse_options(run.option)  # a malformed --option is refused before any model loads
        return run

    def config(self, num_processes: int) -> dict[str, Any]:
        """Every flag as JSON, local paths resolved, and the process count: what a resumed run must match."""
        flags = {**self.flags, **{k: v for k, v in vars(self).items() if k not in ("flags", "recipe", "options")}}
        for key in (*PATH_FLAGS, "output_dir"):
            value = flags.get(key)
            if value is not None and Path(os.path.expanduser(str(value))).exists():
                flags[key] = str(Path(os.path.expanduser(str(value))).resolve())
        return {**json.loads(json.dumps(flags, default=str)), "num_processes": num_processes}


def check_output_dir(out: Path, resume: bool, overwrite: bool) -> None:
    """Refuse an --output-dir that is (or goes through) a file, holds links where a run writes, or holds a run."""
    existing = next(p for p in (out, *out.parents) if p.exists() or p.is_symlink())
    if not existing.is_dir():
        raise ConfigError("--output-dir", str(out), f"{'is' if existing == out else 'goes through'} {existing}, which "
                          "is not a folder (a file, or a broken or looping link)", "pass a folder, e.g. runs/mine")
    links = [n for n in (LOCK_NAME, MANIFEST, LOG_FILE, METRICS_FILE, ADAPTER_DIR, CHECKPOINTS, TENSORBOARD_DIR)
             if (out / n).is_symlink()]
    if links:
        raise ConfigError("--output-dir", str(out), f"holds links where a run writes ({links}); adaptkit writes and "
                          "deletes through no link it did not make", "remove them, or pass another --output-dir")
    held = [n for n in (CHECKPOINTS, ADAPTER_DIR, METRICS_FILE) if (out / n).exists()]
    if not resume and not overwrite and held:
        raise ConfigError("--output-dir", str(out), f"already holds a run ({held})", "--resume, --overwrite or another")


def trackers(report_to: list[str]) -> list[str]:
    """--report-to, checked now: Accelerate drops a tracker whose package is missing, with only a debug message."""
    if "none" in report_to and len(report_to) > 1:
        raise ConfigError("--report-to", report_to, "'none' contradicts the others", "pass 'none' alone")
    installed = [name for name in TRACKERS if importlib.util.find_spec(name) is not None]
    wanted = installed if "all" in report_to else [name for name in dict.fromkeys(report_to) if name != "none"]
    if missing := [name for name in wanted if name not in installed]:
        raise MissingDependencyError("--report-to", missing[0], f"needs the {missing[0]} package, which is not "
                                     "installed", f"pip install {missing[0]}, or another --report-to")
    return wanted


def run_parser(description: str | None, **defaults) -> transformers.HfArgumentParser:
    """RunArgs' fields as flags, with the recipe's defaults; the recipe adds its own, then calls ``RunArgs.parse``."""
    parser = transformers.HfArgumentParser(RunArgs, description=description,
                                           formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.set_defaults(**defaults)
    return parser


def preprocessor_name(run: RunArgs) -> str:
    name = run.tokenizer_name or run.model or run.config_name
    if name is None:
        raise ConfigError("--model", None, "no model", "pass --model, or --config-name and --tokenizer-name")
    return name


def load_base(run: RunArgs, task: str, from_pretrained: dict | None = None, **config_options):
    """``--model`` (quantized and placed), its weights in ``--config-name``'s config, or that config alone (random
    weights seeded by --seed, recorded as config + seed)."""
    quantization = None if run.quantization == "none" else run.quantization
    dtype = {} if run.dtype is None else {"dtype": getattr(torch, run.dtype)}
    if run.config_name is None:
        return load_model(run.model, task, quantization=quantization, **(from_pretrained or {}), **config_options, **dtype)
    config = transformers.AutoConfig.from_pretrained(run.config_name, trust_remote_code=False, **config_options)
    if run.model is not None:
        return load_model(run.model, task, quantization=quantization, config=config, **(from_pretrained or {}), **dtype)
    if quantization is not None:
        raise ConfigError("--quantization", quantization, "a model built from --config-name alone has no pretrained "
                          "weights to quantize", "drop --quantization, or pass --model")
    with torch.random.fork_rng(devices=[]):  # the training run's RNG stream stays as it was
        torch.manual_seed(run.seed)
        model = getattr(transformers, TASKS[task]).from_config(config, **dtype)
    # the adapter's card and adaptkit_config.json name the base: here not the config folder's (absent) weights
    source = Path(run.config_name).resolve() if Path(run.config_name).exists() else run.config_name
    model.config.name_or_path = f"{source} (random weights: from_config after torch.manual_seed({run.seed}))"
    model.__dict__[FROM_CONFIG_SEED] = run.seed  # recorded in the folder: load names the seed that rebuilds the base
    return model


def learning_rate(run: Any) -> float:
    if run.learning_rate is not None:
        return run.learning_rate
    return DEFAULT_LR.get(run.strategy.strip().lower().replace("-", "_"), OTHER_LR)


# ---- accelerate --------------------------------------------------------------------------------------
class JsonLines(GeneralTracker):
    """``log.jsonl`` as an Accelerate tracker, opened once the run claimed its folder; appended to on --resume."""
    name, requires_logging_directory, tracker = "jsonl", False, None  # tracker: the open file, once started

    def __init__(self, path: Path, append: bool):
        super().__init__()
        self.path, self.append = path, append

    def start(self):  # O_NOFOLLOW: never written through a link (check_output_dir refused one already)
        flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | (os.O_APPEND if self.append else os.O_TRUNC)
        self.tracker = open(os.open(self.path, flags, 0o666), "w", encoding="utf-8")

    def log(self, values: dict, step: int | None = None, **kwargs):
        self.tracker.write(json.dumps({"step": step, **values}, default=str) + "\n")
        self.tracker.flush()

    def finish(self):
        self.tracker.close()


def make_accelerator(run: RunArgs):
    """An Accelerator with seedable shuffling (exact resume relies on it) and the trackers; nothing is written yet."""
    wanted = (run.mixed_precision or os.environ.get("ACCELERATE_MIXED_PRECISION", "no")).lower()
    try:  # passed explicitly, so Accelerate refuses a state an earlier Accelerator in this process set up otherwise
        accelerator = Accelerator(gradient_accumulation_steps=run.gradient_accumulation_steps, mixed_precision=wanted,
                                  log_with=[JsonLines(run.output_dir / LOG_FILE, run.resume is not None),
                                            *trackers(run.report_to)],
                                  project_config=ProjectConfiguration(project_dir=str(run.output_dir),
                                                                      logging_dir=str(run.output_dir / TENSORBOARD_DIR)),
                                  dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=run.seed))
    except ValueError as exc:  # Accelerate keeps one state per process and cannot change its precision
        if "mixed_precision=" not in str(exc):  # another refusal of Accelerate's: its own words
            raise
        raise ConfigError(field="--mixed-precision", value=wanted, problem=f"an earlier Accelerator in this process set "
                          f"up {AcceleratorState().mixed_precision!r} (unset: the launcher's)", fix="run each recipe in "
                          "its own process (`accelerate launch` / `python recipe.py`)") from None
    require_processes(accelerator, run.processes)  # a launch that silently runs 1 process is refused here
    check_sharding(accelerator)  # FSDP on CPU (Accelerate runs DDP), FSDP1, ZeRO-3: refused with the fix
    set_seed(run.seed)
    return accelerator


def make_optimizer(model: torch.nn.Module, run: RunArgs) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases and normalisation weights (they are not "weights" to shrink)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
    groups = [{"params": decay, "weight_decay": run.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=learning_rate(run))


def plan_steps(run: RunArgs, batches_per_epoch: int) -> int:
    guards.require_examples(batches_per_epoch, run.flags.get("data") or "the training data", "training batches")
    return run.max_steps or run.epochs * math.ceil(batches_per_epoch / run.gradient_accumulation_steps)


def make_scheduler(optimizer, run: RunArgs, max_steps: int, num_processes: int):
    """Linear warm-up and decay, laid out in ``max_steps * num_processes``: Accelerate steps it once per process."""
    ticks = max_steps * num_processes
    return transformers.get_linear_schedule_with_warmup(optimizer, int(run.warmup_ratio * ticks), ticks)


@torch.no_grad()
def evaluate_classifier(model, loader, accelerator, task: str, num_labels: int) -> dict[str, float]:
    """The task's metrics (the same on every process) and the predictions' spread, so a collapse is named."""
    model.eval()
    metric = metrics.metric_for_task(task, num_labels=max(2, num_labels))
    seen: tuple[list, list] = ([], [])
    for batch in loader:
        logits = model(**batch).logits
        predictions = logits.squeeze(-1).float() if num_labels == 1 else logits.argmax(-1)
        for part, gathered in zip(seen, accelerator.gather_for_metrics((predictions, batch["labels"]))):
            part.append(gathered.cpu().numpy())
    predictions, references = (np.concatenate(part or [np.empty(0)]) for part in seen)
    return {**metric(predictions=predictions, references=references),
            **guards.output_spread(predictions, references, num_labels == 1)}


@torch.no_grad()
def evaluate_perplexity(model, loader, accelerator) -> dict[str, float]:
    """Perplexity over the labelled tokens, from gathered per-sequence NLL sums: padding and processes do not weigh."""
    model.eval()
    seen: tuple[list, list] = ([], [])
    for batch in loader:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        labels = batch["labels"][:, 1:]
        nll = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), labels, ignore_index=-100,
                                                reduction="none").sum(-1)
        for part, gathered in zip(seen, accelerator.gather_for_metrics((nll, labels.ne(-100).sum(-1)))):
            part.append(gathered.cpu().numpy())
    nll, num_tokens = (np.concatenate(part or [np.empty(0)]) for part in seen)
    return {k: float(v) for k, v in metrics.metric_for_task("language_model")(nll=nll, num_tokens=num_tokens).items()}
