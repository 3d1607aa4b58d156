"""Sparsity patterns, the method registry, and keep-masks from importance scores."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch

from stages.errors import UserError


@dataclass
class Pruned:
    """A method's answer for one layer: which weights to keep, and (SparseGPT) new weights."""

    keep: torch.Tensor
    weight: torch.Tensor | None = None


@dataclass(frozen=True)
class Method:
    fn: Callable[..., Pruned]
    needs_hessian: bool = False


METHODS: dict[str, Method] = {}


def register(name: str, needs_hessian: bool = False):
    """Add a method to the registry; a new method is one new module using this decorator."""
    def add(fn):
        METHODS[name] = Method(fn, needs_hessian)
        return fn
    return add


@dataclass(frozen=True)
class Pattern:
    """Unstructured at ``sparsity`` (fraction pruned), N:M (N of every M inputs pruned), or
    structured (whole heads and channels, ``sparsity`` of the blocks' weights)."""

    sparsity: float = 0.5
    n: int = 0
    m: int = 0
    structured: bool = False

    @property
    def is_nm(self) -> bool:
        return self.m > 0

    def label(self) -> str:
        if self.structured:
            return f"{self.sparsity:.0%} structured"
        return f"{self.n}:{self.m}" if self.is_nm else f"{self.sparsity:.0%}"


def parse_pattern(sparsity: float, nm: str | None = None, structured: bool = False) -> Pattern:
    if nm:
        match = re.fullmatch(r"(\d+):(\d+)", nm.strip())
        if not match:
            raise UserError(f"--pattern {nm!r} is not N:M; write it like 2:4 or 4:8")
        n, m = int(match[1]), int(match[2])
        if not 0 < n < m:
            raise UserError(f"--pattern {nm}: N:M needs 0 < N < M (N of every M weights pruned)")
        return Pattern(n / m, n, m)
    if not 0 <= sparsity < 1:
        raise UserError(f"--sparsity {sparsity}: must be in [0, 1), the fraction pruned")
    return Pattern(sparsity, structured=structured)


def keep_from_scores(scores: torch.Tensor, pattern: Pattern, per_row: bool) -> torch.Tensor:
    """Keep the highest scores: per row, over the whole matrix, or in each N:M input group."""
    rows, cols = scores.shape
    if pattern.is_nm:
        check_nm_fits(cols, pattern)
        groups = scores.reshape(rows, cols // pattern.m, pattern.m)
        drop = groups.topk(pattern.n, dim=-1, largest=False).indices
        keep = torch.ones_like(groups, dtype=torch.bool).scatter_(-1, drop, False)
        return keep.reshape(rows, cols)
    if per_row:
        n_drop = int(cols * pattern.sparsity)
        drop = scores.topk(n_drop, dim=1, largest=False).indices
        return torch.ones_like(scores, dtype=torch.bool).scatter_(1, drop, False)
    n_drop = int(scores.numel() * pattern.sparsity)
    drop = scores.flatten().topk(n_drop, largest=False).indices
    keep = torch.ones(scores.numel(), dtype=torch.bool, device=scores.device)
    keep[drop] = False
    return keep.reshape(rows, cols)


def check_nm_fits(cols: int, pattern: Pattern) -> None:
    if cols % pattern.m:
        raise UserError(f"--pattern {pattern.n}:{pattern.m} needs every layer's input size "
                        f"divisible by {pattern.m}, but one layer has {cols} inputs")


# Methods that choose whole structures for the whole model at once (stages.structured), not
# one layer at a time through the registry.
STRUCTURED = ("flap",)


def method_names() -> list[str]:
    """Every valid --method: the base methods, each with DSnoT reselection on top, and the
    structured ones."""
    bases = sorted(name for name in METHODS if name != "dsnot")
    return bases + [f"{name}+dsnot" for name in bases] + list(STRUCTURED)


def split_method(name: str) -> tuple[str, bool]:
    """'wanda+dsnot' -> ('wanda', True); raises a one-line error listing the valid names."""
    if name not in method_names():
        raise UserError(f"--method {name!r} is unknown; choose one of "
                        f"{', '.join(method_names())}")
    base, _, refine = name.partition("+")
    return base, refine == "dsnot"


def sparsify(method: str, weight: torch.Tensor, pattern: Pattern, **stats) -> Pruned:
    """Run one registered method on one layer's weight with its calibration statistics."""
    if method not in METHODS:
        raise UserError(f"--method {method!r} is unknown; choose one of "
                        f"{', '.join(method_names())}")
    return METHODS[method].fn(weight, pattern, **stats)
