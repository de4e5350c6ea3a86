"""A Table or language-model rows turned into batches: tokenizing, dynamic padding, length-grouped batches.

Language-model rows: one format per split (``LM_FORMATS``); chats are rendered by the tokenizer's chat template,
ShareGPT turns read as messages. Only responses are labelled; ``--max-length`` cuts the prompt side first.
"""

from __future__ import annotations

import numpy as np
import torch
from transformers import DataCollatorForSeq2Seq, DataCollatorWithPadding, trainer_pt_utils

from adaptkit.errors import ConfigError, DataError
from adaptkit.recipes.data import Table

LM_FORMATS = {"messages": ("messages",), "sharegpt": ("conversations",), "alpaca": ("instruction", "output"),
              "prompt_response": ("prompt", "response"), "text": ("text",)}
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
# Alpaca's own prompt (tatsu-lab/stanford_alpaca), with and without an input
ALPACA = ("Below is an instruction that describes a task{0}. Write a response that appropriately completes the "
          "request.\n\n### Instruction:\n{1}\n\n{2}### Response:\n")


def tokenize(table: Table, tokenizer, max_length: int = 128) -> list[dict]:
    """One unpadded dict per example (the collator pads per batch); pairs truncated longest-first."""
    if not isinstance(max_length, int) or max_length < 8:
        raise ConfigError(field="max_length", value=max_length, problem="must be an integer >= 8", fix="e.g. 128")
    texts = [table.data.data.column(c).to_pylist() for c in table.text_columns]
    enc = tokenizer(*texts, truncation=True, max_length=max_length)
    return [{**{k: enc[k][i] for k in enc}, "labels": label} for i, label in enumerate(table.labels)]


def make_collator(tokenizer):
    if tokenizer.pad_token is None:
        raise ConfigError("tokenizer.pad_token", None, "cannot pad", "set tokenizer.pad_token = tokenizer.eos_token")
    return DataCollatorWithPadding(tokenizer, return_tensors="pt")


def check_vocab(model, tokenizer) -> None:
    """A token id past the model's embeddings is an IndexError mid-run: refuse it before training."""
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        raise ConfigError("--tokenizer-name", f"{len(tokenizer)} tokens", f"is larger than the model's {rows} "
                          "embedding rows", "use the model's tokenizer, or resize_token_embeddings and save as --model")


class LengthGroupedSampler(trainer_pt_utils.LengthGroupedSampler):
    """transformers' length grouping with pass k drawn from (seed, k): exact resume needs pass k to be the same in
    every run (``set_epoch(k)``, which Accelerate calls), and transformers' draws every pass from one generator."""

    def __init__(self, lengths: list[int], batch_size: int, seed: int = 0):
        self.seed, self.epoch, self.rng = seed, 0, torch.Generator()
        super().__init__(batch_size, lengths=lengths, generator=self.rng)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        self.rng.manual_seed(int(np.random.SeedSequence([self.seed, self.epoch]).generate_state(1)[0]))
        self.epoch += 1  # a plain DataLoader never calls set_epoch: its next pass reshuffles all the same
        return super().__iter__()


def make_dataloader(features: list[dict], tokenizer, batch_size: int, *, shuffle: bool = False,
                    group_by_length: bool = False, seed: int = 0, collate=None) -> torch.utils.data.DataLoader:
    collate = collate or make_collator(tokenizer)
    if not group_by_length:
        gen = torch.Generator().manual_seed(seed) if shuffle else None
        return torch.utils.data.DataLoader(features, batch_size, shuffle=shuffle, generator=gen, collate_fn=collate)
    lengths = [len(f["input_ids"]) for f in features]
    # evaluation's order does not matter: sorted by length outright, the least padding
    order = LengthGroupedSampler(lengths, batch_size, seed) if shuffle else np.argsort(lengths, kind="stable").tolist()
    return torch.utils.data.DataLoader(features, batch_size, sampler=order, collate_fn=collate)


def causal_lm_loader(features: list[dict], batch_size: int, tokenizer, shuffle: bool, seed: int = 0):
    """Padded by ``DataCollatorForSeq2Seq`` (labels -100 by position, so pad == eos is safe; the LM collator would
    unlabel every eos and the model would never learn to stop)."""
    collate = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100, return_tensors="pt")
    return make_dataloader(features, tokenizer, batch_size, shuffle=shuffle, group_by_length=True, seed=seed,
                           collate=collate)


# ------------------------------------------------------------------------------------ language-model rows

def lm_format(ds) -> str | None:
    return next((f for f, cols in LM_FORMATS.items() if set(cols) <= set(ds.column_names)), None)


def lm_rows(ds, where: str):
    """One split's rows checked before training (rows as in the file); blank ``.txt`` lines dropped."""
    fmt = lm_format(ds)
    if fmt is None:
        raise DataError(field=where, value=ds.column_names, problem="has none of the known formats",
                        fix='write {"text": ...}, {"prompt": ..., "response": ...}, {"instruction": ..., "input": ..., '
                            '"output": ...}, {"messages": [{"role": ..., "content": ...}, ...]} or ShareGPT '
                            '{"conversations": [{"from": ..., "value": ...}, ...]} records, or .txt lines')
    columns = [*LM_FORMATS[fmt], *(["input"] if fmt == "alpaca" and "input" in ds.column_names else [])]
    for i, row in enumerate(ds.select_columns(columns)):
        if any(row[c] is None for c in LM_FORMATS[fmt]):
            raise DataError(f"{where}, row {i + 1}", row, f"mixes two formats (this is {fmt})", "use one per file")
        for c in columns:
            if fmt in ("messages", "sharegpt"):
                row[c] = _turns(row[c], fmt, f"{where}, row {i + 1}")
            elif not isinstance(row[c], str) and (row[c] is not None or c != "input"):
                raise DataError(f"{where}, row {i + 1}, {c!r}", row[c], "must be text", f"write {c} as a JSON string")
    if fmt == "sharegpt":
        ds = ds.map(lambda r: {"messages": _turns(r["conversations"], fmt, where)}, remove_columns=["conversations"])
    if fmt == "text" and not len(ds := ds.filter(lambda row: bool(row["text"].strip()))):
        raise DataError(where, "0 non-blank lines", "holds no training examples", "write one example per line")
    return ds


def _turns(turns, fmt: str, where: str) -> list[dict]:
    key, text, roles = ("role", "content", ("system", "user", "assistant")) if fmt == "messages" else \
        ("from", "value", tuple(SHAREGPT_ROLES))
    if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
        raise DataError(f"{where}, {LM_FORMATS[fmt][0]!r}", str(turns)[:60], f"must be a list of {{{key!r}: ..., "
                        f"{text!r}: ...}} turns", "write the chat as a JSON list of turns")
    out = [{"role": SHAREGPT_ROLES.get(t.get(key)) if fmt == "sharegpt" else t.get(key), "content": t.get(text)}
           for t in turns]
    for k, (t, o) in enumerate(zip(turns, out)):
        if t.get(key) not in roles or not isinstance(o["content"], str):
            raise DataError(f"{where}, turn {k + 1}", {key: t.get(key), text: t.get(text)},
                            f"needs {key} in {list(roles)} and {text} as text", f"use {{{key!r}: ..., {text!r}: ...}}")
    said = [o["role"] for o in out if o["role"] != "system"]
    if not said or said[0] != "user" or "assistant" not in said:
        raise DataError(where, said, "a chat must start with the user and hold an assistant turn to train on",
                        "drop the conversation, or put the user's turn first and add the answer")
    return out


def encode(example: dict, tokenizer, max_length: int = 0) -> dict:
    """Ids and labels (eos appended, prompt -100); past ``max_length`` the prompt's start goes first."""
    return _encode(example, tokenizer, max_length)[0]


def _encode(example: dict, tokenizer, max_length: int) -> tuple[dict, tuple[int, int, int]]:
    if "messages" in example:
        ids, labels = _chat_ids(example["messages"], tokenizer)
    elif "text" in example:
        ids = tokenizer(example["text"])["input_ids"] + [tokenizer.eos_token_id]
        labels = list(ids)
    else:
        if "instruction" in example:
            extra = example.get("input") or ""
            example = {"prompt": ALPACA.format(", paired with an input that provides further context" if extra else "",
                                               example["instruction"], f"### Input:\n{extra}\n\n" if extra else ""),
                       "response": example["output"]}
        prompt = tokenizer(example["prompt"])["input_ids"]
        answer = tokenizer(example["response"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids, labels = prompt + answer, [-100] * len(prompt) + answer
    lead = next(i for i, t in enumerate(labels) if t != -100)  # the prompt before the first labelled token
    answer, cut = len(ids) - lead, 0
    if max_length and len(ids) > max_length:
        cut = min(len(ids) - max_length, lead)
        ids, labels = ids[cut:cut + max_length], labels[cut:cut + max_length]
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}, (cut, lead, answer)


def encode_split(ds, tokenizer, max_length: int, notes: list[str], where: str) -> list[dict]:
    """``encode`` every row, noting cuts; an answer that leaves no room for its prompt is refused (it teaches nothing)."""
    if "messages" in ds.column_names and not tokenizer.chat_template:
        raise ConfigError("tokenizer.chat_template", None, f"{where} holds chats but the tokenizer has no chat "
                          "template to render them", "use a chat model's tokenizer, or set tokenizer.chat_template")
    features, cuts = zip(*(_encode(row, tokenizer, max_length) for row in ds))
    cut, lead, answer = np.array(cuts).reshape(-1, 3).T
    if (i := next((i for i in range(len(cut)) if 0 < lead[i] <= cut[i]), None)) is not None:
        raise DataError(f"{where}, the example {str(ds[i])[:60]}", f"--max-length {max_length}", f"leaves none of its "
                        f"prompt: the answer alone is {answer[i]} tokens (the longest answer: {answer.max()})",
                        f"raise --max-length above {answer.max()} plus room for the prompt, or drop the row")
    texts = (lead == 0) & (answer > max_length) if max_length else lead < 0  # texts are all answer: cut at the end
    if (cut > 0).any() or texts.any():
        notes.append(f"{where}: --max-length {max_length} cut the prompt of {(cut > 0).sum()} examples (the answer "
                     f"kept whole) and the end of {texts.sum()} texts")
    return list(features)


def pack(features: list[dict], block_size: int, notes: list[str] | None = None) -> list[dict]:
    """run_clm's group_texts; a block with no labelled token is dropped too (its loss would be 0/0)."""
    ids = [t for f in features for t in f["input_ids"]]
    labels = [t for f in features for t in f["labels"]]
    if len(ids) < block_size:
        raise DataError("--block-size", block_size, f"a split has {len(ids)} tokens, fewer than one block", "lower it")
    blocks = [{"input_ids": ids[i:i + block_size], "attention_mask": [1] * block_size, "labels": labels[i:i + block_size]}
              for i in range(0, len(ids) - block_size + 1, block_size)]
    kept = [b for b in blocks if any(t != -100 for t in b["labels"])]
    if len(kept) < len(blocks) and notes is not None:
        notes.append(f"--block-size {block_size}: {len(blocks) - len(kept)} blocks held prompt tokens only, dropped")
    return kept


def prompt_ids(example: dict, tokenizer) -> list[int]:
    if "messages" in example:
        last = max(i for i, m in enumerate(example["messages"]) if m["role"] == "assistant")
        return tokenizer.apply_chat_template(example["messages"][:last], add_generation_prompt=True, tokenize=True,
                                             return_dict=False)
    encoded = encode(example, tokenizer, 0)
    if "text" in example:
        return encoded["input_ids"][: max(1, (len(encoded["input_ids"]) - 1) // 2)]
    return encoded["input_ids"][: encoded["labels"].count(-100)]  # the masked prompt


def _chat_ids(messages: list[dict], tokenizer) -> tuple[list[int], list[int]]:
    ids, labels = [], []
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = tokenizer.apply_chat_template(messages[:k], add_generation_prompt=True, tokenize=True, return_dict=False)
        full = tokenizer.apply_chat_template(messages[:k + 1], tokenize=True, return_dict=False)
        if full[:len(ids)] != ids or prompt[:len(ids)] != ids or full[:len(prompt)] != prompt:
            raise ConfigError("tokenizer.chat_template", message["content"][:40], "renders a chat differently from its "
                              "start, so the assistant's turns cannot be told apart", "use a prefix-stable template")
        labels += [-100] * (len(prompt) - len(ids)) + full[len(prompt):]
        ids = full
    if ids[-1] != tokenizer.eos_token_id:  # templates that end turns with their own marker still learn to stop
        ids, labels = ids + [tokenizer.eos_token_id], labels + [tokenizer.eos_token_id]
    return ids, labels
