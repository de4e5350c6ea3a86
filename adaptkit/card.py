"""The model card (README.md) of every adapter folder, through ``huggingface_hub.ModelCard``. PEFT's own card
stays as PEFT wrote it, plus adaptkit's tag and section (what trained, its size, how to load it); native
strategies get a card with that section and a header the hub reads (``library_name``, ``base_model``, ``tags``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard, ModelCardData
from torch import nn

from adaptkit import folders

HEADING = "## adaptkit"
TRAINING_HEADING = "## Training data and results"


def write(model: nn.Module, directory: Path, meta: dict[str, Any]) -> None:
    """Add adaptkit's section to the card in ``directory`` (PEFT's, where PEFT wrote one), or write a new card."""
    strategy, base = meta["strategy"], meta["base"]
    name = strategy.get("method") if strategy["strategy"] == "peft" else strategy["strategy"]
    path = directory / "README.md"
    hub_id = base["name_or_path"] if _is_hub_id(base["name_or_path"]) else None
    library = "transformers" if strategy["strategy"] == "full" else "adaptkit"
    header = ModelCardData(library_name=library, base_model=hub_id).to_yaml()
    title = f"# {name} adapter for {base['class']}"
    card = ModelCard.load(path) if path.is_file() else ModelCard(f"---\n{header}\n---\n\n{title}\n")
    card.data.tags = list(dict.fromkeys([*(card.data.tags or []), "adaptkit", name]))
    params = {id(p): p for p in model.parameters()}.values()
    total, trainable = sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)
    options = {k: v for k, v in strategy.items() if k != "strategy"}
    load = base["name_or_path"] or "path/to/base"
    labels = meta.get("labels") and meta["labels"]["id2label"]
    lines = ["", HEADING, "", f"Trained with adaptkit {meta['adaptkit_version']}: strategy `{name}` on the base model "
             + (f"`{base['name_or_path']}`." if base["name_or_path"] else "built in code (not recorded)."), "",
             "| option | value |", "|---|---|", *([f"| `{k}` | `{json.dumps(v)}` |" for k, v in sorted(options.items())]
                                               or ["| (defaults) | |"]), "",
             f"Trainable parameters: {trainable:,} of {total:,} ({100.0 * trainable / max(total, 1):.2f}%).",
             f"Base config: {', '.join(f'{k}={v}' for k, v in base['config'].items() if v is not None)}."]
    lines += [f"Labels: {', '.join(f'{i}: `{n}`' for i, n in labels.items())}."] if labels else []
    lines += ["", "```python", "import adaptkit, transformers", "",
              f"base = transformers.{base['class']}.from_pretrained({load!r}"
              + (f", num_labels={len(labels)})" if labels else ")"), 'model = adaptkit.load("path/to/folder", base)',
              "```"]
    if strategy["strategy"] == "full":
        lines += ["", f"It is also a whole model: `transformers.{base['class']}.from_pretrained(\"path/to/folder\")`."]
    card.text = card.text.rstrip("\n") + "\n" + "\n".join(lines) + "\n"
    path.write_text(str(card))


def _is_hub_id(name: str | None) -> bool:
    return bool(name) and not Path(name).is_absolute() and not Path(name).exists() and name.count("/") <= 1


def write_training(directory: str | Path, data: str, metrics: dict[str, float] | None = None) -> None:
    """Add (or replace) the card's section naming the training data and the measured metrics."""
    path = Path(directory) / "README.md"
    card = ModelCard.load(path)
    section = [f"\n\n{TRAINING_HEADING}\n", f"Data: {data}"]
    if metrics:
        section += ["", "| metric | value |", "|---|---:|"]
        section += [f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in metrics.items()]
    card.text = card.text.split(f"\n{TRAINING_HEADING}\n")[0].rstrip("\n") + "\n".join(section) + "\n"
    folders.write_text(path, str(card))
    folders.record(Path(directory), "README.md")  # the manifest keeps proving adaptkit wrote it
