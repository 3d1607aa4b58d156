"""Masks: the methods (pure maths on tensors, found by name in a registry, one module each
in ``methods/``) and the mask stage that runs them over a model (``pruning``, and
``structured`` for methods that remove whole heads and channels).

Each method is a ``MaskMethod`` (``stages.masks.core``): a frozen dataclass whose fields are
its parameters, mapping (weight, calibration statistics, sparsity pattern) to a ``Pruned``:
a boolean mask of the weights to KEEP and, for SparseGPT, updated weights. Which layers and
which statistics is orchestration, and lives in ``stages.masks.pruning``.

Every module of ``methods/`` is imported here, so a method registers itself by existing.
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
    methods_run,
    parse_pattern,
    register,
    sparsify,
    split_method,
)
from stages.model.layer_stats import LayerStats

for _module in pkgutil.iter_modules([f"{__path__[0]}/methods"]):
    importlib.import_module(f"{__name__}.methods.{_module.name}")

__all__ = ["METHODS", "LayerStats", "MaskMethod", "Pattern", "Pruned", "is_structured",
           "method_names", "methods_run", "parse_pattern", "register", "sparsify", "split_method"]
