"""Pruning masks as pure functions on tensors, found by name in a registry.

Each method maps (weight, calibration statistics, sparsity pattern) to a ``Pruned``: a
boolean mask of the weights to KEEP and, for SparseGPT, updated weights. Which layers and
which statistics is orchestration, and lives in ``stages.pruning``.
"""

from stages.masks import dsnot, magnitude, sparsegpt, wanda  # noqa: F401  (registers them)
from stages.masks.core import (
    METHODS,
    Pattern,
    Pruned,
    method_names,
    parse_pattern,
    register,
    sparsify,
    split_method,
)
from stages.masks.stats import LayerStats

__all__ = ["METHODS", "LayerStats", "Pattern", "Pruned", "method_names", "parse_pattern",
           "register", "sparsify", "split_method"]
