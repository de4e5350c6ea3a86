"""Minimal LoRA fine-tuning with Accelerate: the same file on CPU, one GPU or many.

Trains a LoRA adapter (optionally on an 8-bit or 4-bit base) on ``sentence<TAB>label`` TSV files,
evaluates on the dev file, and saves the adapter once, from the main process (adaptkit.distributed.save_adapter).
Every process writes ``ranks/rank<i>.json``, so a run shows how many processes it really was.

    # one process (CPU or one GPU)
    python recipes/minimal.py --model PATH --data $ADAPTKIT_DATA/sst2 --out runs/minimal
    # 8 GPUs, DDP; give the count twice: adaptkit refuses a run that came up as fewer processes
    accelerate launch --num_processes 8 recipes/minimal.py --model PATH --data DIR --out OUT --processes 8
    # 2 CPU processes (`accelerate launch --cpu --num_processes 2` silently starts ONE process)
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 --num_machines 1 \\
        --mixed_precision no --dynamo_backend no recipes/minimal.py --model PATH --data DIR --out OUT --processes 2
    # 8-bit base: add --quantization 8bit (needs pip install 'adaptkit[bitsandbytes]')

``--per-device-batch`` is per process: 2 processes x 16 train on the same global batch as 1 x 32,
and with ``--dropout 0`` they give the same loss curve (tests/test_distributed.py checks it).
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.utils.data import DataLoader
from transformers import AutoConfig, AutoTokenizer

import adaptkit
from adaptkit.distributed import check_sharding, require_processes, save_adapter
from adaptkit.errors import DataError
from adaptkit.quantization import load_model, refuse_remote_code
from adaptkit.recipes import guards, runs


def read_tsv(path: Path) -> list[tuple[str, int]]:
    """(sentence, label) rows; a missing file, no rows or a label other than 0/1 is refused naming the file and row."""
    if not path.is_file():
        raise DataError(field="--data", value=str(path), problem="no such file", fix="pass a folder holding train.tsv "
                        "and dev.tsv, each with a header line 'sentence<TAB>label'")
    rows = list(csv.DictReader(read_utf8(path).splitlines(), delimiter="\t", quoting=csv.QUOTE_NONE))
    for i, row in enumerate(rows):  # texts hold literal quotes: no quoting
        if row.get("label") not in ("0", "1") or not row.get("sentence"):
            raise DataError(field=f"{path}, row {i + 2}", value=row, problem="needs a sentence and a label 0 or 1",
                            fix="fix the row, or use recipes/classify.py for other labels")
    guards.require_examples(len(rows), path)
    return [(row["sentence"], int(row["label"])) for row in rows]


def read_utf8(path: Path) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataError(field=str(path), value=f"byte 0x{err.object[err.start]:02x} at offset {err.start}",
                        problem="is not UTF-8 text",
                        fix=f"convert it, e.g. iconv -f latin1 -t utf-8 {Path(path).name} > fixed.txt") from None


def make_loader(rows, tokenizer, batch_size: int, shuffle: bool, seed: int, max_length: int) -> DataLoader:
    def collate(items):
        enc = tokenizer([text for text, _ in items], padding=True, truncation=True, max_length=max_length,
                        return_tensors="pt")
        enc["labels"] = torch.tensor([label for _, label in items])
        return enc
    return DataLoader(rows, batch_size=batch_size, shuffle=shuffle, collate_fn=collate,
                      generator=torch.Generator().manual_seed(seed))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="HF model folder or name")
    p.add_argument("--data", required=True, type=Path, help="folder with train.tsv and dev.tsv")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--quantization", choices=["8bit", "4bit"], default=None)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--per-device-batch", dest="batch_size", type=int, default=32, help="per process")
    p.add_argument("--lr", dest="learning_rate", type=float, default=5e-4)
    p.add_argument("--rank", type=int, default=8, help="LoRA rank")
    p.add_argument("--dropout", type=float, default=None, help="set every dropout (model and LoRA); default: keep")
    p.add_argument("--max-length", type=int, default=None, help="default 64, or what the model has room for")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--processes", type=int, default=None, help="process count you launched (else $ADAPTKIT_PROCESSES)")
    p.add_argument("--cpu", action="store_true", help="force CPU (same as ACCELERATE_USE_CPU=1)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    # the guards the other recipes keep: flag values (NaN, inf, 0 steps), one run per --out, data, lengths, NaN losses
    guards.check_numbers(args, {"learning_rate": "--lr", "batch_size": "--per-device-batch"})
    refuse_remote_code(args.model)  # before AutoConfig, which would ask at a terminal whether to run it
    train_rows, dev_rows = read_tsv(args.data / "train.tsv"), read_tsv(args.data / "dev.tsv")
    guards.require_classes([label for _, label in train_rows], args.data / "train.tsv")
    args.out = args.out.expanduser()

    accelerator = Accelerator(cpu=args.cpu)
    world = require_processes(accelerator, args.processes)
    check_sharding(accelerator)  # FSDP1 / ZeRO-3 refused with the fix; FSDP2 is gathered when saving
    lock = runs.lock_folder(args.out, "--out") if accelerator.is_main_process else None  # one run per --out
    set_seed(args.seed)  # same seed everywhere: every rank builds the same head and adapter
    config = AutoConfig.from_pretrained(args.model, num_labels=2, trust_remote_code=False)
    lora = adaptkit.LoRA(r=args.rank)
    if args.dropout is not None:
        for key, value in config.to_dict().items():
            if "dropout" in key and isinstance(value, float):
                setattr(config, key, args.dropout)
        lora = adaptkit.LoRA(r=args.rank, dropout=args.dropout)
    model = load_model(args.model, "seq_cls", args.quantization, config=config,
                       gradient_checkpointing=args.gradient_checkpointing)
    model = adaptkit.adapt(model, lora)
    accelerator.print(adaptkit.summary(model))
    max_length = guards.fit_max_length(model, args.max_length, 64)

    tokenizer = AutoTokenizer.from_pretrained(args.model, trust_remote_code=False)
    train = make_loader(train_rows, tokenizer, args.batch_size, True, args.seed, max_length)
    dev = make_loader(dev_rows, tokenizer, args.batch_size, False, args.seed, max_length)
    optimizer = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=args.learning_rate)
    model, optimizer, train, dev = accelerator.prepare(model, optimizer, train, dev)

    losses: list[float] = []
    model.train()
    while len(losses) < args.steps:
        for batch in train:
            loss = model(**batch).loss
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
            losses.append(accelerator.gather(loss.detach()).mean().item())  # mean over the global batch
            guards.check_finite_loss(losses[-1], len(losses))  # every process sees the same mean: all stop together
            if len(losses) == args.steps:
                break

    model.eval()
    logits, labels = [], []
    with torch.no_grad():
        for batch in dev:  # each process scores its share; gather_for_metrics drops the padding repeats
            logits.append(accelerator.gather_for_metrics(model(**batch).logits))
            labels.append(accelerator.gather_for_metrics(batch["labels"]))
    logits, labels = torch.cat(logits).float().cpu(), torch.cat(labels).cpu()

    ranks = args.out / "ranks"
    ranks.mkdir(parents=True, exist_ok=True)
    (ranks / f"rank{accelerator.process_index}.json").write_text(json.dumps(
        {"rank": accelerator.process_index, "world_size": world, "device": str(accelerator.device),
         "steps": len(losses)}))
    guards.check_finite_weights(accelerator.unwrap_model(model), len(losses))
    save_adapter(accelerator, model, args.out / "adapter")  # every process takes part; the main one writes once
    if accelerator.is_main_process:  # one writer: the results exist exactly once
        accuracy = (logits.argmax(-1) == labels).float().mean().item()
        (args.out / "results.json").write_text(json.dumps(
            {"processes": world, "global_batch": world * args.batch_size, "losses": losses,
             "dev_accuracy": accuracy, "dev_logits": logits.tolist()}))
        accelerator.print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f}, dev accuracy {accuracy:.4f}, "
                          f"adapter in {args.out / 'adapter'}")
    accelerator.end_training()
    if lock is not None:
        lock.release()


if __name__ == "__main__":
    main()
