"""The kit the recipes (``recipes/*.py``) stand on: data, batching, metrics, the training loop's pieces.

Not part of the core: ``import adaptkit`` never imports it, and it needs the ``recipes`` extra
(``pip install 'adaptkit[recipes]'``: datasets, scikit-learn, scipy, tensorboard), which
``adapt``, ``save``, ``load`` and the rest of the core do without.
"""

from __future__ import annotations

import importlib.util

from adaptkit.errors import MissingDependencyError

# import name -> the pip name in the extra
_NEEDS = {"datasets": "datasets", "sklearn": "scikit-learn", "scipy": "scipy"}  # metrics no longer use evaluate
_missing = [pip for name, pip in _NEEDS.items() if importlib.util.find_spec(name) is None]
if _missing:
    raise MissingDependencyError(field="adaptkit.recipes", value=_missing, problem="the recipe kit needs these "
                                 "packages, which are not installed", fix="pip install 'adaptkit[recipes]'")
