"""The model card (README.md) written into every adapter folder.

A Hugging Face card: a YAML header the hub reads (``library_name``, ``base_model`` when the base is a hub
id, ``tags``), then what was trained, how big it is, how to load it, and the data and metrics when the
training code knows them (``write_training``). Every line is filled from the model or left out; nothing
says "More Information Needed".
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

TRAINING_HEADING = "## Training data and results"


def _is_hub_id(name: str | None) -> bool:
    return bool(name) and not Path(name).is_absolute() and not Path(name).exists() and name.count("/") <= 1


def model_card(model: nn.Module, meta: dict[str, Any]) -> str:
    """The card for ``model`` saved with the adaptkit_config.json contents ``meta``."""
    from adaptkit.strategies.base import PeftStrategy
    strategy = meta["strategy"]
    name = strategy.get("method") if strategy["strategy"] == "peft" else strategy["strategy"]
    peft = isinstance(model.__dict__.get("_adaptkit_strategy"), PeftStrategy)
    library = "peft" if peft else "transformers" if strategy["strategy"] == "full" else "adaptkit"
    base = meta["base"]
    header = [f"library_name: {library}"]
    if _is_hub_id(base["name_or_path"]):
        header.append(f"base_model: {json.dumps(base['name_or_path'])}")
    tags = ["adaptkit", name] + (["peft"] if peft else [])
    header.append("tags:")
    header += [f"- {json.dumps(t)}" for t in dict.fromkeys(tags)]
    params = {id(p): p for p in model.parameters()}.values()
    total = sum(p.numel() for p in params)
    trainable = sum(p.numel() for p in params if p.requires_grad)
    options = {k: v for k, v in strategy.items() if k != "strategy"}
    base_line = f"`{base['name_or_path']}`" if base["name_or_path"] else "not recorded (a model built in code)"
    if base.get("revision"):
        base_line += f" at revision `{base['revision']}`"
    lines = ["---", *header, "---", "", f"# {name} adapter for {base['class']}", "",
             f"Trained with adaptkit {meta['adaptkit_version']}: "
             f"strategy `{name}` on the base model {base_line}.", "",
             "## What was trained", "", "| option | value |", "|---|---|"]
    lines += [f"| `{k}` | `{json.dumps(v)}` |" for k, v in sorted(options.items())] or ["| (defaults) | |"]
    lines += ["", f"Trainable parameters: {trainable:,} of {total:,} ({100.0 * trainable / max(total, 1):.2f}%).",
              f"Base config: {', '.join(f'{k}={v}' for k, v in base['config'].items() if v is not None)}."]
    if meta.get("labels"):
        labels = ", ".join(f"{i}: `{n}`" for i, n in meta["labels"]["id2label"].items())
        lines += [f"Labels: {labels}."]
    load = base["name_or_path"] or "path/to/base"
    lines += ["", "## How to load", "", "```python", "import adaptkit, transformers", "",
              f"base = transformers.{base['class']}.from_pretrained({load!r}"
              + (f", num_labels={len(meta['labels']['id2label'])})" if meta.get("labels") else ")"),
              "model = adaptkit.load(\"path/to/this/folder\", base)", "```"]
    if peft:
        lines += ["", "It is also a PEFT folder: `peft.PeftModel.from_pretrained(base, \"path/to/this/folder\")`."]
    elif strategy["strategy"] == "full":
        lines += ["", f"It is also a whole model: `transformers.{base['class']}.from_pretrained(\"path/to/this/folder\")`."]
    return "\n".join(lines) + "\n"


def write_training(directory: str | Path, data: str, metrics: dict[str, float] | None = None) -> None:
    """Add (or replace) the card's section naming the training data and the measured metrics."""
    path = Path(directory) / "README.md"
    text = path.read_text()
    text = text.split(f"\n{TRAINING_HEADING}\n")[0].rstrip("\n")
    section = [f"\n\n{TRAINING_HEADING}\n", f"Data: {data}"]
    if metrics:
        section += ["", "| metric | value |", "|---|---:|"]
        section += [f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in metrics.items()]
    tmp = path.with_name(".README.md.tmp")
    tmp.write_text(text + "\n".join(section) + "\n")
    tmp.replace(path)
