"""``adaptkit.recommend``: which strategy to run, for this model, this much data and this much memory.

Each candidate (strategy x LoRA rank x 8/4-bit base x gradient checkpointing, at the largest batch that fits) gets
a peak memory (``adaptkit.estimate``, calibrated on CPU on the benchmark's peak RSS), a time per epoch (CPU only)
and a quality vs full fine-tuning from the benchmark records (``recommend_evidence.json``, written by
``benchmarks/recommend_evidence.py``). docs/recommend.md says how each is computed and how far off it was.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import statistics
from pathlib import Path
from typing import Any

from adaptkit.errors import ConfigError, UnsupportedError
from adaptkit.estimate import estimate
from adaptkit.names import TASKS
from adaptkit.skeleton import skeleton
from adaptkit.strategies.lora import LoRA

EVIDENCE = Path(__file__).with_name("recommend_evidence.json")
TOLERANCE = 0.5  # points: candidates this close to the best expected quality count as level; the fastest wins
CHECKPOINT_TIME = 4 / 3  # gradient checkpointing runs the forward pass twice: assumed, not measured
BATCH = 32  # the benchmark's batch: estimates are traced at it, evidence was measured at it
_UNITS = {"b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_SECONDS = {"s": 1, "m": 60, "min": 60, "h": 3600, "d": 86400}
# name, strategy (estimate row), options, quantizations, gradient checkpointing; PEFT refuses prefix + checkpointing
_Q, _BOTH = [None, "8bit", "4bit"], [False, True]
_SPECS = [("full", "full", {}, [None], _BOTH), ("lora", "lora", {}, _Q, _BOTH),
          ("lora", "lora_r16", {"r": 16}, [None], [False]), ("bottleneck", "bottleneck", {}, _Q, _BOTH),
          ("prefix", "prefix", {}, _Q, [False]), ("linear_probe", "linear_probe", {}, _Q, [False])]
_CACHE: dict[str, Any] = {}


def parse_memory(value: Any) -> int:
    """Bytes from 8e9, "8GB", "8 GiB" or "512MB"."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
    if isinstance(value, bool) or not match or match.group(2).lower() not in (*_UNITS, ""):
        raise ConfigError(field="memory", value=value, problem="is not an amount of memory", fix="write e.g. 8GB")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower() or "b"])


def parse_time(value: Any) -> float:
    """Seconds from 7200, "2h", "1h30m" or "45min"."""
    text = re.sub(r"\s", "", str(value).lower())
    parts = re.findall(r"([0-9]*\.?[0-9]+)([a-z]*)", text)
    if isinstance(value, bool) or not parts or "".join(n + u for n, u in parts) != text or \
            any(u not in (*_SECONDS, "") for _, u in parts):
        raise ConfigError(field="time", value=value, problem="is not a duration", fix="write e.g. 2h, 90m or 3600")
    return sum(float(n) * _SECONDS[u or "s"] for n, u in parts)


def _size(n: float) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.0f} MB"


def _duration(s: float) -> str:
    return f"{s / 3600:.1f} h" if s >= 3600 else f"{s / 60:.0f} min" if s >= 60 else f"{s:.0f} s"


@dataclasses.dataclass
class Candidate:
    strategy: str
    options: dict
    quantization: str | None
    gradient_checkpointing: bool
    batch_size: int | None          # the largest that fits (None: none fits)
    peak_bytes: int | None          # at batch_size, or at batch 1 when nothing fits
    seconds_per_epoch: float | None
    quality: float | None           # expected points vs full fine-tuning (dev score x 100)
    evidence: list[str]             # the benchmark record files behind ``quality``
    fits: bool
    reason: str = ""

    @property
    def name(self) -> str:
        extra = [f"{k}={v}" for k, v in self.options.items()] + [self.quantization or ""] + \
            ["checkpointing" if self.gradient_checkpointing else ""]
        return self.strategy + "".join(f" {e}" for e in extra if e)

@dataclasses.dataclass
class Recommendation:
    model: str
    task: str
    train_examples: int
    memory: int
    time: float | None
    device: str
    candidates: list[Candidate]

    @property
    def best(self) -> Candidate | None:
        return self.candidates[0] if self.candidates and self.candidates[0].fits else None

    def sentence(self) -> str:
        if (b := self.best) is None:
            return f"Nothing fits in {_size(self.memory)}: the smallest need is listed below."
        load = f"adaptkit.load_model({self.model!r}, {self.task!r}" + (f", quantization={b.quantization!r}" if
                                                                       b.quantization else "") + \
            (", gradient_checkpointing=True" if b.gradient_checkpointing else "") + ")"
        steps = BATCH // b.batch_size  # gradient accumulation keeps the benchmark's batch of 32
        recipe = "" if b.gradient_checkpointing or self.task != "seq_cls" else (
            f" (or: python recipes/classify.py --model {self.model} --strategy {b.strategy} --batch-size {b.batch_size}"
            + "".join(f" --option {k}={v}" for k, v in b.options.items())
            + (f" --quantization {b.quantization}" if b.quantization else "")
            + (f" --gradient-accumulation-steps {steps}" if steps > 1 else "") + ")")
        opts = "".join(f", {k}={v!r}" for k, v in b.options.items())
        return (f"Run {b.name}: model = adaptkit.adapt({load}, {b.strategy!r}{opts}), then train with batch "
                f"{b.batch_size}{f' x {steps} accumulation steps' if steps > 1 else ''}{recipe}.")

    def to_dict(self) -> dict:
        return {**{k: v for k, v in dataclasses.asdict(self).items() if k != "candidates"}, "run": self.sentence(),
                "candidates": [{**dataclasses.asdict(c), "name": c.name} for c in self.candidates]}

    def __str__(self) -> str:
        rows = [("#", "candidate", "batch", "peak", "time/epoch", "vs full", "fits", "why")]
        for i, c in enumerate(self.candidates, 1):
            rows.append((str(i), c.name, str(c.batch_size or "-"), _size(c.peak_bytes) if c.peak_bytes else "?",
                         _duration(c.seconds_per_epoch) if c.seconds_per_epoch is not None else "?",
                         f"{c.quality:+.1f}" if c.quality is not None else "?", "yes" if c.fits else "no", c.reason))
        widths = [max(len(r[i]) for r in rows) for i in range(7)]
        table = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)) + "  " + r[7] for r in rows]
        return "\n".join([self.sentence(), "", *table, "", "vs full: expected points above/below full fine-tuning "
                          "on dev (benchmark records; --json names them); time: 1 CPU thread"])


def _quality(strategy: str, n: int, cells: list[dict]) -> tuple[float | None, list[str]]:
    """Points vs full, averaged over the cells of ``strategy`` weighted by closeness of their size to ``n``."""
    cell = lambda c: (c["task"], c["data"], c["train_examples"])  # noqa: E731 - one benchmark cell: task x size
    full = {cell(c): c for c in cells if c["strategy"] == "full"}
    points = [(c, 100 * (c["median"] - full[cell(c)]["median"])) for c in cells if c["strategy"] == strategy
              and cell(c) in full]
    if strategy == "full" and points:
        return 0.0, [r for c, _ in points for r in c["records"]]
    weights = [math.exp(-0.5 * (math.log(n / c["train_examples"]) / math.log(2)) ** 2) for c, _ in points]
    if not points or max(weights) < 1e-3:
        return None, []
    used = [(w, d, c) for w, (c, d) in zip(weights, points) if w >= 0.05 * max(weights)]
    value = sum(w * d for w, d, _ in used) / sum(w for w, _, _ in used)
    return value, [r for _, _, c in used for r in c["records"] + full[cell(c)]["records"]]


def _fit(cells: list[dict]) -> dict[str, dict]:
    """Per strategy: seconds per FLOP (the probe: per FLOP of its cache pass), and RSS = a + fixed + b x rest."""
    out = {}
    for s in {c["strategy"] for c in cells}:
        mine = [c for c in cells if c["strategy"] == s]
        per_flop = [(c["cache_seconds_per_example"] * BATCH if s == "linear_probe" else c["step_seconds"])
                    / c["estimated_flops_per_step"] for c in mine]
        x = [c["estimated_peak_bytes"] - c["estimated_fixed_bytes"] for c in mine]
        y = [c["peak_rss_bytes"] - c["estimated_fixed_bytes"] for c in mine]
        b = statistics.linear_regression(x, y).slope if len(set(x)) > 1 else 1.0
        out[s] = {"seconds_per_flop": statistics.median(per_flop), "rss_slope": b,
                  "rss_intercept": statistics.median(yi - b * xi for xi, yi in zip(x, y))}
    return out


def _estimates(model: Any, task: str, num_labels: int, seq_len: int, device: str) -> dict:
    """Estimate rows per strategy key at batch 32, and the bytes 8-/4-bit bases save (cached per model)."""
    key = json.dumps([model if isinstance(model, str) else model.to_json_string(), task, num_labels, seq_len, device])
    if key not in _CACHE:
        names = ["full", "lora", LoRA(r=16), "bottleneck", "prefix", "linear_probe"]
        est = estimate(model, names, batch_size=BATCH, seq_len=seq_len, task=task, num_labels=num_labels, device=device)
        rows = dict(zip(["full", "lora", "lora_r16", "bottleneck", "prefix", "linear_probe"], est.rows))
        saving = {q: rows["lora"].weights - estimate(model, ["lora"], batch_size=1, seq_len=8, quantization=q,
                                                     task=task, num_labels=num_labels, device=device).rows[0].weights
                  for q in ("8bit", "4bit")}
        config = skeleton(model, task, num_labels).config
        _CACHE[key] = (rows, saving, int(getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", 12)))
    return _CACHE[key]


def recommend(model: Any, *, task: str = "seq_cls", train_examples: int, memory: Any = None, time: Any = None,
              device: str = "cpu", seq_len: int = 128, mean_len: int | None = None, num_labels: int = 2,
              epochs: int = 3, options: bool = True, evidence: list[dict] | None = None) -> Recommendation:
    """Every candidate for training ``model`` (no weights are read) on ``train_examples`` examples of ``task``
    within ``memory`` (and ``time`` for ``epochs`` epochs), ranked (docs/recommend.md). ``options=False`` keeps only
    what the benchmark ran (rank 8, no quantization or checkpointing, batch 32); ``evidence``: cells to reason from."""
    if task not in TASKS:
        raise ConfigError(field="task", value=task, problem="is not a task type adaptkit knows",
                          fix=f"use one of {sorted(TASKS)}")
    cells = list(evidence) if evidence is not None else json.loads(EVIDENCE.read_text())["cells"]
    if not any(c.get("task_type", "seq_cls") == task for c in cells):
        raise UnsupportedError(field="task", value=task, problem="has no benchmark records: quality cannot be judged",
                               fix="use 'adaptkit estimate' for its memory alone; the records cover seq_cls")
    if memory is None:
        raise ConfigError(field="memory", value=None, problem="is required: what fits decides the answer",
                          fix="pass the memory you can train in, e.g. memory='8GB' (--memory 8GB)")
    if not isinstance(train_examples, int) or isinstance(train_examples, bool) or train_examples < 1:
        raise ConfigError(field="train_examples", value=train_examples, problem="must be a positive integer",
                          fix="pass the number of training examples, e.g. 5000")
    if device not in ("cpu", "cuda"):
        raise ConfigError(field="device", value=device, problem="is not cpu or cuda", fix="pass device='cpu' or 'cuda'")
    budget, limit = parse_memory(memory), None if time is None else parse_time(time)
    if limit is not None and device != "cpu":
        raise UnsupportedError(field="time", value=time, problem="time is calibrated on CPU runs only",
                               fix="leave time out on cuda (memory and quality are still judged)")
    rows, saving, layers = _estimates(model, task, num_labels, seq_len, device)
    fit, mean_len = _fit(cells), mean_len or seq_len
    out = [_candidate(strategy, opts, quant, gc, rows[key], saving, layers, fit, cells, train_examples, budget, limit,
                      epochs, seq_len, mean_len, device, options) for strategy, key, opts, quants, gcs in _SPECS
           if options or not opts for quant in (quants if options else [None]) for gc in (gcs if options else [False])]
    name = model if isinstance(model, str) else getattr(model, "name_or_path", "") or "<your model>"  # a config
    return _rank(Recommendation(str(name), task, train_examples, budget, limit, device, out))


def _candidate(strategy, opts, quant, gc, row, saving, layers, fit, cells, n, budget, limit, epochs, seq_len,
               mean_len, device, options) -> Candidate:
    quality, cited = _quality(strategy, n, cells)
    c = Candidate(strategy, opts, quant, gc, None, None, None, quality, cited, False)
    if row.problem:
        c.reason = f"cannot run here: {row.problem}"
        return c
    fixed = row.weights - (saving[quant] if quant else 0) + row.gradients + row.optimizer
    rest = (row.peak - row.weights - row.gradients - row.optimizer) * (min(1.0, 2 / layers) if gc else 1.0)
    calib = fit.get(strategy, {})

    def peak(batch: int) -> int:  # the calibrated RSS on CPU; the tensor estimate on CUDA
        if device == "cpu" and calib:
            return int(calib["rss_intercept"] + fixed + calib["rss_slope"] * rest * batch / BATCH)
        return int(fixed + rest * batch / BATCH)

    sizes = [b for b in (BATCH, 16, 8, 4, 2, 1) if options or b == BATCH]
    c.batch_size = next((b for b in sizes if peak(b) <= budget), None)
    c.peak_bytes = peak(c.batch_size or sizes[-1])
    if device == "cpu" and calib:
        flops = row.flops * mean_len / seq_len  # FLOPs grow with tokens: the step at the typical length
        c.seconds_per_epoch = calib["seconds_per_flop"] * flops * math.ceil(n / BATCH) * (CHECKPOINT_TIME if gc else 1)
    total = (c.seconds_per_epoch or 0) * (1 if strategy == "linear_probe" else epochs)  # the probe caches once
    c.fits = c.batch_size is not None and (limit is None or total <= limit)
    if c.batch_size is None:
        c.reason = f"needs {_size(c.peak_bytes)} even at batch {sizes[-1]}, over your {_size(budget)}"
    elif not c.fits:
        c.reason = f"{epochs} epochs take about {_duration(total)}, over your {_duration(limit)}"
    untested = [w for w, on in (("rank 16", "r" in opts), (quant, quant), ("checkpointing", gc)) if on]
    if untested and c.fits:
        c.reason = f"{' and '.join(untested)} not benchmarked: quality taken from plain {strategy}"
    return c


def _rank(rec: Recommendation) -> Recommendation:
    """Fitting first, by expected quality; then the fastest within TOLERANCE of the best goes to the top."""
    def key(c: Candidate):
        return (not c.fits, -(c.quality if c.quality is not None else -math.inf), c.quantization is not None,
                c.gradient_checkpointing, bool(c.options), c.seconds_per_epoch or math.inf, c.peak_bytes or math.inf)
    cands = sorted(rec.candidates, key=key)
    top = cands[0]
    if top.fits and top.quality is not None:
        level = [c for c in cands if c.fits and c.quality is not None and c.quality >= top.quality - TOLERANCE
                 and c.quantization is None and not c.gradient_checkpointing]
        fast = min(level, key=lambda c: c.seconds_per_epoch or math.inf, default=top)
        cands.insert(0, cands.pop(cands.index(fast)))
        if fast is not top and fast.seconds_per_epoch and top.seconds_per_epoch:
            fast.reason = (f"within {top.quality - fast.quality:.1f} points of {top.name} at "
                           f"{fast.seconds_per_epoch / top.seconds_per_epoch:.2g}x its time")
        elif not fast.reason:
            fast.reason = "the best expected quality that fits"
    best = cands[0]
    for c in cands[1:]:
        if c.fits and not c.reason and c.quality is not None and best.quality is not None:
            slower = f", {c.seconds_per_epoch / best.seconds_per_epoch:.2g}x the time" if c.seconds_per_epoch and \
                best.seconds_per_epoch else ""
            gap = best.quality - c.quality
            c.reason = f"{abs(gap):.1f} points {'under' if gap >= 0 else 'over'} {best.name} expected{slower}"
        elif c.fits and not c.reason:
            c.reason = "no benchmark records of this strategy near this data size"
    rec.candidates = cands
    return rec
