"""The recipes never end silently wrong: bad flag values, data that cannot train, a diverging run, two
runs on one folder and a damaged or stale checkpoint each end in a typed error naming the flag, file
or step and the fix. Tiny models with 64 positions, data written here (a few dozen rows), in process.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import accelerate
import pytest
import torch
from safetensors.torch import load_file

from adaptkit import errors
from adaptkit.recipes import checkpoints, guards, training

ROOT = Path(__file__).resolve().parents[1]
WORDS = "good bad fine awful great poor nice dull film plot acting story music long short".split()


def recipe(name: str):
    spec = importlib.util.spec_from_file_location(f"recipe_{name}", ROOT / "recipes" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _sentences(n: int, seed: int = 0) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    return [" ".join(WORDS[i] for i in torch.randint(len(WORDS), (6,), generator=g).tolist()) for _ in range(n)]


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    """A 64-position BERT and GPT-2 (word-level tokenizer) on disk, a labelled TSV and a text corpus."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    root = tmp_path_factory.mktemp("guards")
    words = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    words.train_from_iterator(WORDS, trainers.WordLevelTrainer(special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]",
                                                                               "</s>"]))
    bert_tok = transformers.PreTrainedTokenizerFast(tokenizer_object=words, unk_token="[UNK]", pad_token="[PAD]",
                                                    cls_token="[CLS]", sep_token="[SEP]", eos_token="</s>")
    small = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    torch.manual_seed(0)
    transformers.BertModel(transformers.BertConfig(vocab_size=len(bert_tok), max_position_embeddings=64,
                                                   **small)).save_pretrained(root / "bert")
    bert_tok.save_pretrained(root / "bert")
    transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=len(bert_tok), n_embd=32, n_layer=2, n_head=4, n_positions=64, eos_token_id=4,
        bos_token_id=4)).save_pretrained(root / "gpt2")
    bert_tok.save_pretrained(root / "gpt2")
    (root / "sst").mkdir()
    rows = [f"{s}\t{i % 2}" for i, s in enumerate(_sentences(60))]
    (root / "sst" / "train.tsv").write_text("sentence\tlabel\n" + "\n".join(rows[:48]) + "\n")
    (root / "sst" / "dev.tsv").write_text("sentence\tlabel\n" + "\n".join(rows[48:]) + "\n")
    (root / "text").mkdir()
    (root / "text" / "train.txt").write_text("\n".join(_sentences(40, seed=1)) + "\n")
    return {"bert": root / "bert", "gpt2": root / "gpt2", "sst": root / "sst", "text": root / "text"}


def classify(assets, out: Path, *extra: str) -> list[str]:
    return ["--data", str(assets["sst"]), "--model", str(assets["bert"]), "--output-dir", str(out),
            "--batch-size", "8", "--max-length", "32", *extra]


def causal(assets, out: Path, data: Path, *extra: str) -> list[str]:
    return ["--data", str(data), "--model", str(assets["gpt2"]), "--output-dir", str(out), "--batch-size", "8",
            "--max-steps", "2", "--num-samples", "0", *extra]


# ---- flag values: refused before anything loads ---------------------------------------------------------
@pytest.mark.parametrize("flag,value,match", [
    ("--learning-rate", "inf", r"--learning-rate=inf: is not a finite number"),
    ("--learning-rate", "nan", r"--learning-rate=nan: is not a finite number"),
    ("--learning-rate", "0", r"--learning-rate=0.0: must be greater than 0"),
    ("--weight-decay", "nan", r"--weight-decay=nan: is not a finite number"),
    ("--weight-decay", "-0.1", r"--weight-decay=-0.1: must be at least 0. Fix: pass a non-negative value"),
    ("--max-grad-norm", "inf", r"--max-grad-norm=inf: is not a finite number"),
    ("--warmup-ratio", "nan", r"--warmup-ratio=nan: is not a finite number"),
    ("--validation-fraction", "-0.2", r"--validation-fraction=-0.2: must be at least 0"),
    ("--max-train-samples", "-5", r"--max-train-samples=-5: must be at least 1. Fix: pass an integer >= 1"),
    ("--max-eval-samples", "0", r"--max-eval-samples=0: must be at least 1"),
    ("--max-length", "-1", r"--max-length=-1: must be at least 1"),
    ("--seed", "-1", r"--seed=-1: must be in \[0, 2\*\*32 - 1\]"),  # was numpy's bare ValueError at set_seed
    ("--seed", str(2**32), r"--seed=4294967296: must be in"),
])
def test_non_finite_or_negative_flags_are_refused_before_training(tmp_path, assets, flag, value, match):
    module = recipe("classify")
    with pytest.raises(errors.ConfigError, match=match):
        module.parse_args(classify(assets, tmp_path / "out", flag, value))
    assert not (tmp_path / "out").exists()


# ---- data that cannot train -------------------------------------------------------------------------------
def test_a_single_class_train_set_is_refused(tmp_path, assets):
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "train.tsv").write_text("sentence\tlabel\n" + "".join(f"{s}\t1\n" for s in _sentences(30)))
    args = classify(assets, tmp_path / "out")
    args[1] = str(tmp_path / "one")
    with pytest.raises(errors.DataError, match=r"train.tsv labels=\[1\]: the training examples hold only one class"):
        recipe("classify").main(args)


@pytest.mark.parametrize("content", ["", "\n \n\t\n"])
def test_an_empty_or_blank_corpus_is_refused_not_a_hang(tmp_path, assets, content):
    (tmp_path / "train.txt").write_text(content)
    start = time.monotonic()
    with pytest.raises(errors.DataError, match=r"train.txt.*(empty|holds no training examples|has no text to train on)"):
        recipe("causal_lm").main(causal(assets, tmp_path / "out", tmp_path / "train.txt", "--max-steps", "5"))
    assert time.monotonic() - start < 60


def test_a_corpus_that_is_not_utf8_names_the_file(tmp_path, assets):
    (tmp_path / "latin.txt").write_bytes("caf\xe9 good film\nnice plot\n".encode("latin-1"))
    with pytest.raises(errors.DataError, match=r"latin.txt.*(UTF-8|utf-8)"):
        recipe("causal_lm").main(causal(assets, tmp_path / "out", tmp_path / "latin.txt"))


# ---- sequence length against the model's 64 positions -------------------------------------------------------
def test_classify_max_length_beyond_the_positions(tmp_path, assets):
    with pytest.raises(errors.ConfigError, match=r"--max-length=512: 512 tokens do not fit "
                                                 r"BertForSequenceClassification's 64 positions. Fix: use --max-length <= 64"):
        recipe("classify").main(classify(assets, tmp_path / "out", "--max-length", "512"))


def test_prefix_virtual_tokens_count_against_the_positions(tmp_path, assets):
    with pytest.raises(errors.ConfigError, match=r"--max-length=64: 64 \+ 20 virtual tokens .* = 84 tokens do not "
                                                 r"fit .*64 positions. Fix: use --max-length <= 44"):
        recipe("classify").main(classify(assets, tmp_path / "out", "--max-length", "64", "--strategy", "prefix"))


def test_the_default_max_length_is_clamped_and_said(tmp_path, assets):
    args = [a for a in classify(assets, tmp_path / "out", "--max-steps", "2", "--strategy", "prefix")]
    i = args.index("--max-length")
    del args[i:i + 2]  # the recipe's default, 128, does not fit
    metrics = recipe("classify").main(args)
    assert any("--max-length: default 128 clamped to 44" in note for note in metrics["data"])
    assert metrics["config"]["max_length"] == 44


def test_causal_lm_max_length_and_block_size_beyond_the_positions(tmp_path, assets):
    with pytest.raises(errors.ConfigError, match=r"--max-length=200: 200 tokens do not fit GPT2LMHeadModel's 64 "
                                                 r"positions"):
        recipe("causal_lm").main(causal(assets, tmp_path / "a", assets["text"], "--max-length", "200"))
    with pytest.raises(errors.ConfigError, match=r"--block-size=128: 128 tokens do not fit GPT2LMHeadModel's 64"):
        recipe("causal_lm").main(causal(assets, tmp_path / "b", assets["text"], "--block-size", "128"))


def test_generation_past_the_positions_is_refused_up_front_and_long_prompts_are_cut(tmp_path, assets):
    with pytest.raises(errors.ConfigError, match=r"--max-new-tokens=64: leaves no room for a prompt in the model's "
                                                 r"64 positions. Fix: use --max-new-tokens <= 63"):
        recipe("causal_lm").main(causal(assets, tmp_path / "a", assets["text"], "--max-new-tokens", "64",
                                        "--num-samples", "1"))
    long = tmp_path / "long"
    long.mkdir()
    (long / "train.txt").write_text("\n".join(" ".join(_sentences(12, seed=i)) for i in range(20)) + "\n")  # 72 words
    metrics = recipe("causal_lm").main(causal(assets, tmp_path / "b", long, "--max-new-tokens", "30",
                                              "--num-samples", "2"))
    assert len(metrics["samples"]) == 2 and all(len(s["prompt"].split()) <= 34 for s in metrics["samples"])


# ---- a run that diverges ----------------------------------------------------------------------------------
def test_a_non_finite_loss_stops_the_run_and_no_nan_adapter_is_saved(tmp_path, assets):
    out = tmp_path / "out"
    with pytest.raises(errors.NonFiniteError, match=r"loss=(nan|inf): is not finite at step (\d+); the run stopped"
                                                    r".*Fix: lower --learning-rate") as caught:
        recipe("classify").main(classify(assets, out, "--learning-rate", "1e30", "--max-grad-norm", "0",
                                         "--max-steps", "12", "--eval-every", "1", "--warmup-ratio", "0",
                                         "--strategy", "full"))
    assert isinstance(caught.value, FloatingPointError)
    assert not (out / "metrics.json").exists()
    weights = out / "adapter" / "model.safetensors"
    if weights.exists():  # a best saved before the loss broke holds no NaN
        assert all(torch.isfinite(t).all() for t in load_file(str(weights)).values())


def test_weights_that_went_non_finite_are_not_saved_as_the_best(tmp_path):
    model = torch.nn.Linear(2, 2)
    with torch.no_grad():
        model.weight[0, 0] = float("nan")
    with pytest.raises(errors.NonFiniteError, match=r"trained weights=\['weight'\]: 1 tensor\(s\) hold NaN/inf at "
                                                    r"step 7; not saved as the best"):
        guards.check_finite_weights(model, 7)


# ---- one run per output folder ----------------------------------------------------------------------------
@contextlib.contextmanager
def lock_held(out: Path):
    """Another process (pid recorded as 4242) holding ``out``'s run lock, as a live run does."""
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, sys, time; f = open(sys.argv[1], 'a+'); fcntl.flock(f, fcntl.LOCK_EX); "
        "f.write('pid 4242\\n'); f.flush(); print('locked', flush=True); time.sleep(60)"), str(out / training.LOCK_NAME)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        yield
    finally:
        holder.kill()
        holder.wait()


def test_a_second_run_on_the_same_output_folder_is_refused(tmp_path, assets):
    out = tmp_path / "out"
    with lock_held(out), pytest.raises(errors.RunLockedError, match=r"--output-dir=.*out.: is in use by a run "
                                                                     r"\(pid 4242\)\. Fix: wait for that run to finish"):
        recipe("classify").main(classify(assets, out, "--max-steps", "1", "--overwrite"))
    assert sorted(p.name for p in out.iterdir()) == [training.LOCK_NAME]  # --overwrite deleted nothing
    recipe("classify").main(classify(assets, out, "--max-steps", "1"))  # the lock died with its process


# ---- resume ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def finished_run(assets, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("resume")
    shutil.copytree(assets["sst"], root / "data")
    args = classify(assets, root / "run", "--max-steps", "4", "--checkpoint-every", "2", "--keep-checkpoints", "3",
                    "--log-every", "1")
    args[1] = str(root / "data")
    recipe("classify").main(args)
    return root


def _resume(finished_run: Path, tmp_path: Path, assets) -> tuple[list[str], Path]:
    """A copy of the finished run's folder (the data stays where the run read it), resumed at step 2."""
    shutil.copytree(finished_run / "run", tmp_path / "run")
    checkpoint = tmp_path / "run" / "checkpoints" / "step-0000002"
    args = classify(assets, tmp_path / "run", "--max-steps", "4", "--checkpoint-every", "2", "--keep-checkpoints",
                    "3", "--log-every", "1", "--resume", str(checkpoint))
    args[1] = str(finished_run / "data")
    return args, checkpoint


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("damage,match", [
    (lambda c: _truncate(c / "run_state.json"), r"run_state.json='JSONDecodeError': cannot be read"),
    (lambda c: (c / "run_state.json").write_text(json.dumps(
        {k: v for k, v in json.loads((c / "run_state.json").read_text()).items() if k != "early_stopping"})),
     r"run_state.json=\['early_stopping'\]: lacks these entries"),
    (lambda c: _truncate(c / "optimizer.bin"), r"optimizer.bin='\d+ bytes': changed since the checkpoint was written"),
    (lambda c: _truncate(c / "random_states_0.pkl"), r"random_states_0.pkl='\d+ bytes': changed since"),
    (lambda c: (c / "random_states_0.pkl").unlink(), r"random_states_0.pkl=None: is missing from the checkpoint"),
])
def test_resume_refuses_a_damaged_checkpoint(tmp_path, assets, finished_run, damage, match):
    args, checkpoint = _resume(finished_run, tmp_path, assets)
    damage(checkpoint)
    with pytest.raises(errors.CheckpointError, match=match + r".*Fix: resume from an earlier checkpoint"):
        recipe("classify").main(args)


def test_resume_refuses_a_changed_train_file(tmp_path, assets, finished_run):
    args, _ = _resume(finished_run, tmp_path, assets)
    train = finished_run / "data" / "train.tsv"
    original = train.read_text()
    train.write_text(original.replace("\t0\n", "\t1\n", 1))  # one label flipped
    try:
        with pytest.raises(errors.CheckpointError, match=r"--resume=\[.*train.tsv'\]: the data changed since the "
                                                         r"interrupted run started \(checksums differ\)"):
            recipe("classify").main(args)
    finally:
        train.write_text(original)


def test_an_intact_checkpoint_still_resumes(tmp_path, assets, finished_run):
    args, _ = _resume(finished_run, tmp_path, assets)
    assert recipe("classify").main(args)["steps"] == 4


def _rewrite_digests(checkpoint: Path) -> None:
    """What whoever can edit a checkpoint can do as well: make run_state.json's sha256 digests match again."""
    state = json.loads((checkpoint / "run_state.json").read_text())
    state["files"] = checkpoints.digests(checkpoint, skip="run_state.json")
    (checkpoint / "run_state.json").write_text(json.dumps(state))


class _Planted:
    """A pickle that creates a folder when it is unpickled: the code a hostile checkpoint would run."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


@pytest.mark.parametrize("name,match", [
    ("custom_checkpoint_0.pkl", r"custom_checkpoint_0.pkl=None: is not part of an adaptkit checkpoint"),
    ("random_states_0.pkl", r"random_states_0.pkl='\d+ bytes': cannot be loaded safely \(UnpicklingError"),
    ("optimizer.bin", r"step-0000002='UnpicklingError': cannot be loaded"),
])
def test_resume_runs_no_code_from_a_planted_pickle(tmp_path, assets, finished_run, name, match):
    args, checkpoint = _resume(finished_run, tmp_path, assets)
    marker = tmp_path / "code-ran"
    torch.save(_Planted(marker), checkpoint / name)
    _rewrite_digests(checkpoint)
    with pytest.raises(errors.CheckpointError, match=match + r".*Fix: resume from an earlier checkpoint"):
        recipe("classify").main(args)
    assert not marker.exists()


@pytest.mark.parametrize("damage,match", [
    # Accelerate swallows an RNG state it cannot read and resumed with exit 0, on other random numbers
    (lambda c: _truncate(c / "random_states_0.pkl"), r"random_states_0.pkl='\d+ bytes': cannot be loaded safely"),
    (lambda c: (c / "model.safetensors").write_bytes(bytes((c / "model.safetensors").stat().st_size)),
     r"model.safetensors='SafetensorError': cannot be read"),
    (lambda c: _truncate(c / "optimizer.bin"), r"step-0000002='(RuntimeError|OSError)': cannot be loaded"),
])
def test_a_damaged_checkpoint_with_matching_digests_is_refused(tmp_path, assets, finished_run, damage, match):
    args, checkpoint = _resume(finished_run, tmp_path, assets)
    damage(checkpoint)
    _rewrite_digests(checkpoint)
    with pytest.raises(errors.CheckpointError, match=match + r".*Fix: resume from an earlier checkpoint"):
        recipe("classify").main(args)


@pytest.mark.parametrize("edit,match", [
    (lambda state: state.pop("files"), r"\['files'\]: lacks these entries, or they have the wrong type"),
    (lambda state: state.update(files=["optimizer.bin"]), r"\['files'\]: lacks these entries, or they have the wrong"),
    (lambda state: state.update(config="flags"), r"\['config'\]: lacks these entries, or they have the wrong type"),
])
def test_a_run_state_without_digests_or_of_the_wrong_shape_is_refused(tmp_path, assets, finished_run, edit, match):
    args, checkpoint = _resume(finished_run, tmp_path, assets)
    state = json.loads((checkpoint / "run_state.json").read_text())
    edit(state)
    (checkpoint / "run_state.json").write_text(json.dumps(state))
    with pytest.raises(errors.CheckpointError, match=r"run_state.json=" + match):
        recipe("classify").main(args)


def test_a_resumed_run_logs_each_step_once(tmp_path, assets, finished_run):
    # the run was stopped after its checkpoint at step 2 but had logged steps 3 and 4 (as after a SIGINT)
    args, _ = _resume(finished_run, tmp_path, assets)
    recipe("classify").main(args)
    records = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]


def test_resume_compares_resolved_paths(tmp_path, assets, finished_run, monkeypatch):
    args, _ = _resume(finished_run, tmp_path, assets)
    monkeypatch.chdir(finished_run)
    args[1] = "./data"  # the run was started with the absolute path of the same folder
    assert recipe("classify").main(args)["steps"] == 4


def test_a_finished_run_can_be_extended_but_not_shortened(tmp_path, assets, finished_run):
    shutil.copytree(finished_run / "run", tmp_path / "run")
    args = classify(assets, tmp_path / "run", "--checkpoint-every", "2", "--keep-checkpoints", "3", "--resume")
    args[1] = str(finished_run / "data")
    with pytest.raises(errors.ConfigError, match=r"--resume=\{'max_steps': \[4, 3\]\}: these flags differ from the "
                                                 r"interrupted run \(was, now\); only a higher --max-steps or --epochs"):
        recipe("classify").main([*args, "--max-steps", "3"])
    with pytest.raises(errors.ConfigError, match=r"'seed': \[42, 7\]"):
        recipe("classify").main([*args, "--max-steps", "6", "--seed", "7"])
    metrics = recipe("classify").main([*args, "--max-steps", "6"])
    assert metrics["steps"] == 6 and metrics["max_steps"] == 6
    assert any("--resume: extended from 4 to 6 optimizer steps" in note for note in metrics["notes"])


# ---- the output folder: no write or delete through a link, none of the user's files -------------------------------
@pytest.mark.parametrize("name", [training.LOCK_NAME, "log.jsonl", "metrics.json", "adapter", "checkpoints"])
def test_a_link_where_the_run_writes_is_refused_and_its_target_untouched(tmp_path, assets, name):
    victim = tmp_path / "thesis"
    victim.mkdir() if name in ("adapter", "checkpoints") else victim.write_text("my thesis")
    out = tmp_path / "out"
    out.mkdir()
    (out / name).symlink_to(victim)
    with pytest.raises(errors.ConfigError, match=rf"--output-dir=.*out': holds links where a run writes \(\['{name}'\]\); "
                                                 r"adaptkit writes and deletes through no link it did not make"):
        recipe("classify").main(classify(assets, out, "--max-steps", "1", "--overwrite"))
    assert victim.is_dir() or victim.read_text() == "my thesis"


def test_overwrite_deletes_only_what_the_earlier_run_wrote(tmp_path, assets, finished_run):
    shutil.copytree(finished_run / "run", tmp_path / "run")
    out = tmp_path / "run"
    mine = [out / "adapter" / "my_eval.txt", out / "checkpoints" / "my_best" / "keep.txt",
            out / "checkpoints" / "step-0000002" / "notes.txt", out / "notes.txt", out / "tensorboard" / "mine.txt"]
    for path in mine:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("mine")
    args = classify(assets, out, "--max-steps", "2", "--checkpoint-every", "0", "--overwrite")
    args[1] = str(finished_run / "data")
    assert recipe("classify").main(args)["steps"] == 2
    assert all(path.read_text() == "mine" for path in mine)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["my_best", "step-0000002"]
    assert [p.name for p in (out / "checkpoints" / "step-0000002").iterdir()] == ["notes.txt"]


def test_an_output_dir_that_is_not_a_folder_is_refused(tmp_path, assets):
    (tmp_path / "train.tsv").write_text("sentence\tlabel\n")
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    for out, match in [(tmp_path / "train.tsv", r"train.tsv': is .*train.tsv, which is not a folder"),
                       (tmp_path / "train.tsv" / "out", r"train.tsv/out': goes through .*train.tsv, which is not a folder"),
                       (tmp_path / "loop" / "out", r"loop/out': goes through .*loop, which is not a folder \(a file, or a "
                                                   r"broken or looping link\)")]:
        with pytest.raises(errors.ConfigError, match=r"--output-dir=.*" + match):
            recipe("classify").parse_args(classify(assets, out))
    with pytest.raises(errors.ConfigError, match=r"--output-dir='/proc/adaptkit-run': cannot be created"):
        recipe("classify").main(classify(assets, Path("/proc/adaptkit-run"), "--max-steps", "1"))


def test_a_tilde_output_dir_is_one_folder_for_every_file(tmp_path, assets, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    recipe("classify").main(classify(assets, Path("~/run"), "--max-steps", "1", "--report-to", "none"))
    assert {"adapter", "log.jsonl", "metrics.json", training.LOCK_NAME} <= {p.name for p in (tmp_path / "home" / "run").iterdir()}
    assert not (tmp_path / "~").exists()


# ---- recipes/minimal.py keeps the same guards ---------------------------------------------------------------------
def minimal(assets, out: Path, *extra: str) -> list[str]:
    return ["--model", str(assets["bert"]), "--data", str(assets["sst"]), "--out", str(out), "--steps", "2",
            "--per-device-batch", "8", *extra]


@pytest.mark.parametrize("flags,error,match", [
    (["--lr", "inf"], errors.ConfigError, r"--lr=inf: is not a finite number"),
    (["--lr", "nan"], errors.ConfigError, r"--lr=nan: is not a finite number"),
    (["--steps", "0"], errors.ConfigError, r"--steps=0: must be at least 1"),
    (["--per-device-batch", "0"], errors.ConfigError, r"--per-device-batch=0: must be at least 1"),
    (["--max-length", "302"], errors.ConfigError, r"--max-length=302: 302 tokens do not fit .*64 positions"),
])
def test_minimal_refuses_flags_the_other_recipes_refuse(tmp_path, assets, flags, error, match):
    with pytest.raises(error, match=match):
        recipe("minimal").main(minimal(assets, tmp_path / "out", *flags))


@pytest.mark.parametrize("train,match", [
    ("sentence\tlabel\n", r"train.tsv=0: holds no training examples"),
    ("sentence\tlabel\ngood film\t2\n", r"train.tsv, row 2=.*needs a sentence and a label 0 or 1"),
    (None, r"--data=.*train.tsv': no such file"),
])
def test_minimal_refuses_data_it_cannot_train_on(tmp_path, assets, train, match):
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(assets["sst"] / "dev.tsv", data / "dev.tsv")
    if train is not None:
        (data / "train.tsv").write_text(train)
    args = minimal(assets, tmp_path / "out")
    args[args.index("--data") + 1] = str(data)
    with pytest.raises(errors.DataError, match=match):
        recipe("minimal").main(args)


def test_minimal_stops_on_a_non_finite_loss_and_saves_no_adapter(tmp_path, assets):
    with pytest.raises(errors.NonFiniteError, match=r"loss=(nan|inf): is not finite at step \d+"):
        recipe("minimal").main(minimal(assets, tmp_path / "out", "--lr", "1e30", "--steps", "6"))
    assert not (tmp_path / "out" / "adapter").exists()


def test_minimal_refuses_a_second_run_on_the_same_out(tmp_path, assets):
    out = tmp_path / "out"
    with lock_held(out), pytest.raises(errors.RunLockedError, match=r"--out=.*out': is in use by a run \(pid 4242\)"):
        recipe("minimal").main(minimal(assets, out))


def test_only_a_precision_clash_is_reported_as_one(tmp_path, monkeypatch):
    # Accelerate refuses a changed precision with a ValueError; any other ValueError it raises keeps its own words
    # instead of being blamed on --mixed-precision.
    parser = training.run_parser(None)
    run = training.RunArgs.parse(parser.parse_args(["--output-dir", str(tmp_path / "out"), "--report-to", "none"]), "t")

    def refuse(message):
        def accelerator(*args, **kwargs):
            raise ValueError(message)
        return accelerator

    monkeypatch.setattr(training, "Accelerator", refuse("gradient_accumulation_steps clashes with the plugin"))
    with pytest.raises(ValueError, match="^gradient_accumulation_steps clashes with the plugin$"):
        training.make_accelerator(run)
    accelerate.Accelerator(cpu=True)  # an earlier run's state, which the next Accelerator may not change
    monkeypatch.setattr(training, "Accelerator", refuse("AcceleratorState has already been initialized and cannot be "
                                                        "changed, restart your runtime completely and pass "
                                                        "`mixed_precision='no'` to `Accelerator()`."))
    with pytest.raises(errors.ConfigError, match=r"--mixed-precision.*own process"):
        training.make_accelerator(run)
