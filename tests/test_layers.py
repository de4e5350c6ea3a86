"""The layering contract of adaptkit's own modules, read from the source with ``ast`` (no import runs).

Every ``import`` of an adaptkit module counts, at module level and inside functions alike (a function-local
import is a dependency too, only a hidden one). The contract:

* no cycle among adaptkit's modules;
* no upward import: a module imports only from its own layer or those below it (``LAYERS``);
* at most ``MAX_LOCAL`` function-local imports of adaptkit's own modules, each with a one-line reason
  (a comment on its line or the line above);
* ``adaptkit.names`` imports nothing from adaptkit;
* each private attribute of the libraries adaptkit sits on is listed in ``names.PRIVATE_APIS`` and still
  exists in the installed library.

Imports under ``if TYPE_CHECKING:`` are left out: they never run and exist for annotations only.
"""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "adaptkit"
MAX_LOCAL = 10

# bottom to top; a module may import from its own layer and every layer below. A name ending in ".*" is a
# package with all its modules.
LAYERS = [
    ["names", "errors"],
    ["versions", "lengths", "precision", "skeleton", "targets", "folders", "placement"],
    ["strategies.*", "quantization", "compat"],
    ["card", "layout", "hf", "core"],
    ["distributed", "check", "estimate", "sanity", "recommend"],
    ["cli", "__init__"],
    ["recipes.*"],
]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts.pop()
    return ".".join(parts)


def _exists(dotted: str) -> bool:
    path = ROOT.joinpath(*dotted.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _targets(node: ast.AST, here: str) -> list[str]:
    """The adaptkit modules (names relative to the package; "__init__" for the package itself) an import reads."""
    if isinstance(node, ast.Import):
        return [_relative(a.name) for a in node.names if a.name == "adaptkit" or a.name.startswith("adaptkit.")]
    if node.level:  # relative: resolve against this module's package
        package = here.split(".")[:-node.level] if here != "__init__" else []
        base = ".".join(["adaptkit", *package, *([node.module] if node.module else [])])
    else:
        base = node.module or ""
    if base != "adaptkit" and not base.startswith("adaptkit."):
        return []
    out = []
    for alias in node.names:  # `from adaptkit import targets` reads the module adaptkit.targets
        sub = f"{base}.{alias.name}"
        out.append(_relative(sub if _exists(_relative(sub)) else base))
    return out


def _relative(dotted: str) -> str:
    return dotted[len("adaptkit."):] if dotted.startswith("adaptkit.") else "__init__"


def _is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _imports(path: Path):
    """(imported module, line, inside a function?) for every adaptkit import in the file."""
    here = _module_name(path)
    found = []

    def walk(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if _is_type_checking(child):
                continue
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                found.extend((t, child.lineno, in_function) for t in _targets(child, here))
            walk(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    walk(ast.parse(path.read_text(), str(path)), False)
    return here, found


def _graph():
    graph, local = {}, []
    for path in sorted(ROOT.rglob("*.py")):
        here, found = _imports(path)
        graph.setdefault(here, set()).update(t for t, _, _ in found if t != here)
        local += [(path, line, t) for t, line, inside in found if inside]
    return graph, local


def _layer(module: str) -> int:
    for i, layer in enumerate(LAYERS):
        for entry in layer:
            if module == entry or (entry.endswith(".*") and (module + ".").startswith(entry[:-1])):
                return i
    raise AssertionError(f"adaptkit.{module} is in no layer of tests/test_layers.py LAYERS: add it where it belongs")


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component with more than one module (Tarjan's algorithm)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_graph_reader_sees_function_local_and_relative_imports(tmp_path):
    source = "from adaptkit import targets\nfrom . import lengths\n\ndef f():\n    from adaptkit.core import adapt  # why\n"
    (tmp_path / "probe.py").write_text(source)
    global ROOT
    saved, ROOT = ROOT, tmp_path
    try:
        for name in ("targets", "lengths", "core"):
            (tmp_path / f"{name}.py").write_text("")
        assert _imports(tmp_path / "probe.py")[1] == [("targets", 1, False), ("lengths", 2, False), ("core", 5, True)]
        assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    finally:
        ROOT = saved


def test_no_import_cycles():
    cycles = _cycles(_graph()[0])
    assert not cycles, f"import cycles among adaptkit modules: {cycles}"


def test_no_upward_imports():
    graph = _graph()[0]
    upward = sorted(f"adaptkit.{a} (layer {_layer(a)}) imports adaptkit.{b} (layer {_layer(b)})"
                    for a, targets in graph.items() for b in targets if _layer(b) > _layer(a))
    assert not upward, "imports against the layer order:\n" + "\n".join(upward)


def test_names_is_a_leaf():
    assert _graph()[0]["names"] == set()


def test_function_local_imports_are_few_and_explained():
    local = _graph()[1]
    unexplained = []
    for path, line, module in local:
        lines = path.read_text().splitlines()
        if "#" not in lines[line - 1] and not lines[line - 2].strip().startswith("#"):
            unexplained.append(f"{path.relative_to(ROOT.parent)}:{line} (adaptkit.{module})")
    assert not unexplained, "function-local imports without a one-line reason comment:\n" + "\n".join(unexplained)
    where = [f"{p.relative_to(ROOT.parent)}:{line}" for p, line, _ in local]
    assert len(local) <= MAX_LOCAL, f"{len(local)} function-local imports of adaptkit modules (at most {MAX_LOCAL}): {where}"


LIBRARIES = ("peft", "accelerate", "transformers", "evaluate")


def _private_uses(path: Path) -> set[str]:
    """``library.path.Name._private`` references: attributes reached from a name imported from a library,
    and private names imported from one (``from transformers.x import _y``)."""
    tree, bound, used = ast.parse(path.read_text()), {}, set()
    private = lambda part: part.startswith("_") and not part.startswith("__")  # noqa: E731
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            bound.update({(a.asname or a.name).split(".")[0]: (a.asname and a.name) or a.name.split(".")[0]
                          for a in node.names if a.name.split(".")[0] in LIBRARIES})
        elif isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").split(".")[0] in LIBRARIES:
            for a in node.names:
                bound[a.asname or a.name] = f"{node.module}.{a.name}"
                if private(a.name) or any(private(p) for p in node.module.split(".")):
                    used.add(f"{node.module}.{a.name}")
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and private(node.attr):
            chain, value = [node.attr], node.value
            while isinstance(value, ast.Attribute):
                chain.insert(0, value.attr)
                value = value.value
            if isinstance(value, ast.Name) and value.id in bound:
                used.add(".".join([bound[value.id], *chain]))
    return used


def _gone(apis: dict[str, tuple[str, str, str]]) -> list[str]:
    """The listed private attributes the installed libraries no longer have, each with why adaptkit needs it."""
    out = []
    for dotted, (version, where, why) in apis.items():
        module_name, _, rest = dotted.partition(":")
        obj = importlib.import_module(module_name)
        for attr in rest.split("."):
            if not hasattr(obj, attr):
                out.append(f"{dotted} (checked on {version}, used in {where}) is gone from the installed library: {why}")
                break
            obj = getattr(obj, attr)
    return out


def test_a_private_attribute_that_disappears_is_reported():
    apis = {"peft.utils.other:_no_such_helper": ("peft 0.21.2", "nowhere", "a test")}
    assert _gone(apis) == ["peft.utils.other:_no_such_helper (checked on peft 0.21.2, used in nowhere) is gone from "
                           "the installed library: a test"]


def test_private_library_attributes_are_listed_and_still_exist():
    """Each private attribute of peft/accelerate/transformers/evaluate that adaptkit reads is listed in
    names.PRIVATE_APIS, and each listed one still exists in the installed library (a release that drops it
    fails here, not in a user's run)."""
    from adaptkit.names import PRIVATE_APIS

    assert not _gone(PRIVATE_APIS), _gone(PRIVATE_APIS)
    listed, uses = {d.replace(":", ".") for d in PRIVATE_APIS}, {}
    for path in ROOT.rglob("*.py"):
        for use in _private_uses(path):
            uses.setdefault(use, path.relative_to(ROOT.parent))
    unlisted = sorted(f"{use} ({where})" for use, where in uses.items() if use not in listed)
    assert not unlisted, f"private library attributes used but not listed in adaptkit.names.PRIVATE_APIS: {unlisted}"
    assert listed <= set(uses), f"listed in PRIVATE_APIS but no longer used (remove them): {sorted(listed - set(uses))}"


def test_the_private_use_finder_sees_attributes_and_imports(tmp_path):
    probe = tmp_path / "p.py"
    probe.write_text("import transformers\nfrom accelerate.state import AcceleratorState\n"
                     "from transformers.utils import _x\nAcceleratorState._shared_state\ntransformers.a._b.c\n")
    assert _private_uses(probe) == {"accelerate.state.AcceleratorState._shared_state", "transformers.a._b",
                                    "transformers.utils._x"}
