"""Pruning masks as pure functions on tensors, found by name in a registry.

Each method maps (weight, calibration statistics, sparsity pattern) to a boolean mask of
the weights to KEEP. Orchestration (which layers, which statistics) lives elsewhere.
"""

from stages.masks import magnitude, wanda  # noqa: F401  (registers the methods)
from stages.masks.core import METHODS, Pattern, parse_pattern, register, sparsify

__all__ = ["METHODS", "Pattern", "parse_pattern", "register", "sparsify"]
