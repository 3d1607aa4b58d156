"""Pruning masks as pure functions on tensors, found by name in a registry.

Each method is a ``MaskMethod`` (``stages.masks.core``): a frozen dataclass whose fields are
its parameters, mapping (weight, calibration statistics, sparsity pattern) to a ``Pruned``:
a boolean mask of the weights to KEEP and, for SparseGPT, updated weights. Which layers and
which statistics is orchestration, and lives in ``stages.pruning``.

Every module of this package is imported here, so a method registers itself by existing.
They are imported by name at run time, not by an import statement: a stage's code version
(``store.hashing.code_version``) then covers only the methods it runs, and editing one method
invalidates only its own masks.
"""

import importlib
import pkgutil

from stages.masks.core import (
    METHODS,
    MaskMethod,
    Pattern,
    Pruned,
    is_structured,
    method_names,
    parse_pattern,
    register,
    sparsify,
    split_method,
)
from stages.masks.stats import LayerStats

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["METHODS", "LayerStats", "MaskMethod", "Pattern", "Pruned", "is_structured",
           "method_names", "parse_pattern", "register", "sparsify", "split_method"]
