"""The kit the recipes (``recipes/*.py``) stand on: data, batching, metrics, the training loop's pieces. Not part of
the core (``import adaptkit`` never imports it): it needs the ``recipes`` extra, which the core does without."""

import importlib.util

from adaptkit.errors import MissingDependencyError

# import name -> pip name; checked here so that the error names the extra, not one module of it
_missing = [pip for name, pip in (("datasets", "datasets"), ("sklearn", "scikit-learn"), ("scipy", "scipy"))
            if importlib.util.find_spec(name) is None]
if _missing:
    raise MissingDependencyError("adaptkit.recipes", _missing, "the recipe kit needs these packages, which are not "
                                 "installed", "pip install 'adaptkit[recipes]'")
