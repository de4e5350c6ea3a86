"""adaptkit.recipes.data: files read by datasets into checked tables, the split convention, tokenizing, batching.

Small files written per test cover every error; the real GLUE copies under $ADAPTKIT_DATA check the
counts published in its README.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from adaptkit.recipes.batching import LengthGroupedSampler, make_collator, make_dataloader, tokenize
from adaptkit.recipes.data import read_table
from adaptkit.recipes.sources import load_splits
from adaptkit.errors import ConfigError, ConfigTypeError, DataError


def write(tmp_path, name, text, mode="w"):
    path = tmp_path / name
    if mode == "wb":
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------ good files

def test_tsv_keeps_literal_quotes_and_ignores_extra_columns(tmp_path):
    path = write(tmp_path, "t.tsv", 'id\tsentence\tlabel\n7\the said "hi\t1\n8\t"quoted" text\t0\n\n')
    table = read_table(path)
    assert table.texts == [('he said "hi',), ('"quoted" text',)]  # default CSV quoting would merge rows
    assert table.labels == [1, 0] and table.num_labels == 2 and table.task == "classification"
    assert table.text_columns == ("sentence",) and table.label_names is None and table.path == str(path)


def test_csv_quoting_jsonl_and_json_array(tmp_path):
    csv_table = read_table(write(tmp_path, "a.csv", 'text,label\n"one, two",1\nthree,0\n'))
    assert csv_table.texts == [("one, two",), ("three",)]
    lines = '{"text_a": "x", "text_b": "y", "label": 2.5}\n\n{"text_a": "u", "text_b": "v", "label": 1}\n'
    jsonl = read_table(write(tmp_path, "b.jsonl", lines))
    assert jsonl.texts == [("x", "y"), ("u", "v")] and jsonl.labels == [2.5, 1.0] and jsonl.task == "regression"
    arr = read_table(write(tmp_path, "c.json", '[{"sentence": "a", "label": 0}, {"sentence": "b", "label": 1}]'))
    assert arr.labels == [0, 1]


def test_string_labels_sorted_and_forced_tasks(tmp_path):
    path = write(tmp_path, "s.tsv", "sentence\tlabel\na\tpos\nb\tneg\nc\tneutral\nd\tpos\n")
    table = read_table(path)
    assert table.label_names == ["neg", "neutral", "pos"] and table.labels == [2, 0, 1, 2] and table.num_labels == 3
    ints = write(tmp_path, "i.tsv", "sentence\tlabel\na\t1\nb\t3\n")
    assert read_table(ints, task="regression").labels == [1.0, 3.0]
    assert read_table(ints).num_labels == 4  # max + 1: class 0 and 2 may just be absent from a small file
    assert read_table(ints, num_labels=5).num_labels == 5
    assert read_table(ints, text_columns=["sentence"], label_column="label").text_columns == ("sentence",)


def test_utf8_bom_is_dropped(tmp_path):
    path = write(tmp_path, "bom.tsv", "\ufeffsentence\tlabel\nx\t0\ny\t1\n".encode("utf-8"), mode="wb")
    assert read_table(path).text_columns == ("sentence",)


# ---------------------------------------------------------------------------------------- errors

@pytest.mark.parametrize("name, content, match", [
    ("e.tsv", "", "the file is empty"),
    ("h.tsv", "sentence\tlabel\n", r"has a header \['sentence', 'label'\] but no data rows"),
    ("l.tsv", "sentence\tlabels\na\t1\n", r"label_column='label': no such column; the columns are "
                                          r"\['sentence', 'labels'\]. Fix: pass label_column='labels'"),
    ("t.tsv", "review\tlabel\na\t1\n", r"no text column; the columns are \['review', 'label'\].*text_columns=\["),
    ("a.tsv", "sentence\ttext\tlabel\na\tb\t1\n", r"ambiguous text columns: \[\['sentence'\], \['text'\]\]"),
    ("w.tsv", "sentence\tlabel\na\t1\nb\tc\t0\nd\t1\n", r"w.tsv, line 3.*has 3 fields but the header has 2.*"
                                                        r"wrong delimiter or quoting"),
    ("q.csv", 'sentence,label\na,1\nb, c,0\n', r"q.csv, line 3.*has 3 fields.*quote fields that hold commas"),
    # one field too many in the FIRST data row: pandas took column 1 as an index and shifted every column
    ("f.tsv", "sentence\tlabel\na\t1\tx\nb\t0\n", r"f.tsv, line 2.*has 3 fields but the header has 2"),
    ("f.csv", "sentence,label\na good film,1,x\nb,0\n", r"f.csv, line 2.*has 3 fields but the header has 2"),
    ("u.csv", 'sentence,label\n"open,1\n', r"u.csv, line 2.*malformed CSV"),
    ("d.csv", "sentence\tlabel\na\t1\n", r"wrong delimiter: the header is one column holding tabs.*rename the file "
                                        r"to .tsv"),
    ("d.tsv", "sentence,label\na,1\n", r"wrong delimiter.*holding commas.*rename the file to .csv"),
    ("dup.tsv", "sentence\tsentence\tlabel\na\tb\t1\n", "empty or repeated column names"),
    ("el.tsv", "sentence\tlabel\na\t1\nb\t\n", r"el.tsv, row 2, column 'label'=''.*empty label"),
    ("et.tsv", "sentence\tlabel\na\t1\n \t0\n", r"et.tsv, row 2, column 'sentence'.*text is empty"),
    ("m.tsv", "sentence\tlabel\na\t1\nb\tpos\n", r"mixed label types: a number at row 1 and a string at row 2"),
    ("n.tsv", "sentence\tlabel\na\t1\nb\t-1\n", r"n.tsv, row 2, label='-1'.*negative.*GLUE writes -1"),
    ("o.tsv", "sentence\tlabel\na\t0\nb\t0\n", r"only one class; classification needs at least 2"),
    ("nan.tsv", "sentence\tlabel\na\t0.5\nb\tnan\n", r"row 2, label='nan'.*not a finite number"),
    ("j.jsonl", '{"sentence": "a", "label": 1}\n{"sentence": "b", "label": 0\n', r"j.jsonl, record 2.*not valid JSON"),
    ("k.jsonl", '{"sentence": "a", "label": 1}\n{"sentence": "b"}\n', r"k.jsonl, row 2='label'.*no such key"),
    ("b.jsonl", '{"sentence": "a", "label": true}\n', "a label must be a number or a string"),
    ("x.jsonl", '[1, 2]\n', r"no text column; the columns are \['text'\]|no such column"),
])
def test_bad_files_raise_dataerror_naming_the_problem(tmp_path, name, content, match):
    with pytest.raises(DataError, match=match):
        read_table(write(tmp_path, name, content))


def test_bad_paths(tmp_path):
    with pytest.raises(DataError, match=r"path='.*nope.tsv': no such file"):
        read_table(tmp_path / "nope.tsv")
    with pytest.raises(DataError, match=r"is a folder, not a file. Fix: pass a file such as .*train.tsv"):
        read_table(tmp_path)
    with pytest.raises(DataError, match=r"unknown extension '.xlsx'.*\['.tsv', '.csv', '.jsonl', '.json', '.parquet'"):
        read_table(write(tmp_path, "x.xlsx", "sentence\tlabel\na\t1\n"))


def test_non_utf8_names_byte_offset_and_line(tmp_path):
    path = write(tmp_path, "latin.tsv", "sentence\tlabel\ncaf\xe9\t1\n".encode("latin-1"), mode="wb")
    with pytest.raises(DataError, match=r"byte 0xe9 at offset 18 \(line 2\).*not valid UTF-8.*iconv"):
        read_table(path)


def test_label_range_and_label_set_checks(tmp_path):
    path = write(tmp_path, "r.tsv", "sentence\tlabel\na\t0\nb\t5\n")
    with pytest.raises(DataError, match=r"r.tsv, row 2, label='5': is out of range for num_labels=2.*0..1"):
        read_table(path, num_labels=2)
    names = write(tmp_path, "n.tsv", "sentence\tlabel\na\tpos\nb\tmaybe\n")
    with pytest.raises(DataError, match=r"label='maybe': is not one of the known classes \['neg', 'pos'\]"):
        read_table(names, label_names=["neg", "pos"])
    with pytest.raises(ConfigError, match=r"num_labels=3: .* has 2 classes"):
        read_table(names, num_labels=3)
    floats = write(tmp_path, "f.tsv", "sentence\tlabel\na\t0.5\nb\t1\n")
    with pytest.raises(DataError, match=r"label='0.5': is not an integer class id but task='classification'"):
        read_table(floats, task="classification")
    with pytest.raises(DataError, match=r"label='pos': is not a number but task='regression'"):
        read_table(names, task="regression")


def test_more_bad_inputs(tmp_path):
    path = write(tmp_path, "p.tsv", "premise\thypothesis\tlabel\na\tb\t1\nc\td\t0\n")
    assert read_table(path, text_columns=["premise", "hypothesis"]).texts == [("a", "b"), ("c", "d")]
    with pytest.raises(DataError, match=r"text_columns=\['hyp'\]: not found; the columns are \['premise'"):
        read_table(path, text_columns=["premise", "hyp"])
    with pytest.raises(ConfigError, match="num_labels=2: regression has one output"):
        read_table(write(tmp_path, "r.tsv", "text\tlabel\na\t0.5\n"), num_labels=2)
    with pytest.raises(DataError, match=r"a.json.*not valid JSON"):
        read_table(write(tmp_path, "a.json", '[{"text": "a", "label": 1},]'))


def test_bad_options():
    with pytest.raises(ConfigTypeError, match=r"text_columns='sentence'.*Fix: text_columns=\['sentence'\]"):
        read_table("x.tsv", text_columns="sentence")
    with pytest.raises(ConfigError, match="must name 1 or 2 columns"):
        read_table("x.tsv", text_columns=["a", "b", "c"])
    with pytest.raises(ConfigError, match=r"task='classify': must be None or one of"):
        read_table("x.tsv", task="classify")
    with pytest.raises(ConfigError, match="validation_fraction=1.5"):
        load_splits("x", validation_fraction=1.5)
    with pytest.raises(ConfigError, match="keys must be 'train'"):
        load_splits({"dev": "x.tsv"})


# ---------------------------------------------------------------------------------------- splits

def _folder(tmp_path, **files):
    for name, text in files.items():
        write(tmp_path, name.replace("_", "."), text)
    return tmp_path


ROWS = "sentence\tlabel\n" + "".join(f"s{i}\t{i % 2}\n" for i in range(40))


def test_split_roles_and_carving(tmp_path):
    (tmp_path / "g").mkdir()
    dev = "sentence\tlabel\n" + "".join(f"d{i}\t{i % 2}\n" for i in range(4))
    glue = load_splits(_folder(tmp_path / "g", train_tsv=ROWS, dev_tsv=dev))
    assert glue.test is None and len(glue.validation) == 4 and len(glue.train) == 40  # dev is validation, no test
    bench = load_splits(tmp_path / "g", select_on_train_carve=True)  # the benchmark's protocol, asked for
    assert len(bench.test) == 4 and len(bench.validation) == 4 and len(bench.train) == 36
    assert Counter(bench.validation.labels) == {0: 2, 1: 2}  # stratified
    assert any("carved from train" in n for n in bench.notes) and any("scored as the test set" in n for n in bench.notes)
    again = load_splits(tmp_path / "g", select_on_train_carve=True)
    assert again.validation.texts == bench.validation.texts  # fixed seed
    other = load_splits(tmp_path / "g", seed=1, select_on_train_carve=True)
    assert other.validation.texts != bench.validation.texts
    assert sorted(bench.train.texts + bench.validation.texts) == sorted(read_table(tmp_path / "g/train.tsv").texts)

    (tmp_path / "s").mkdir()
    sst = load_splits(_folder(tmp_path / "s", train_tsv=ROWS, dev_tsv=ROWS, test_csv="sentence,label\na,0\nb,1\n"))
    assert len(sst.train) == 40 and len(sst.validation) == 40 and len(sst.test) == 2  # dev -> validation
    with pytest.raises(ConfigError, match=r"--select-on-train-carve=.*validation split would go unused"):
        load_splits(tmp_path / "s", select_on_train_carve=True)
    only = load_splits(tmp_path / "s" / "train.tsv")
    assert only.test is None and len(only.validation) == 4
    explicit = load_splits({"train": tmp_path / "s/train.tsv", "validation": tmp_path / "s/dev.tsv"})
    assert len(explicit.validation) == 40 and explicit.test is None


def test_a_folder_and_the_same_files_named_one_by_one_give_the_same_splits(tmp_path):
    # issue 29 #4: --data dir/ turned validation.csv into the test set and carved validation from train
    dev = "sentence,label\n" + "".join(f"d{i},{i % 2}\n" for i in range(6))
    folder = _folder(tmp_path, train_csv=ROWS.replace("\t", ","), validation_csv=dev)
    by_folder = load_splits(folder)
    by_files = load_splits({"train": folder / "train.csv", "validation": folder / "validation.csv"})
    for a, b in ((by_folder, by_files),):
        assert a.test is None and b.test is None
        assert (a.train.texts, a.validation.texts) == (b.train.texts, b.validation.texts)
    assert len(by_folder.validation) == 6 and len(by_folder.train) == 40


def test_split_label_set_comes_from_train(tmp_path):
    (tmp_path / "f").mkdir()
    folder = _folder(tmp_path / "f", train_tsv="sentence\tlabel\na\tneg\nb\tpos\nc\tneg\nd\tpos\n",
                     validation_tsv="sentence\tlabel\na\tpos\n", test_tsv="sentence\tlabel\nz\tmaybe\n")
    with pytest.raises(DataError, match=r"test.tsv, row 1, label='maybe': is not one of the known classes"):
        load_splits(folder)


def test_split_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty=\[\]: the folder has no train file"):
        load_splits(tmp_path / "empty")
    with pytest.raises(DataError, match=r"the folder has no train file.*Fix: add train.tsv"):
        load_splits(_folder(tmp_path, dev_tsv=ROWS))
    write(tmp_path, "train.tsv", ROWS)
    write(tmp_path, "train.csv", "sentence,label\na,1\n")
    with pytest.raises(DataError, match=r"several train files"):
        load_splits(tmp_path)
    (tmp_path / "train.csv").unlink()
    write(tmp_path, "validation.tsv", ROWS)
    with pytest.raises(DataError, match=r"\['dev.tsv', 'validation.tsv'\]: several validation files"):
        load_splits(tmp_path)
    with pytest.raises(DataError, match=r"source='.*missing.tsv': no such file or folder"):
        load_splits(str(tmp_path / "missing.tsv"))
    lonely = write(tmp_path, "one.tsv", "sentence\tlabel\na\t0\nb\t1\nc\t1\nd\t1\n")
    with pytest.raises(DataError, match=r"cannot carve it.*Fix: add examples, or pass a validation file"):
        load_splits(lonely, validation_fraction=0.25)


def test_hub_name_offline_fails_fast_with_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(DataError, match=r"--dataset-name='nyu-mll/glue sst2': the Hugging Face hub.*failed.*"
                                        r"Fix: pass a local folder"):
        load_splits(dataset_name="nyu-mll/glue", dataset_config="sst2")
    assert time.monotonic() - start < 10


def test_dataset_dict_source_drops_hidden_test_labels():
    datasets = pytest.importorskip("datasets")
    feats = datasets.Features({"sentence": datasets.Value("string"),
                               "label": datasets.ClassLabel(names=["negative", "positive"])})
    part = lambda labels: datasets.Dataset.from_dict(  # noqa: E731
        {"sentence": [f"s{i}" for i in range(len(labels))], "label": labels}, features=feats)
    dd = datasets.DatasetDict(train=part([0, 1] * 10), validation=part([1, 0, 1]), test=part([-1, -1]))
    with pytest.raises(DataError, match="no train split"):
        load_splits(datasets.DatasetDict(validation=part([0, 1])))
    splits = load_splits(dd)  # the hidden test split is dropped; validation stays validation
    assert splits.test is None and len(splits.validation) == 3 and len(splits.train) == 20
    splits = load_splits(dd, select_on_train_carve=True)
    assert len(splits.test) == 3 and len(splits.validation) == 2 and len(splits.train) == 18  # GLUE's protocol
    assert splits.train.label_names == ["negative", "positive"] and splits.train.num_labels == 2


# ------------------------------------------------------------------------------------- real data

def test_real_glue_files_match_the_data_readme(data_dir):
    sst2 = read_table(data_dir / "sst2" / "train.tsv")
    assert len(sst2) == 6920 and Counter(sst2.labels) == {0: 3310, 1: 3610}
    mrpc = read_table(data_dir / "mrpc" / "train.tsv")
    assert mrpc.text_columns == ("sentence1", "sentence2") and Counter(mrpc.labels) == {0: 1194, 1: 2474}
    assert any('"' in a + b for a, b in mrpc.texts)  # literal quotes survive (quoting off)
    stsb = read_table(data_dir / "stsb" / "train.tsv")
    assert stsb.task == "regression" and len(stsb) == 5749 and all(isinstance(v, float) for v in stsb.labels)
    assert min(stsb.labels) >= 0 and max(stsb.labels) <= 5 and np.mean(stsb.labels) == pytest.approx(2.701, abs=1e-3)

    splits = load_splits(data_dir / "sst2")  # sst2 has its own test set: dev is the validation split
    assert (len(splits.train), len(splits.validation), len(splits.test)) == (6920, 872, 1821)
    assert len(load_splits(data_dir / "mrpc").validation) == 408  # GLUE's dev: validation, no test
    mrpc_splits = load_splits(data_dir / "mrpc", select_on_train_carve=True)  # the benchmark: dev is the test split
    assert len(mrpc_splits.test) == 408 and len(mrpc_splits.train) + len(mrpc_splits.validation) == 3668
    share = np.mean(mrpc_splits.validation.labels)
    assert share == pytest.approx(2474 / 3668, abs=0.01)


# ------------------------------------------------------------------------------ tokenize & batch

@pytest.fixture
def tokenizer(minilm_path):
    import transformers
    return transformers.AutoTokenizer.from_pretrained(minilm_path)


def test_tokenize_and_pad_single_and_pairs(tmp_path, tokenizer):
    single = read_table(write(tmp_path, "s.tsv", "sentence\tlabel\nshort\t0\n" + "a long one " * 30 + "\t1\n"))
    feats = tokenize(single, tokenizer, max_length=16)
    assert len(feats[1]["input_ids"]) == 16 and len(feats[0]["input_ids"]) == 3  # [CLS] short [SEP], unpadded
    batch = make_collator(tokenizer)(feats)
    assert batch["input_ids"].shape == (2, 16) and batch["attention_mask"][0].sum() == 3
    assert batch["labels"].dtype == torch.int64 and batch["labels"].tolist() == [0, 1]

    pair = read_table(write(tmp_path, "p.tsv", "sentence1\tsentence2\tlabel\nthe cat\ta dog\t2.5\n"))
    feats = tokenize(pair, tokenizer, max_length=16)
    batch = make_collator(tokenizer)(feats)
    assert batch["token_type_ids"][0].tolist() == [0, 0, 0, 0, 1, 1, 1]  # [CLS] the cat [SEP] a dog [SEP]
    assert batch["labels"].dtype == torch.float32
    with pytest.raises(ConfigError, match="max_length=2"):
        tokenize(pair, tokenizer, max_length=2)


def test_missing_pad_token_is_refused(tokenizer):
    tokenizer.pad_token = None
    with pytest.raises(ConfigError, match=r"tokenizer.pad_token=None.*Fix: set tokenizer.pad_token"):
        make_collator(tokenizer)


def test_length_grouped_sampler_is_a_deterministic_permutation_with_less_padding():
    lengths = np.random.default_rng(0).integers(3, 60, size=1003).tolist()
    sampler = LengthGroupedSampler(lengths, batch_size=16, seed=3)
    order = list(sampler)
    assert len(order) == len(sampler) == 1003 and sorted(order) == list(range(1003))
    assert order == list(LengthGroupedSampler(lengths, batch_size=16, seed=3))  # the same in every run ...
    assert order != list(LengthGroupedSampler(lengths, batch_size=16, seed=4))  # ... with the seed
    assert list(sampler) != order  # the next pass reshuffles (epoch advances by itself) ...
    sampler.set_epoch(0)
    assert list(sampler) == order  # ... and set_epoch replays a pass

    def padded(order):  # the DataLoader's batches: consecutive slices of batch_size
        return sum(len(b) * max(lengths[i] for i in b) for b in (order[i:i + 16] for i in range(0, 1003, 16)))
    assert padded(order) < 0.75 * padded(np.random.default_rng(1).permutation(1003).tolist())


def test_make_dataloader_covers_every_example(tmp_path, tokenizer):
    rows = "".join(f"{'word ' * (i % 7 + 1)}\t{i % 2}\n" for i in range(50))
    feats = tokenize(read_table(write(tmp_path, "d.tsv", "sentence\tlabel\n" + rows)), tokenizer)
    for group in (False, True):
        make = lambda: make_dataloader(feats, tokenizer, batch_size=8, shuffle=True,  # noqa: E731
                                       group_by_length=group, seed=0)
        loader = make()
        passes = [[b["labels"].tolist() + b["input_ids"].sum(1).tolist() for b in loader] for _ in range(2)]
        assert sum(len(b) for b in passes[0]) == 100  # 50 labels + 50 sums: every example once
        assert passes[0] != passes[1]  # each pass reshuffles ...
        again = make()
        assert passes == [[b["labels"].tolist() + b["input_ids"].sum(1).tolist() for b in again] for _ in range(2)]


# ------------------------------------------------------------------- formats and sources of datasets

def test_parquet_save_to_disk_and_dataset_name_read_through_datasets(tmp_path):
    datasets = pytest.importorskip("datasets")
    feats = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["neg", "pos"])})
    part = lambda n, seed: datasets.Dataset.from_dict(  # noqa: E731
        {"text": [f"t{seed}-{i}" for i in range(n)], "label": [i % 2 for i in range(n)]}, features=feats)
    dd = datasets.DatasetDict(train=part(20, 0), validation=part(6, 1), test=part(4, 2))
    dd.save_to_disk(tmp_path / "saved")  # a DatasetDict folder: train/ validation/ test/ + dataset_dict.json
    saved = load_splits(tmp_path / "saved")
    assert (len(saved.train), len(saved.validation), len(saved.test)) == (20, 6, 4)
    assert saved.train.label_names == ["neg", "pos"]  # from the ClassLabel, not sorted strings
    (tmp_path / "pq").mkdir()
    for split, ds in dd.items():
        ds.to_parquet(tmp_path / "pq" / f"{split}.parquet")
    pq = load_splits(tmp_path / "pq")
    assert pq.validation.texts == saved.validation.texts and pq.train.label_names == ["neg", "pos"]
    named = load_splits(dataset_name=str(tmp_path / "pq"))  # load_dataset(name): a hub id or a local folder
    assert named.test.texts == saved.test.texts
    one = read_table(tmp_path / "pq" / "test.parquet")
    assert one.labels == [0, 1, 0, 1] and one.path.endswith("test.parquet")


def test_one_split_convention_and_seeded_sampling(tmp_path):
    dev = "sentence\tlabel\n" + "".join(f"d{i}\t{i % 2}\n" for i in range(6))
    (tmp_path / "a").mkdir()
    glue = load_splits(_folder(tmp_path / "a", train_tsv=ROWS, dev_tsv=dev), select_on_train_carve=True)
    assert len(glue.test) == 6 and any("scored as the test set" in n for n in glue.notes)
    sampled = load_splits(tmp_path / "a", max_train=10, max_eval=3, seed=5, select_on_train_carve=True)
    assert len(sampled.train) == 10 and len(sampled.validation) == 3 and len(sampled.test) == 3
    assert sampled.train.texts != glue.train.texts[:10]  # a seeded random subset, not the first rows ...
    assert sampled.train.texts == load_splits(tmp_path / "a", max_train=10, seed=5,
                                              select_on_train_carve=True).train.texts  # ... repeatably


# ------------------------------------------------------- holes of issues 29 and 30: labels, columns, folders

def test_a_missing_label_column_is_named_with_the_columns_that_exist(tmp_path):
    # issue 29 #8: was "no labelled train split. Fix: use a dataset with a 'train' split"
    folder = _folder(tmp_path, train_tsv="sentence\tstars\na\t1\nb\t0\n")
    with pytest.raises(DataError, match=r"train.tsv label_column='label': no such column; the columns are "
                                        r"\['sentence', 'stars'\]"):
        load_splits(folder)


def test_whole_number_floats_are_classes_and_label_errors_name_the_row_as_written(tmp_path):
    # issue 29 #16: 0.0/1.0 trained as regression (Pearson NaN, exit 0)
    table = read_table(write(tmp_path, "w.tsv", "sentence\tlabel\na\t1.0\nb\t0.0\nc\t1.0\n"))
    assert table.task == "classification" and table.labels == [1, 0, 1] and table.num_labels == 2
    assert "whole-number floats (e.g. 1.0) read as class ids" in table.notes[0]
    as_json = read_table(write(tmp_path, "w.jsonl", '{"text": "a", "label": 0.0}\n{"text": "b", "label": 2.0}\n'))
    assert as_json.task == "classification" and as_json.num_labels == 3
    assert read_table(write(tmp_path, "s.tsv", "sentence\tlabel\na\t0.5\nb\t1.0\n")).task == "regression"
    assert read_table(tmp_path / "w.tsv", task="regression").labels == [1.0, 0.0, 1.0]
    # the error named "row 1 '1.0'" where the file says 1: cells are read as written, the culprit named
    mixed = write(tmp_path, "m.tsv", "sentence\tlabel\na\t1\nb\t0.5\n")
    with pytest.raises(DataError, match=r"m.tsv, row 2, label='0.5': is not an integer class id"):
        read_table(mixed, task="classification")
    huge = write(tmp_path, "h.tsv", "sentence\tlabel\na\t1\nb\t12345678901234567890\n")
    with pytest.raises(DataError, match=r"h.tsv, row 2, label='12345678901234567890': is not a plausible class id"):
        read_table(huge)


def test_labels_are_typed_with_datasets_own_features(tmp_path):
    import datasets
    table = read_table(write(tmp_path, "n.tsv", "sentence\tlabel\na\tpos\nb\tneg\n"))
    assert table.data.features["labels"] == datasets.ClassLabel(names=["neg", "pos"])
    scores = read_table(write(tmp_path, "r.tsv", "sentence\tlabel\na\t0.5\nb\t2.5\n"))
    assert scores.data.features["labels"] == datasets.Value("float32") and scores.labels == [0.5, 2.5]


def test_a_folder_of_files_that_do_not_share_columns_is_a_typed_error(tmp_path):
    # issue 30: --dataset-name <folder of mixed files> gave a raw DatasetGenerationCastError
    write(tmp_path, "a.csv", "sentence,label\nx,1\n")
    write(tmp_path, "b.csv", "text,score,extra\ny,0.5,z\n")
    with pytest.raises(DataError, match=r"--dataset-name=.*do not share one set of columns and types \['a.csv', "
                                        r"'b.csv'\].*Fix: keep one format per folder"):
        load_splits(dataset_name=str(tmp_path))


def _png(path, size=(4, 4)):
    from PIL import Image
    Image.new("RGB", size).save(path)
    return path


def _truncated_jpeg(path):
    from PIL import Image
    pixels = (np.random.default_rng(0).random((64, 64, 3)) * 255).astype("uint8")
    Image.fromarray(pixels).save(path, "JPEG")
    path.write_bytes(path.read_bytes()[:-1500])


def _claims_size(path, width, height):
    """A valid small PNG whose header claims another size (a decompression bomb, without the memory)."""
    import struct
    import zlib
    raw = bytearray(_png(path).read_bytes())
    raw[16:24] = struct.pack(">II", width, height)
    raw[29:33] = struct.pack(">I", zlib.crc32(bytes(raw[12:29])))
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("name, spoil", [
    ("corrupt.png", lambda p: p.write_bytes(_png(p).read_bytes()[:60] + b"garbage" * 20)),
    ("empty.jpg", lambda p: p.write_bytes(b"")),
    ("cut.jpg", lambda p: _truncated_jpeg(p)),  # PIL's verify() passes it; decoding it fails
    ("bomb.png", lambda p: _claims_size(p, 30000, 30000)),
])
def test_bad_images_are_named_before_training(tmp_path, name, spoil):
    # issue 30: raw PIL errors in the middle of training
    from adaptkit.recipes.sources import check_images, load_raw
    for cls in ("cat", "dog"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(3):
            _png(tmp_path / "imgs" / cls / f"{i}.png")
    spoil(tmp_path / "imgs" / "dog" / name)
    raw, where = load_raw(tmp_path / "imgs")
    with pytest.raises(DataError, match=rf"image='.*dog/{name}': cannot be used"):
        check_images(raw["train"], where["train"])


# --------------------------------------------------------------------------- language-model rows

@pytest.fixture(scope="module")
def words():
    """A word-level tokenizer with an eos and a chat template; every word below is in its vocabulary."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers
    vocab = ["[UNK]", "</s>", "user", "assistant", "system", ":", "a", "fine", "film", "positive", "negative", "rate",
             "it", "very", "long", "prompt", "=>"]
    raw = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="</s>", unk_token="[UNK]")
    tokenizer.chat_template = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} \n{% endfor %}"
                               "{% if add_generation_prompt %}assistant :{% endif %}")
    return tokenizer


def _lm_rows(tmp_path, name, records):
    import json
    from adaptkit.recipes import batching, data
    path = write(tmp_path, name, "".join(json.dumps(r) + "\n" for r in records))
    return batching.lm_rows(data.read_file(path), str(path))


def test_sharegpt_turns_are_read_as_messages(tmp_path, words):
    from adaptkit.recipes import batching
    turns = [{"from": "system", "value": "rate it"}, {"from": "human", "value": "a fine film"},
             {"from": "gpt", "value": "positive"}]
    ds = _lm_rows(tmp_path, "share.jsonl", [{"conversations": turns}] * 2)
    assert ds.column_names == ["messages"] and batching.lm_format(ds) == "messages"
    assert ds[0]["messages"] == [{"role": "system", "content": "rate it"}, {"role": "user", "content": "a fine film"},
                                 {"role": "assistant", "content": "positive"}]
    encoded = batching.encode(ds[0], words)
    assert [t for t, label in zip(encoded["input_ids"], encoded["labels"]) if label != -100][0] == \
        words.convert_tokens_to_ids("positive")


CHAT = [{"role": "user", "content": "a fine film"}, {"role": "assistant", "content": "positive"}]


@pytest.mark.parametrize("records, match", [
    ([{"messages": CHAT}, {"messages": "user: a fine film"}], r"x.jsonl, row 2, 'messages'='user: a fine film': must "
                                                             r"be a list of \{'role': ..., 'content': ...\} turns"),
    ([{"messages": "user: a fine film"}], r"x.jsonl, row 1, 'messages'.*must be a list of \{'role'"),
    ([{"messages": CHAT}, {"messages": CHAT[::-1]}], r"x.jsonl, row 2=\['assistant', 'user'\]: a chat must start with "
                                                     r"the user and hold an assistant turn"),
    ([{"messages": CHAT}, {"messages": CHAT[:1]}], r"x.jsonl, row 2=\['user'\]: a chat must start with the user"),
    ([{"messages": CHAT}, {"messages": [CHAT[0], {"role": "assistant", "content": None}]}],
     r"x.jsonl, row 2, turn 2.*needs role in \['system', 'user', 'assistant'\] and content as text"),
    ([{"messages": [{"role": "user", "content": ["a", "fine"]}, {"role": "assistant", "content": ["ok"]}]}],
     r"x.jsonl, row 1, turn 1=\{'role': 'user', 'content': \['a', 'fine'\]\}.*content as text"),
    ([{"conversations": [{"from": "human", "value": "a"}, {"from": "bot", "value": "b"}]}],
     r"x.jsonl, row 1, turn 2=\{'from': 'bot'.*needs from in \['system', 'human', 'user', 'gpt', 'assistant'\]"),
    ([{"instruction": "rate it", "output": "positive"}, {"instruction": "rate it", "output": 1}],
     r"x.jsonl, row 2, 'output'=1: must be text. Fix: write output as a JSON string"),
    ([{"instruction": "rate it", "output": 1}], r"x.jsonl, row 1, 'output'=1: must be text"),
    ([{"text": "a fine film"}, {"prompt": "a", "response": "b"}], r"x.jsonl, row 1=.*mixes two formats \(this is prompt_response\)"),
])
def test_chat_and_instruction_rows_of_the_wrong_type_are_named_by_file_and_row(tmp_path, records, match):
    # issue 29 #17 and issue 30: list content trained as its repr, null as empty text; raw KeyError/TypeError
    with pytest.raises(DataError, match=match):
        _lm_rows(tmp_path, "x.jsonl", records)


def test_blank_text_files_and_chats_without_a_template_are_refused_naming_the_file(tmp_path, words):
    import copy
    from adaptkit.recipes import batching, data
    path = write(tmp_path, "blank.txt", "\n  \n\n")
    with pytest.raises(DataError, match=r"blank.txt='0 non-blank lines': holds no training examples"):
        batching.lm_rows(data.read_file(path), str(path))
    kept = batching.lm_rows(data.read_file(write(tmp_path, "t.txt", "a fine film\n\nit\n")), "t.txt")
    assert kept["text"] == ["a fine film", "it"]
    plain = copy.deepcopy(words)
    plain.chat_template = None
    ds = _lm_rows(tmp_path, "c.jsonl", [{"messages": CHAT}])
    with pytest.raises(ConfigError, match=r"tokenizer.chat_template=None: c.jsonl holds chats but the tokenizer has no "
                                          r"chat template"):
        batching.encode_split(ds, plain, 0, [], "c.jsonl")


def test_max_length_cuts_the_prompt_first_and_says_so(tmp_path, words):
    # issue 29 #2: the answer, the only labelled part, was cut off from the right, with no word
    from adaptkit.recipes import batching
    long = {"prompt": "a very long prompt " * 5 + "=>", "response": "positive"}
    ds = _lm_rows(tmp_path, "p.jsonl", [long, {"prompt": "rate it =>", "response": "negative"}])
    notes = []
    features = batching.encode_split(ds, words, 8, notes, "p.jsonl")
    assert features[0]["input_ids"][-3:] == [words.convert_tokens_to_ids(w) for w in ("=>", "positive", "</s>")]
    assert features[0]["labels"][-2:] == [words.convert_tokens_to_ids("positive"), words.eos_token_id]
    assert len(features[0]["input_ids"]) == 8 and features[1] == batching.encode(ds[1], words)
    assert notes == ["p.jsonl: --max-length 8 cut the prompt of 1 examples (the answer kept whole) and the end of 0 texts"]
    answer = {"prompt": "rate it", "response": "a very long film " * 3}
    ds = _lm_rows(tmp_path, "a.jsonl", [answer])
    with pytest.raises(DataError, match=r"max-length 8'?: leaves none of its prompt: the answer alone is 13 tokens "
                                        r"\(the longest answer: 13\). Fix: raise --max-length above 13"):
        batching.encode_split(ds, words, 8, [], "a.jsonl")


def test_a_tokenizer_larger_than_the_embeddings_is_refused_with_the_fix(words):
    # issue 29 #6: IndexError: index out of range in self, mid-run
    import transformers
    from adaptkit.recipes import batching
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=10, n_embd=8, n_layer=1, n_head=2))
    with pytest.raises(ConfigError, match=r"--tokenizer-name='17 tokens': is larger than the model's 10 embedding rows"
                                          r".*resize_token_embeddings"):
        batching.check_vocab(model, words)
    batching.check_vocab(transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=17, n_embd=8, n_layer=1,
                                                                              n_head=2)), words)


def test_a_two_label_base_classifier_is_re_headed_for_three_classes(tmp_path, minilm_path):
    # issue 30: classify.py --model <a 2-label classifier> on 3-class data gave a raw ignore_mismatched_sizes error
    import importlib.util
    import transformers
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_path)
    config = transformers.BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=1,
                                     num_attention_heads=4, intermediate_size=64, num_labels=2)
    transformers.BertForSequenceClassification(config).save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    rows = [f"{w} film number {i}\t{w}\n" for i in range(12) for w in ("good", "bad", "fine")]
    _folder(tmp_path, train_tsv="sentence\tlabel\n" + "".join(rows), test_tsv="sentence\tlabel\n" + "".join(rows[:9]))
    recipe = Path(__file__).resolve().parent.parent / "recipes" / "classify.py"
    spec = importlib.util.spec_from_file_location("classify_rehead", recipe)
    classify = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(classify)
    metrics = classify.main(["--data", str(tmp_path), "--model", str(tmp_path / "base"), "--strategy", "lora",
                             "--output-dir", str(tmp_path / "out"), "--max-steps", "2", "--batch-size", "8",
                             "--report-to", "none"])
    assert set(metrics["test"]) >= {"accuracy", "macro_f1"}  # three classes: a fresh 3-way head, as run_glue makes
    saved = json.loads((tmp_path / "out" / "adapter" / "adaptkit_config.json").read_text())
    assert "bad" in json.dumps(saved)  # the class names travel with the adapter


def test_row_errors_count_rows_in_the_file_not_after_the_validation_carve(tmp_path):
    # issue 30: typed errors named no file or row, or rows counted after the split
    import argparse
    import json as _json
    from adaptkit.recipes import batching, sources
    rows = [{"messages": CHAT}] * 30
    rows[24] = {"messages": [{"role": "human", "content": "a fine film"}, CHAT[1]]}
    write(tmp_path, "chats.jsonl", "".join(_json.dumps(r) + "\n" for r in rows))
    parser = argparse.ArgumentParser()
    sources.add_data_args(parser)
    args = parser.parse_args(["--data", str(tmp_path / "chats.jsonl")])
    args.seed = 0
    with pytest.raises(DataError, match=r"chats.jsonl, row 25, turn 1=\{'role': 'human'"):
        sources.splits_from_args(args, prepare=batching.lm_rows, label_column=None)
