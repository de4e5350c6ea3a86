"""The pieces of a training loop a recipe builds: its flags, the Accelerator, optimizer, schedule, evaluation.

A recipe parses its flags with :func:`add_run_args` / :func:`check_args`, builds the loop from
:func:`make_accelerator`, :func:`make_optimizer` and :func:`make_scheduler`, and scores with
:func:`evaluate_classifier` / :func:`evaluate_perplexity`; ``adaptkit.recipes.runs`` has what the
loop calls besides. The names of what a run writes into ``--output-dir`` live here because
:func:`check_args` refuses to overwrite a folder that holds one.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import torch

from adaptkit.errors import ConfigError, MissingDependencyError

# what a run writes into --output-dir
ADAPTER_DIR = "adapter"
METRICS_FILE = "metrics.json"
LOG_FILE = "log.jsonl"
TENSORBOARD_DIR = "tensorboard"  # the trackers' logging_dir: `tensorboard --logdir OUTPUT_DIR/tensorboard`
# --report-to name -> the package its tracker needs (as the Trainer's report_to)
TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}
CHECKPOINTS = "checkpoints"
RUN_STATE = "run_state.json"

# Per strategy, a rate that holds on every task of the strategy benchmark (within one standard error of the best
# validation score of its per-task sweep; benchmarks/results/REPORT.md, "The recipe's default learning rates").
# full: 1e-4 is the one rate that does on all five GLUE tasks (seed 1); 5e-5 fell short on STS-B, the regression
# task. lora (its sweep re-run after LoRA began training the pooler; with the pooler frozen, 1e-3 collapsed two of
# three STS-B seeds): no rate does on all five. 5e-4 does on four (SST-2, CoLA, RTE, STS-B) and falls short on MRPC
# (F1 0.812 against 0.837 at 2e-3; a constant prediction scores 0.807). 1e-3 falls short on CoLA as well, and 2e-3
# collapses CoLA (MCC 0.000), 5e-3 STS-B and MRPC; 5e-4 sits four times below that cliff. bottleneck: 3e-3 does on
# all ten sweeps (Pfeiffer and Houlsby, five tasks each); 1e-3 fell short on CoLA and MRPC, and 1e-2 collapsed
# STS-B (Houlsby) and CoLA. prefix: 3e-2 does on the four tasks it learns (CoLA stayed
# at MCC 0 at every rate); 1e-2 fell short on SST-2, RTE and STS-B (0.75 against 0.81). linear_probe: no rate does
# on all five; 3e-2 does on four, and on MRPC no rate beats the majority class (best validation F1 0.811, a constant
# prediction 0.807), where 3e-2 gives 0.754. 1e-2 fell short on CoLA and STS-B (0.35 against 0.51). ia3: no rate
# does on all five either; 3e-2 is the best on four (SST-2, MRPC, RTE, STS-B) and falls short on CoLA (MCC 0.05
# against 0.15 at 1e-2). 1e-2 falls short on MRPC, where it barely beats the majority class (F1 0.813 against
# 0.807), and 1e-3 (the default before the sweep) is below the ladder: at 3e-3 IA3 learns nothing on CoLA. A
# parameter-efficient method needs a far larger step than full fine-tuning.
DEFAULT_LR = {"full": 1e-4, "lora": 5e-4, "bottleneck": 3e-3, "prefix": 3e-2, "linear_probe": 3e-2, "ia3": 3e-2}
# Any other PEFT method (loha, lokr, adalora, ...): not measured here. LoRA's rate, since most of them are
# low-rank variants of it; IA3's rate would be far too large for those.
OTHER_LR = DEFAULT_LR["lora"]


# ---- flags -----------------------------------------------------------------------------------------
def add_run_args(parser: argparse.ArgumentParser, *, epochs: int = 3, batch_size: int = 32,
                 strategy: str = "lora") -> None:
    """The flags every recipe has: strategy, budget, optimisation, evaluation, logging, checkpoints."""
    g = parser.add_argument_group("strategy")
    g.add_argument("--strategy", default=strategy,
                   help="lora, bottleneck, prefix, linear_probe, full, or any PEFT method name (ia3, loha, ...)")
    g.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="a strategy option, repeatable: --option r=16 --option targets=query,value "
                        "(values are JSON when they parse, comma lists become lists)")
    g.add_argument("--quantization", choices=["none", "8bit", "4bit"], default="none",
                   help="load the base model quantized with bitsandbytes (train an adapter on top)")
    g.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="dtype the base weights load in (default: transformers', the checkpoint's); adapters and "
                        "new heads stay fp32 (adaptkit/precision.py), full fine-tuning trains in this dtype")
    g.add_argument("--mixed-precision", choices=["no", "bf16", "fp16"], default=None,
                   help="Accelerate autocast (bf16 runs on CPU too); default: the launcher's --mixed_precision")
    g = parser.add_argument_group("training")
    g.add_argument("--output-dir", type=Path, default=None, help="where logs, checkpoints, adapter and metrics go")
    g.add_argument("--seed", type=int, default=42)
    g.add_argument("--processes", type=int, default=None,
                   help="how many processes you launched; checked (`accelerate launch --cpu --num_processes 2` "
                        "silently runs one)")
    g.add_argument("--epochs", type=int, default=epochs)
    g.add_argument("--max-steps", type=int, default=0, help="optimizer steps; overrides --epochs when > 0")
    g.add_argument("--batch-size", type=int, default=batch_size, help="per process, per micro-batch")
    g.add_argument("--gradient-accumulation-steps", type=int, default=1)
    g.add_argument("--learning-rate", type=float, default=None,
                   help=f"default depends on the strategy: {DEFAULT_LR}, other PEFT methods {OTHER_LR}")
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--warmup-ratio", type=float, default=0.06, help="linear warm-up over this share of the steps")
    g.add_argument("--max-grad-norm", type=float, default=1.0)
    g = parser.add_argument_group("evaluation, logging, checkpoints")
    g.add_argument("--eval-every", type=int, default=0, help="evaluate every N optimizer steps (0: each epoch)")
    g.add_argument("--patience", type=int, default=3,
                   help="stop after this many evaluations without improvement (0: never stop early)")
    g.add_argument("--log-every", type=int, default=10)
    g.add_argument("--report-to", nargs="+", default=["tensorboard"], choices=[*TRACKERS, "all", "none"],
                   help="trackers that get the losses and validation metrics (accelerate's log_with; all: every "
                        "installed one); log.jsonl is always written")
    g.add_argument("--checkpoint-every", type=int, default=200, help="optimizer steps between checkpoints (0: none)")
    g.add_argument("--keep-checkpoints", type=int, default=1)
    g.add_argument("--resume", nargs="?", const="latest", default=None, metavar="CHECKPOINT",
                   help="continue an interrupted run: its latest checkpoint in --output-dir, or this folder")
    g.add_argument("--overwrite", action="store_true", help="start afresh in an --output-dir that holds a run")


def check_args(args: argparse.Namespace, recipe: str) -> None:
    """Refuse flag values that cannot work, naming the flag and the fix."""
    from adaptkit.recipes import guards
    guards.check_numbers(args)
    for names, least in ((["epochs", "batch_size", "gradient_accumulation_steps", "log_every", "keep_checkpoints"], 1),
                         (["max_steps", "eval_every", "patience", "checkpoint_every"], 0)):
        for name in (n for n in names if getattr(args, n) < least):
            raise ConfigError(field=f"--{name.replace('_', '-')}", value=getattr(args, name),
                              problem=f"must be at least {least}",
                              fix="pass a positive integer" if least else "pass 0 to switch it off, or a positive integer")
    if not 0.0 <= args.warmup_ratio < 1.0:
        raise ConfigError(field="--warmup-ratio", value=args.warmup_ratio, problem="must be in [0, 1)",
                          fix="use 0.06")
    if args.learning_rate is not None and args.learning_rate <= 0:
        raise ConfigError(field="--learning-rate", value=args.learning_rate, problem="must be positive",
                          fix="leave it out for the strategy's default")
    if args.output_dir is None:
        args.output_dir = Path("outputs") / f"{recipe}-{args.strategy}"
    args.output_dir = Path(args.output_dir)
    if args.resume is not None and args.overwrite:
        raise ConfigError(field="--overwrite", value=True, problem="contradicts --resume (continue or start afresh?)",
                          fix="drop one of the two")
    held = [n for n in (CHECKPOINTS, ADAPTER_DIR, METRICS_FILE) if (args.output_dir / n).exists()]
    if args.resume is None and not args.overwrite and held:
        raise ConfigError(field="--output-dir", value=str(args.output_dir), problem=f"already holds a run ({held})",
                          fix="pass --resume to continue it, --overwrite to start afresh, or another --output-dir")
    trackers(args.report_to)  # a missing wandb/mlflow fails now, not after the model loaded


def trackers(report_to: list[str]) -> list[str]:
    """accelerate's ``log_with`` for --report-to; a named tracker that is not installed is refused."""
    import importlib.util
    if "none" in report_to:
        if len(report_to) > 1:
            raise ConfigError(field="--report-to", value=report_to, problem="'none' contradicts the others",
                              fix="pass 'none' alone, or only tracker names")
        return []
    if "all" in report_to:
        return [name for name, package in TRACKERS.items() if importlib.util.find_spec(package) is not None]
    for name in report_to:
        if importlib.util.find_spec(TRACKERS[name]) is None:
            raise MissingDependencyError(field="--report-to", value=name, problem=f"needs the {TRACKERS[name]} "
                                         "package, which is not installed",
                                         fix=f"pip install {TRACKERS[name]}, or --report-to tensorboard / none")
    return list(dict.fromkeys(report_to))


def parse_options(items: list[str]) -> dict[str, Any]:
    """``["r=16", "targets=query,value", "use_dora=true"]`` -> ``{"r": 16, "targets": [...], "use_dora": True}``."""
    options: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(field="--option", value=item, problem="is not KEY=VALUE",
                              fix="write it like --option r=16")
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = [v.strip() for v in text.split(",") if v.strip()] if "," in text else text
        options[key.strip()] = value
    return options


def add_model_args(parser: argparse.ArgumentParser, model_help: str) -> None:
    """--model, --config-name, --tokenizer-name, as in transformers' run_clm.py / run_glue.py."""
    g = parser.add_argument_group("model")
    g.add_argument("--model", help=model_help)
    g.add_argument("--config-name", help="a config (folder or hub id) to build the model from: with --model its "
                                         "weights load into this config; without, the model starts from random "
                                         "weights (seeded by --seed), for tiny or experimental models")
    g.add_argument("--tokenizer-name", help="tokenizer (image_classify: image processor) folder or hub id; default: "
                                            "--model, else --config-name")


def refuse_remote_code(args: argparse.Namespace) -> None:
    """--model, --config-name and --tokenizer-name are refused before anything loads if they name custom code."""
    from adaptkit.quantization import refuse_remote_code as refuse
    for name in (args.model, args.config_name, args.tokenizer_name):
        if name:
            refuse(name)


def preprocessor_name(args: argparse.Namespace) -> str:
    name = args.tokenizer_name or args.model or args.config_name
    if name is None:
        raise ConfigError(field="--model", value=None, problem="no model, config or tokenizer given",
                          fix="pass --model PATH (pretrained), or --config-name CONFIG --tokenizer-name TOKENIZER")
    return name


def load_base(args: argparse.Namespace, task: str, from_pretrained: dict | None = None, **config_options):
    """The base model the flags name: ``--model`` (``adaptkit.load_model``: quantized and placed), its weights
    in ``--config-name``'s config, or ``--config-name`` alone (random weights, the same for every call with the
    same --seed, so the reloaded adapter meets the base it trained on). ``config_options``: num_labels, ...."""
    import transformers

    from adaptkit.quantization import load_model
    from adaptkit.skeleton import TASKS
    quantization = None if args.quantization == "none" else args.quantization
    if args.config_name is None:
        return load_model(args.model, task, quantization=quantization, **(from_pretrained or {}), **config_options,
                          **load_kwargs(args))
    config = transformers.AutoConfig.from_pretrained(args.config_name, trust_remote_code=False, **config_options)
    if args.model is not None:
        return load_model(args.model, task, quantization=quantization, config=config, **(from_pretrained or {}),
                          **load_kwargs(args))
    if quantization is not None:
        raise ConfigError(field="--quantization", value=quantization, problem="a model built from --config-name "
                          "alone has no pretrained weights to quantize", fix="drop --quantization, or pass --model")
    with torch.random.fork_rng(devices=[]):  # the training run's RNG stream stays as it was
        torch.manual_seed(args.seed)
        return getattr(transformers, TASKS[task]).from_config(config, **load_kwargs(args))


def load_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """``from_pretrained`` arguments the shared flags decide (``--dtype``)."""
    return {} if args.dtype is None else {"dtype": getattr(torch, args.dtype)}


def learning_rate(args: argparse.Namespace) -> float:
    if args.learning_rate is not None:
        return args.learning_rate
    return DEFAULT_LR.get(args.strategy.strip().lower().replace("-", "_"), OTHER_LR)


# ---- accelerate --------------------------------------------------------------------------------------
def wanted_precision(args: argparse.Namespace) -> str:
    """The mixed precision this run asks for: --mixed-precision, else the launcher's (Accelerate's own default).

    Accelerate keeps one state per process and, asked for no precision, silently reuses whatever an earlier
    Accelerator in the same process set up: a second in-process run would train under the first one's bf16
    autocast. So the precision is resolved here and an initialised state that disagrees is refused.
    """
    import os

    from accelerate.state import AcceleratorState

    wanted = (args.mixed_precision or os.environ.get("ACCELERATE_MIXED_PRECISION", "no")).lower()
    state = AcceleratorState._shared_state  # the class attribute: reading it initialises nothing
    if state and state.get("_mixed_precision") not in (None, wanted):
        source = "--mixed-precision" if args.mixed_precision else "--mixed-precision (unset: the launcher's)"
        raise ConfigError(
            f"{source}: this run asks for {wanted!r}, but an earlier Accelerator in this process set up "
            f"{state['_mixed_precision']!r}, and Accelerate cannot change it within a process. Run each "
            "recipe in its own process (`accelerate launch` / `python recipe.py`), or, calling main() twice "
            "in one process, reset it in between: "
            "`accelerate.state.AcceleratorState._reset_state(reset_partial_state=True)`.")
    return wanted


def make_accelerator(args: argparse.Namespace):
    """An Accelerator whose shuffling is reseeded from ``seed + epoch`` (what exact resume relies on), logging
    to the --report-to trackers under ``--output-dir/tensorboard``. Nothing is written yet."""
    from accelerate import Accelerator, DataLoaderConfiguration
    from accelerate.utils import ProjectConfiguration, set_seed

    from adaptkit.distributed import check_sharding, require_processes

    out = Path(args.output_dir)
    precision = wanted_precision(args)
    accelerator = Accelerator(gradient_accumulation_steps=args.gradient_accumulation_steps,
                              mixed_precision=precision,
                              log_with=trackers(args.report_to) or None,
                              project_config=ProjectConfiguration(project_dir=str(out),
                                                                  logging_dir=str(out / TENSORBOARD_DIR)),
                              dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True,
                                                                         data_seed=args.seed))
    # a launch that silently runs 1 process, or N processes that each train alone, is refused here
    require_processes(accelerator, args.processes)
    check_sharding(accelerator)  # FSDP on CPU (Accelerate runs DDP), FSDP1, ZeRO-3: refused with the fix
    set_seed(args.seed)
    return accelerator


def make_optimizer(model: torch.nn.Module, args: argparse.Namespace) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases and normalisation weights (they are not "weights" to shrink)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=learning_rate(args))


def plan_steps(args: argparse.Namespace, batches_per_epoch: int) -> int:
    """Total optimizer steps: --max-steps, else --epochs over the (per-process) training batches."""
    return args.max_steps or args.epochs * math.ceil(batches_per_epoch / args.gradient_accumulation_steps)


def make_scheduler(optimizer, args: argparse.Namespace, max_steps: int, num_processes: int):
    """Linear warm-up then linear decay to 0 over ``max_steps`` optimizer steps.

    Accelerate steps a prepared scheduler once per process for every optimizer step (each process
    saw its own batch), so the schedule is laid out in ``max_steps * num_processes`` ticks.
    """
    from transformers import get_linear_schedule_with_warmup
    ticks = max_steps * num_processes
    return get_linear_schedule_with_warmup(optimizer, int(args.warmup_ratio * ticks), ticks)


@torch.no_grad()
def evaluate_classifier(model, loader, accelerator, task: str, num_labels: int) -> dict[str, float]:
    """The task's metrics (adaptkit.metrics) over a prepared loader; every process gets the same result.

    ``num_labels == 1`` means regression (the single logit is the prediction), else the argmax class.
    Predictions are gathered across processes first (``gather_for_metrics`` drops the samples
    Accelerate repeats to even out the last batch). Beside the metrics comes how varied the predictions
    were (``guards.output_spread``), so that a model that collapsed onto one output is named, not only scored.
    """
    import numpy as np

    from adaptkit.recipes import guards, metrics
    model.eval()
    metric = metrics.metric_for_task(task, num_labels=max(2, num_labels))
    seen: list[tuple[np.ndarray, np.ndarray]] = []
    for batch in loader:
        logits = model(**batch).logits
        predictions = logits.squeeze(-1).float() if num_labels == 1 else logits.argmax(-1)
        predictions, references = accelerator.gather_for_metrics((predictions, batch["labels"]))
        seen.append((predictions.cpu().numpy(), references.cpu().numpy()))
        metric.add_batch(predictions=seen[-1][0], references=seen[-1][1])
    scores = {k: float(v) for k, v in metric.compute().items()}
    return {**scores, **guards.output_spread(*(np.concatenate(part) for part in zip(*seen)), num_labels == 1)}


@torch.no_grad()
def evaluate_perplexity(model, loader, accelerator) -> dict[str, float]:
    """Perplexity over every labelled token of a prepared loader (labels -100 are not scored).

    Per-sequence NLL sums and token counts are gathered, so padding, batch sizes and processes do not weigh in.
    """
    from adaptkit.recipes import metrics
    model.eval()
    metric = metrics.metric_for_task("language_model")
    for batch in loader:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        labels = batch["labels"][:, 1:]
        nll = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), labels, ignore_index=-100,
                                                reduction="none").sum(-1)
        nll, tokens = accelerator.gather_for_metrics((nll, labels.ne(-100).sum(-1)))
        metric.add_batch(nll=nll.cpu().numpy(), num_tokens=tokens.cpu().numpy())
    return {k: float(v) for k, v in metric.compute().items()}
