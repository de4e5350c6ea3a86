"""Tokenizing a Table and batching it: unpadded features, dynamic padding, length-grouped batches.

Reading and validating data files lives in ``adaptkit.data``; this module turns a ``Table`` into
what a training loop consumes.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from adaptkit.recipes.tables import Table
from adaptkit.errors import ConfigError


def tokenize(table: Table, tokenizer, max_length: int = 128) -> list[dict]:
    """One dict per example (``input_ids``, ``attention_mask``, ... and ``labels``), unpadded:
    padding happens per batch in the collator. Pairs are truncated longest-first to ``max_length``."""
    if not isinstance(max_length, int) or max_length < 8:
        raise ConfigError(field="max_length", value=max_length, problem="must be an integer >= 8",
                          fix="use e.g. max_length=128")
    first = [t[0] for t in table.texts]
    second = [t[1] for t in table.texts] if len(table.text_columns) == 2 else None
    enc = tokenizer(first, second, truncation=True, max_length=max_length)
    keys = list(enc.keys())
    return [{**{k: enc[k][i] for k in keys}, "labels": table.labels[i]} for i in range(len(table))]


def make_collator(tokenizer, pad_to_multiple_of: int | None = None):
    """transformers' ``DataCollatorWithPadding``: pads each batch to its longest sequence."""
    from transformers import DataCollatorWithPadding

    if tokenizer.pad_token is None:
        raise ConfigError(field="tokenizer.pad_token", value=None, problem="the tokenizer has no padding token, "
                          "so batches cannot be padded", fix="set tokenizer.pad_token = tokenizer.eos_token (and "
                          "model.config.pad_token_id to match)")
    return DataCollatorWithPadding(tokenizer, pad_to_multiple_of=pad_to_multiple_of, return_tensors="pt")


class LengthGroupedBatchSampler(torch.utils.data.Sampler):
    """Batches of similar length, to cut padding: shuffle (seeded), cut into chunks of
    ``chunk_batches`` batches, sort each chunk by length, split into batches, shuffle the batch
    order. Each pass reshuffles, like a seeded torch ``RandomSampler``: the k-th pass is the same in
    every run with the same seed (``set_epoch(k)`` jumps to it). With ``shuffle=False`` the data
    order is kept and only sorted within chunks."""

    def __init__(self, lengths, batch_size: int, *, shuffle: bool = True, seed: int = 0, chunk_batches: int = 50):
        if not isinstance(batch_size, int) or batch_size < 1 or not isinstance(chunk_batches, int) or chunk_batches < 1:
            raise ConfigError(field="batch_size/chunk_batches", value=(batch_size, chunk_batches),
                              problem="must be positive integers", fix="e.g. batch_size=32, chunk_batches=50")
        self.lengths, self.batch_size, self.shuffle = np.asarray(lengths), batch_size, shuffle
        self.seed, self.chunk, self.epoch = seed, batch_size * chunk_batches, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        rng = np.random.default_rng([self.seed, self.epoch])
        self.epoch += 1
        n = len(self.lengths)
        order = rng.permutation(n) if self.shuffle else np.arange(n)
        batches = []
        for start in range(0, n, self.chunk):  # chunk is a multiple of batch_size: only the last batch is short
            idx = order[start:start + self.chunk]
            idx = idx[np.argsort(-self.lengths[idx], kind="stable")]
            batches += [idx[i:i + self.batch_size].tolist() for i in range(0, len(idx), self.batch_size)]
        if self.shuffle:  # else every chunk would start with its longest batch
            batches = [batches[i] for i in rng.permutation(len(batches))]
        return iter(batches)

    def __len__(self) -> int:
        return math.ceil(len(self.lengths) / self.batch_size)


def make_dataloader(features: list[dict], tokenizer, batch_size: int, *, shuffle: bool = False,
                    group_by_length: bool = False, seed: int = 0) -> torch.utils.data.DataLoader:
    """DataLoader over ``tokenize`` output with dynamic padding; seeded, so runs repeat exactly."""
    collate = make_collator(tokenizer)
    if group_by_length:
        sampler = LengthGroupedBatchSampler([len(f["input_ids"]) for f in features], batch_size,
                                            shuffle=shuffle, seed=seed)
        return torch.utils.data.DataLoader(features, batch_sampler=sampler, collate_fn=collate)
    gen = torch.Generator().manual_seed(seed) if shuffle else None
    return torch.utils.data.DataLoader(features, batch_size=batch_size, shuffle=shuffle, generator=gen,
                                       collate_fn=collate)


def pad_causal_lm(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad token ids and labels built per example; padding gets attention 0 and label -100.

    Masking by position, not by token id, keeps the real eos labelled when pad == eos (transformers'
    ``DataCollatorForLanguageModeling`` labels every pad id -100, so the model would never learn to stop).
    """
    width = max(len(e["input_ids"]) for e in examples)
    pad = lambda key, value: torch.tensor([e[key] + [value] * (width - len(e[key])) for e in examples])  # noqa: E731
    return {"input_ids": pad("input_ids", pad_id), "attention_mask": pad("attention_mask", 0),
            "labels": pad("labels", -100)}


def causal_lm_loader(features: list[dict], batch_size: int, pad_id: int, shuffle: bool, seed: int = 0):
    """Length-grouped batches of ``pad_causal_lm``-padded examples; seeded, so runs repeat exactly."""
    sampler = LengthGroupedBatchSampler([len(f["input_ids"]) for f in features], batch_size, shuffle=shuffle,
                                        seed=seed)
    return torch.utils.data.DataLoader(features, batch_sampler=sampler, collate_fn=lambda b: pad_causal_lm(b, pad_id))
