"""FSDP2 (torch's ``fully_shard``) driven directly, for tests/test_fsdp.py: Accelerate will not run FSDP on CPU.

Launched as 2 CPU processes (``ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2``;
the Accelerator only provides the gloo process group and ``save_adapter``'s main-process logic). For
lora, bottleneck and full on a tiny BERT it trains 20 AdamW steps sharded (each process 16 rows of
a global batch of 32), saves with ``adaptkit.distributed.save_adapter``, and on the main process
trains the same 20 steps unsharded on the whole batch of 32, as one process would. LoRA also stops
at step 10, writes a sharded checkpoint (torch.distributed.checkpoint: model + optimizer), and a
fresh model resumes from it. Everything measured goes to ``<out>/results.json``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import transformers
from accelerate import Accelerator
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

import adaptkit
from adaptkit.distributed import check_sharded_model, save_adapter

STEPS, GLOBAL_BATCH, LENGTH = 20, 32, 12


def build(strategy: str) -> torch.nn.Module:
    torch.manual_seed(0)  # every process builds the same weights, head and adapter
    config = transformers.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=64, num_labels=2,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return adaptkit.adapt(transformers.BertForSequenceClassification(config), strategy)


def batch(step: int, rows: slice) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    ids = torch.randint(3, 99, (GLOBAL_BATCH, LENGTH), generator=g)
    labels = (ids[:, 0] % 2).long()
    return {"input_ids": ids[rows], "labels": labels[rows]}


def shard(model: torch.nn.Module) -> torch.nn.Module:
    for layer in model.get_base_model().bert.encoder.layer if hasattr(model, "get_base_model") \
            else model.bert.encoder.layer:
        fully_shard(layer)
    fully_shard(model)
    return model


def train(model, optimizer, steps: range, rows: slice) -> list[float]:
    losses = []
    for step in steps:
        loss = model(**batch(step, rows)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def make_optimizer(model):
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)


def main(out: Path) -> None:
    accelerator = Accelerator(cpu=True)
    rank, world = accelerator.process_index, accelerator.num_processes
    rows = slice(rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world)
    results = {"world": world}
    for strategy in ("lora", "bottleneck", "full"):
        model = build(strategy)
        check_sharded_model(accelerator, model)
        model = shard(model)
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = make_optimizer(model)
        train(model, optimizer, range(STEPS), rows)
        save_adapter(accelerator, model, out / strategy / "sharded")
        local = sum(p.to_local().numel() for p in trainable if isinstance(p, DTensor))
        if accelerator.is_main_process:
            reference = build(strategy)
            train(reference, make_optimizer(reference), range(STEPS), slice(None))
            adaptkit.save(reference, out / strategy / "one")
            results[strategy] = {"dtensors": sum(isinstance(p, DTensor) for p in trainable),
                                 "trainable": len(trainable), "local_numel": local,
                                 "full_numel": sum(p.numel() for p in trainable)}
        accelerator.wait_for_everyone()

    # resume: stop lora at step 10, checkpoint the shards, continue in a fresh model
    from torch.distributed.checkpoint import load, save
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    model = shard(build("lora"))
    optimizer = make_optimizer(model)
    train(model, optimizer, range(10), rows)
    model_state, optim_state = get_state_dict(model, optimizer)
    save({"model": model_state, "optim": optim_state}, checkpoint_id=str(out / "checkpoint"))
    model = shard(build("lora"))
    optimizer = make_optimizer(model)
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optim": optim_state}
    load(state, checkpoint_id=str(out / "checkpoint"))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    train(model, optimizer, range(10, STEPS), rows)
    save_adapter(accelerator, model, out / "lora" / "resumed")
    if accelerator.is_main_process:
        (out / "results.json").write_text(json.dumps(results))
    accelerator.end_training()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
