"""The built-in datasets, one family per module: each module registers its datasets in
``fedtune.data.sources.BUILTINS`` when imported. Adding a dataset is one file here with a
local loader (reading ``shared/data``-style folders), a Hub loader and a ``register`` call."""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
