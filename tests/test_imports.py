"""The core stands alone: ``import adaptkit`` needs torch, transformers, peft, accelerate and safetensors only.

The recipe kit (``adaptkit.recipes``) and its extra (datasets, evaluate, scikit-learn, scipy, tqdm,
tensorboard) stay out of a plain ``import adaptkit``. scipy and tqdm are imported by the dependencies
themselves in this environment (``import torch`` loads tqdm; transformers' loss modules, loaded through
peft, import scipy when it is installed), so they are compared against what the five dependencies load.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

CORE_DEPENDENCIES = ("torch", "transformers", "peft", "accelerate", "safetensors")
RECIPE_EXTRA = ("datasets", "evaluate", "sklearn", "scipy", "tqdm", "tensorboard", "pandas", "pyarrow")


def _top_level_modules(statement: str) -> set[str]:
    code = f"import sys, json\n{statement}\nprint(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}})))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"}).stdout
    return set(json.loads(out.strip().splitlines()[-1]))


def test_import_adaptkit_loads_nothing_beyond_its_five_dependencies():
    deps = _top_level_modules("import " + ", ".join(CORE_DEPENDENCIES))
    core = _top_level_modules("import adaptkit; adaptkit.adapt, adaptkit.check, adaptkit.estimate, adaptkit.load_model")
    assert core - deps == {"adaptkit"}
    assert not {"datasets", "evaluate", "sklearn", "tensorboard"} & core
    assert not (set(RECIPE_EXTRA) & core) - deps  # what the extra adds is never imported by the core


def test_the_core_does_not_import_the_recipe_kit():
    code = ("import sys, adaptkit, adaptkit.cli\n"
            "print([m for m in sys.modules if m.startswith('adaptkit.recipes')])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"


def test_the_recipe_kit_without_its_extra_is_a_typed_error_naming_the_extra():
    code = ("import sys\nsys.modules['sklearn'] = None  # as if scikit-learn were not installed\n"
            "from adaptkit.errors import MissingDependencyError\n"
            "try:\n    import adaptkit.recipes\nexcept MissingDependencyError as error:\n    print(error)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "adaptkit.recipes=['scikit-learn']" in out and "pip install 'adaptkit[recipes]'" in out, out
