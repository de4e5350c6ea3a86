"""adaptkit.save loses nothing: the user's files in the folder stay, load -> save gives back the same
adapter for every strategy, named adapters come back with the active one, and the paths users type
(``~``, ``.``, a symlink) mean what they mean in a shell."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_inputs, tiny_model
from safetensors.torch import load_file

import adaptkit
from adaptkit import errors

STRATEGIES = [("lora", {}), ("prefix", {}), ("bottleneck", {}), ("bottleneck", {"variant": "houlsby"}), ("full", {}),
              ("ia3", {}), ("linear_probe", {}), ("linear_probe", {"pooling": "mean"})]


def _logits(model):
    model.eval()
    with torch.no_grad():
        return model(**tiny_inputs("bert")).logits


def _trained(strategy="bottleneck", seed=0, **options):
    model = adaptkit.adapt(tiny_model("bert"), strategy, **options)
    torch.manual_seed(seed)
    with torch.no_grad():  # move every trained tensor, so a dropped or stale one shows
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    return model


def _user_files(folder: Path) -> dict[str, str]:
    files = {"tokenizer.json": '{"mine": 1}', "notes.txt": "keep me", "sub/eval.csv": "a,b\n1,2\n"}
    for rel, text in files.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_text(text)
    return files


def test_resaving_keeps_the_users_files(tmp_path):
    adaptkit.save(_trained(), tmp_path / "a")
    files = _user_files(tmp_path / "a")
    (tmp_path / "a" / "empty").mkdir()
    adaptkit.save(_trained("lora", seed=1), tmp_path / "a")  # another strategy: different files
    for rel, text in files.items():
        assert (tmp_path / "a" / rel).read_text() == text
    assert (tmp_path / "a" / "empty").is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]  # no temporary folder left
    manifest = json.loads((tmp_path / "a" / "adaptkit_config.json").read_text())["files"]
    assert "notes.txt" not in manifest and "adapter_model.safetensors" in manifest


def test_the_users_files_stay_where_the_os_cannot_swap_folders(tmp_path, monkeypatch):
    from adaptkit import folders
    monkeypatch.setattr(folders, "_exchange", lambda a, b: False)  # no renameat2: move aside, then rename
    adaptkit.save(_trained(), tmp_path / "a")
    files = _user_files(tmp_path / "a")
    adaptkit.save(_trained("lora", seed=1), tmp_path / "a")
    assert all((tmp_path / "a" / rel).read_text() == text for rel, text in files.items())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]


def test_a_file_from_the_previous_save_that_the_new_one_does_not_write_goes(tmp_path):
    adaptkit.save(_trained("lora"), tmp_path / "a")          # writes adapter_config.json + README.md
    adaptkit.save(_trained("bottleneck"), tmp_path / "a")    # does not
    assert not (tmp_path / "a" / "adapter_config.json").exists()
    assert adaptkit.strategy_of(adaptkit.load(tmp_path / "a", tiny_model("bert"))).name == "bottleneck"


def test_a_users_file_with_the_name_of_a_new_adaptkit_file_is_refused(tmp_path):
    adaptkit.save(_trained("bottleneck"), tmp_path / "a")
    (tmp_path / "a" / "adapter_config.json").write_text("my own notes")
    with pytest.raises(errors.ConfigError, match=r"adapter_config.json.*adaptkit did not write.*Fix: move or rename"):
        adaptkit.save(_trained("lora"), tmp_path / "a")  # PEFT writes an adapter_config.json
    assert (tmp_path / "a" / "adapter_config.json").read_text() == "my own notes"
    assert adaptkit.strategy_of(adaptkit.load(tmp_path / "a", tiny_model("bert"))).name == "bottleneck"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]


@pytest.mark.parametrize("trainable", [False, True])
@pytest.mark.parametrize("strategy,options", STRATEGIES)
def test_load_then_save_is_an_identity(tmp_path, strategy, options, trainable):
    model = _trained(strategy, **options)
    adaptkit.save(model, tmp_path / "a")
    expected = _logits(model)
    weights = tmp_path / "a" / adaptkit.strategy_of(model).weights_name
    before = load_file(str(weights))
    loaded = adaptkit.load(tmp_path / "a", tiny_model("bert"), trainable=trainable)
    assert adaptkit.summary(loaded).trainable == (adaptkit.summary(model).trainable if trainable else 0)
    adaptkit.save(loaded, tmp_path / "a")  # over the same folder
    after = load_file(str(weights))
    assert before.keys() == after.keys() and before
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(_logits(adaptkit.load(tmp_path / "a", tiny_model("bert"))), expected)


def test_named_adapters_round_trip_with_the_active_one(tmp_path):
    model = _trained("lora", seed=0)
    first = _logits(model)
    adaptkit.add_adapter(model, "b", "lora", r=4)
    model.train()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    second = _logits(model)
    assert not torch.equal(first, second)
    adaptkit.save(model, tmp_path / "a")
    loaded = adaptkit.load(tmp_path / "a", tiny_model("bert"))
    assert sorted(loaded.peft_config) == ["b", "default"] and loaded.active_adapter == "b"
    assert not any(p.requires_grad for p in loaded.parameters())
    assert torch.equal(_logits(loaded), second)
    adaptkit.set_adapter(loaded, "default")
    assert torch.equal(_logits(loaded), first)


def test_temporary_folders_of_a_killed_save_are_removed_by_the_next(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".a.tmp-{int(dead.stdout)}-xyz"   # what a save killed by SIGKILL leaves
    (stale / "folder" / "sub").mkdir(parents=True)
    (stale / "folder" / "sub" / "adapter_model.safetensors").write_bytes(b"half")
    (stale / ".adaptkit-temp").write_text(str(tmp_path / "a"))  # the marker every temporary folder of adaptkit's has
    lookalike = tmp_path / f".a.tmp-{int(dead.stdout)}-backup"  # the user's, named like one: no marker, kept
    lookalike.mkdir()
    (lookalike / "thesis.tex").write_text("mine")
    live = tmp_path / f".a.tmp-{os.getppid()}-abc"          # a save still running in a live process
    live.mkdir()
    other = tmp_path / ".b.tmp-1-x"                          # another target's: not ours to judge
    other.mkdir()
    adaptkit.save(_trained(), tmp_path / "a")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["a", live.name, other.name, lookalike.name])
    assert (lookalike / "thesis.tex").read_text() == "mine"


def test_tilde_is_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    adaptkit.save(_trained(), "~/x")
    assert (tmp_path / "home" / "x" / "adaptkit_config.json").is_file()
    assert not (tmp_path / "~").exists()
    adaptkit.load("~/x", tiny_model("bert"))


def test_dot_works_and_the_process_stays_in_the_folder(tmp_path, monkeypatch):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    monkeypatch.chdir(folder)
    model = _trained()
    adaptkit.save(model, ".")  # a folder of the user's: their file stays
    adaptkit.save(model, ".")  # again, over itself
    assert Path(os.getcwd()) == folder and Path(".").resolve() == folder and (Path("notes.txt").read_text() == "keep me")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    assert torch.equal(_logits(adaptkit.load(".", tiny_model("bert"))), _logits(model))


def test_a_symlinked_target_keeps_its_link(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    adaptkit.save(_trained(), tmp_path / "link")
    adaptkit.save(_trained(seed=1), tmp_path / "link")
    assert (tmp_path / "link").is_symlink() and os.readlink(tmp_path / "link") == str(tmp_path / "real")
    assert (tmp_path / "real" / "adaptkit_config.json").is_file()


def test_a_saver_that_loses_the_race_to_create_the_folder_swaps_it_instead(tmp_path, monkeypatch):
    from adaptkit import folders
    target, rename, raced = tmp_path / "a", os.rename, []

    def rename_after_a_rival(src, dst, *args, **kwargs):
        if Path(dst) == target and not raced:  # another process saves the same new folder first
            raced.append(True)
            adaptkit.save(_trained(seed=1), target)
            (target / "notes.txt").write_text("theirs")
        return rename(src, dst, *args, **kwargs)

    monkeypatch.setattr(folders.os, "rename", rename_after_a_rival)
    model = _trained(seed=2)
    adaptkit.save(model, target)
    assert raced and (target / "notes.txt").read_text() == "theirs"
    assert torch.equal(_logits(adaptkit.load(target, tiny_model("bert"))), _logits(model))  # the last save wins
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]


# ---- one writer: the same rules for save_pretrained (the Trainer's) as for adaptkit.save ----------------------
def test_save_pretrained_into_a_base_model_folder_refuses_and_changes_nothing(tmp_path):
    base = tmp_path / "base"
    tiny_model("bert").save_pretrained(base)
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in base.iterdir()}
    for strategy in ("lora", "bottleneck"):
        with pytest.raises(errors.ConfigError, match=r"directory=.*base/(config.json|model.safetensors).*adaptkit "
                                                     r"did not write.*Fix: move or rename that file"):
            _trained(strategy).save_pretrained(base)
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in base.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base"]


def test_full_then_lora_into_one_folder_leaves_no_hybrid(tmp_path):
    from transformers import AutoModelForSequenceClassification
    base = tmp_path / "base"
    tiny_model("bert").save_pretrained(base)
    full = adaptkit.adapt(AutoModelForSequenceClassification.from_pretrained(base), "full")
    with torch.no_grad():
        for p in full.parameters():
            p.add_(0.05)
    full.save_pretrained(tmp_path / "a")
    lora = _trained_from(AutoModelForSequenceClassification.from_pretrained(base))
    lora.save_pretrained(tmp_path / "a")
    assert not (tmp_path / "a" / "config.json").exists() and not (tmp_path / "a" / "model.safetensors").exists()
    again = AutoModelForSequenceClassification.from_pretrained(tmp_path / "a")  # base + LoRA, nothing of the full model
    assert torch.equal(_logits(again), _logits(lora))


def _trained_from(model):
    model = adaptkit.adapt(model, "lora")
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("manifest", ["list", "digest"])
def test_the_manifest_alone_proves_nothing(tmp_path, manifest):
    adaptkit.save(_trained(), tmp_path / "a")
    (tmp_path / "a" / "thesis.tex").write_text("years of work")
    (tmp_path / "a" / "README.md").write_text("my own notes on this adapter")  # a file adaptkit wrote, changed since
    path = tmp_path / "a" / "adaptkit_config.json"
    data = json.loads(path.read_text())
    data["files"] = sorted(data["files"]) + ["thesis.tex"] if manifest == "list" else {**data["files"], "thesis.tex": "0" * 64}
    path.write_text(json.dumps(data))
    refused = "README.md" if manifest == "digest" else r"(config.json|model.safetensors|README.md)"  # names prove nothing
    with pytest.raises(errors.ConfigError, match=rf"{refused}.*adaptkit did not write \(or changed since\)"):
        adaptkit.save(_trained(seed=1), tmp_path / "a")
    assert (tmp_path / "a" / "README.md").read_text() == "my own notes on this adapter"
    if manifest == "digest":
        (tmp_path / "a" / "README.md").unlink()
        adaptkit.save(_trained(seed=1), tmp_path / "a")
    assert (tmp_path / "a" / "thesis.tex").read_text() == "years of work"


def test_symlinks_in_the_folder_are_never_written_or_deleted_through(tmp_path):
    adaptkit.save(_trained(), tmp_path / "a")
    victim, shelf = tmp_path / "victim.bin", tmp_path / "shelf"
    victim.write_bytes(b"precious")
    shelf.mkdir()
    (shelf / "book.txt").write_text("mine")
    (tmp_path / "a" / "model.safetensors").unlink()
    (tmp_path / "a" / "model.safetensors").symlink_to(victim)   # planted where the next save writes
    with pytest.raises(errors.ConfigError, match=r"model.safetensors.*adaptkit did not write"):
        adaptkit.save(_trained(seed=1), tmp_path / "a")
    (tmp_path / "a" / "model.safetensors").unlink()
    (tmp_path / "a" / "shelf").symlink_to(shelf)                  # the user's link to a folder: carried as a link
    adaptkit.save(_trained(seed=1), tmp_path / "a")
    adaptkit.save(_trained(seed=2), tmp_path / "a")
    assert victim.read_bytes() == b"precious" and (shelf / "book.txt").read_text() == "mine"
    assert (tmp_path / "a" / "shelf").is_symlink() and os.readlink(tmp_path / "a" / "shelf") == str(shelf)


@pytest.mark.parametrize("mode", [0o700, 0o2775, 0o555])
def test_saving_keeps_the_modes_and_times_of_the_folder_and_the_users_files(tmp_path, mode):
    adaptkit.save(_trained(), tmp_path / "a")
    (tmp_path / "a" / "private").mkdir()
    (tmp_path / "a" / "private" / "key.txt").write_text("secret")
    os.chmod(tmp_path / "a" / "private", 0o700)
    os.utime(tmp_path / "a" / "private" / "key.txt", ns=(10**18, 10**18))
    os.utime(tmp_path / "a" / "private", ns=(10**18, 10**18))
    os.chmod(tmp_path / "a" / "model.safetensors", 0o640)
    os.chmod(tmp_path / "a", mode)
    adaptkit.save(_trained(seed=1), tmp_path / "a")
    st = lambda p: (oct(os.stat(p).st_mode & 0o7777), os.stat(p).st_mtime_ns)  # noqa: E731
    assert oct(os.stat(tmp_path / "a").st_mode & 0o7777) == oct(mode)
    assert st(tmp_path / "a" / "private") == (oct(0o700), 10**18)
    assert st(tmp_path / "a" / "private" / "key.txt")[1] == 10**18
    assert oct(os.stat(tmp_path / "a" / "model.safetensors").st_mode & 0o777) == oct(0o640)
    os.chmod(tmp_path / "a", 0o755)


def test_paths_that_cannot_hold_a_folder_are_typed_errors(tmp_path):
    model = _trained()
    (tmp_path / "file").write_text("x")
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    cases = {"file/out": r"cannot hold an adapter folder", "file": r"is a file, not a folder",
             "loop/out": r"cannot hold an adapter folder", "/proc/x/out": r"cannot hold an adapter folder"}
    for path, match in cases.items():
        full = path if path.startswith("/") else tmp_path / path
        with pytest.raises(errors.ConfigError, match=rf"directory=.*: {match}.*Fix: pass a new or adapter folder"):
            adaptkit.save(model, full)
    with pytest.raises(errors.ConfigError, match=r"save_directory=.*file/out.*cannot hold an adapter folder"):
        model.save_pretrained(tmp_path / "file" / "out")
    assert (tmp_path / "file").read_text() == "x"
