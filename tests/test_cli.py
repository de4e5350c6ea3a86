"""The ``adaptkit`` command: check and estimate from a config folder; every flag mistake is typed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import FAMILIES

from adaptkit.cli import main, parse_options


@pytest.fixture
def model_dir(tmp_path) -> str:
    config = FAMILIES["bert"][0]()
    config.save_pretrained(tmp_path / "model")  # config.json only: the CLI never needs weights
    return str(tmp_path / "model")


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_check_ok(capsys, model_dir):
    code, out, _ = run(capsys, "check", model_dir, "--strategy", "lora", "-o", "r=4", "--option", "targets=query,value")
    assert code == 0 and "BertForSequenceClassification" in out and out.rstrip().endswith("OK: no problems found")


@pytest.mark.parametrize("strategy", ["bottleneck", "lora"])
def test_an_adapter_folder_is_named_as_one_not_checked_as_a_model(capsys, tmp_path, strategy):
    # it crashed with a traceback (its stand-in config's model class takes no arguments), or said "no config.json"
    import adaptkit
    from conftest import tiny_model
    base = tiny_model("bert")
    base.config.name_or_path = "org/base-model"
    folder = str(adaptkit.save(adaptkit.adapt(base, strategy), tmp_path / strategy))
    code, out, _ = run(capsys, "check", folder, "--strategy", "lora")
    assert code == 1 and "is an adapter folder (adaptkit_config.json), not a model" in out
    assert "pass the base model it was trained on (org/base-model)" in out
    code, _, err = run(capsys, "estimate", folder)
    assert code == 2 and "is an adapter folder" in err
    # a full fine-tuning folder is a whole model: checked like any other
    full = str(adaptkit.save(adaptkit.adapt(tiny_model("bert"), "full"), tmp_path / "full"))
    code, out, _ = run(capsys, "check", full, "--strategy", "lora")
    assert code == 0 and out.rstrip().endswith("OK: no problems found")


def test_check_reports_every_problem_and_exits_1(capsys, model_dir):
    code, out, _ = run(capsys, "check", model_dir, "--strategy", "full", "-o", "r=4", "--quantization", "4bit",
                       "--processes", "99")
    assert code == 1
    assert "3 problem(s):" in out and "full on a 4bit model" in out
    assert "Full options=['r']: unknown option(s)" in out and "processes=99" in out


def test_check_json(capsys, model_dir):
    code, out, _ = run(capsys, "check", model_dir, "--strategy", "lora", "-o", "targets=[\"quary\"]", "--json")
    data = json.loads(out)
    assert code == 1 and data["ok"] is False
    problem = data["problems"][0]
    assert problem["error"] == "TargetNotFoundError" and problem["field"] == "LoRA.targets"
    assert problem["value"] == "'quary'" and "did you mean 'query'" in problem["fix"]


def test_estimate_prints_one_row_per_strategy(capsys, model_dir):
    code, out, _ = run(capsys, "estimate", model_dir, "--batch-size", "4", "--seq-len", "16",
                       "--strategies", "full,lora,linear_probe")
    assert code == 0
    rows = [line.split()[0] for line in out.splitlines()[2:5]]
    assert rows == ["full", "lora", "linear_probe"] and "peak MB" in out
    code, out, _ = run(capsys, "estimate", model_dir, "--batch-size", "4", "--seq-len", "16", "--strategies", "lora",
                       "--dtype", "bf16", "--quantization", "8bit", "--json")
    row = json.loads(out)["rows"][0]
    assert code == 0 and row["strategy"] == "lora" and row["method"] == "traced" and row["peak"] > row["weights"] > 0


@pytest.mark.parametrize("argv,message", [
    (["check", "{m}", "--stratgy", "lora"], "flag='--stratgy': is not a flag of 'adaptkit check'. Fix: did you "
                                            "mean --strategy?"),
    # each subcommand's own flags: estimate takes --strategies (check's --strategy is named as check's)
    (["estimate", "{m}", "--strategy", "lora"], "flag='--strategy': is not a flag of 'adaptkit estimate'. Fix: did "
                                               "you mean --strategies? --strategy is a flag of 'adaptkit check'"),
    (["check", "{m}", "lora"], "argument='lora': is one argument too many for 'adaptkit check'. Fix: give it as a "
                               "flag's value, e.g. --strategy lora"),
    (["env", "--json"], "flag='--json': is not a flag of 'adaptkit env'. Fix: --json is a flag of 'adaptkit check'"),
    (["chek", "{m}"], "command='chek': is not one of the choices. Fix: did you mean 'check'?"),
    (["estimate", "{m}", "--dtype", "fp8"], "--dtype='fp8': is not one of the choices. Fix: choose from"),
    (["check", "{m}", "--processes", "0"], "--processes='0': is not a positive integer"),
    (["estimate", "{m}", "--batch-size", "many"], "--batch-size='many': is not a positive integer"),
    (["check", "{m}", "--task", "clasify"], "--task='clasify': is not one of the choices"),
    (["check"], "model: is required. Fix: run 'adaptkit check --help'"),
    (["check", "{m}", "-o", "r"], "--option='r': is not KEY=VALUE. Fix: write e.g. --option r=16"),
    (["estimate", "{m}", "--strategies", ","], "--strategies=',': names no strategy"),
    (["estimate", "{m}", "--strategies", "lroa"], "strategy='lroa': is not a strategy. Fix: did you mean 'lora'?"),
    (["estimate", "/no/such/dir"], "model='/no/such/dir': is neither an existing folder nor a hub id"),
])
def test_flag_mistakes_exit_2_with_field_value_and_fix(capsys, model_dir, argv, message):
    code, out, err = run(capsys, *[a.format(m=model_dir) for a in argv])
    assert code == 2 and out == ""
    assert err.startswith("adaptkit: error: ") and message in err, err


@pytest.mark.parametrize("text,expected", [
    ("r=16", ("r", 16)), ("dropout=0.1", ("dropout", 0.1)), ("use_dora=true", ("use_dora", True)),
    ("targets=query,value", ("targets", ["query", "value"])), ('targets=["query"]', ("targets", ["query"])),
    ("init=gaussian", ("init", "gaussian")), ("heads=null", ("heads", None)),
])
def test_option_values(text, expected):
    assert parse_options([text]) == dict([expected])


def test_the_console_script_is_installed(model_dir):
    script = Path(sys.executable).with_name("adaptkit")
    if not script.exists():
        pytest.skip("the adaptkit console script is not installed (pip install -e .)")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([str(script), "check", model_dir, "--strategy", "bottleneck"], capture_output=True,
                          text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "OK: no problems found" in done.stdout


def test_recommend_from_a_config_folder_says_what_to_run_first(capsys, model_dir):
    # the tiny test config has 64 positions: estimate refuses the default 128 tokens, typed (checked below)
    code, out, _ = run(capsys, "recommend", model_dir, "--task", "seq_cls", "--examples", "5000", "--memory", "8GB",
                       "--seq-len", "32")
    lines = out.splitlines()
    assert code == 0 and lines[0].startswith("Run ") and "adaptkit.adapt(" in lines[0]
    assert lines[2].split()[:4] == ["#", "candidate", "batch", "peak"] and any("linear_probe" in x for x in lines)
    code, out, _ = run(capsys, "recommend", model_dir, "--task", "seq_cls", "--examples", "5000", "--memory", "8GB",
                       "--seq-len", "32", "--json")
    data = json.loads(out)
    assert code == 0 and data["run"] == lines[0] and len(data["candidates"]) == 21 and data["memory"] == 8e9


@pytest.mark.parametrize("argv, message", [
    (["--task", "seq_cls", "--examples", "10"], "--memory: is required"),
    (["--task", "seq_cls", "--examples", "10", "--memory", "lots"], "memory='lots': is not an amount of memory"),
    (["--task", "seq_classify", "--examples", "10", "--memory", "8GB"], "task='seq_classify': is not a task type"),
    (["--task", "seq_cls", "--examples", "10", "--memory", "8GB", "--time", "2h", "--device", "cuda"],
     "time='2h': time is calibrated on CPU runs only"),
    (["--task", "seq_cls", "--examples", "10", "--memory", "8GB"], "seq_len=128: 128 tokens do not fit"),
])
def test_recommend_refuses_what_it_cannot_judge(capsys, model_dir, argv, message):
    code, out, err = run(capsys, "recommend", model_dir, *argv)
    assert code == 2 and out == "" and message in err


def test_recommend_piped_into_a_reader_that_left_ends_quietly(model_dir):
    # `adaptkit recommend ... | head -1` printed a BrokenPipeError traceback; `true` leaves before adaptkit writes
    done = subprocess.run(["bash", "-o", "pipefail", "-c", f"{sys.executable} -m adaptkit.cli recommend {model_dir} "
                           "--task seq_cls --examples 500 --memory 8GB --seq-len 32 | true"],
                          capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert done.returncode == 0 and "BrokenPipeError" not in done.stderr, done.stderr
