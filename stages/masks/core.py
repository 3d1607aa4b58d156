"""Sparsity patterns, the method registry, and keep-masks from importance scores."""

from __future__ import annotations

import re
from dataclasses import Field, dataclass, field, fields
from typing import ClassVar

import torch

from stages.errors import UserError


@dataclass
class Pruned:
    """A method's answer for one layer: which weights to keep, and (SparseGPT) new weights."""

    keep: torch.Tensor
    weight: torch.Tensor | None = None


@dataclass(frozen=True)
class MaskMethod:
    """A mask method: a frozen dataclass whose fields are its parameters, registered by name.

    ``kind`` says how the mask stage runs it: a *scorer* chooses one layer's mask from its
    calibration statistics; a *refiner* works on a scorer's mask and is written
    ``scorer+refiner`` (DSnoT reselects it; obs keeps it and solves for the kept weights,
    from the dense ones); a *structured* method (FLAP) chooses whole heads and channels for
    the whole model at once (its ``build`` does the stage's work). A new method is one module in
    this package: a subclass decorated with ``@register``; its fields become its CLI flags
    (``--<name>-<field>``, or the published name in ``flags``) and its own part of the mask
    key, and nothing else has to change.
    """

    name: ClassVar[str] = ""
    kind: ClassVar[str] = "scorer"
    needs_hessian: ClassVar[bool] = False  # SparseGPT: Σ x xᵀ of each layer's inputs
    # a refiner that computes the kept weights itself, from the dense ones (obs): it gets
    # the dense weights, not a scorer's updated ones (which it would correct a second time)
    from_dense: ClassVar[bool] = False
    flags: ClassVar[dict[str, str]] = {}  # field -> published flag name, when not the default

    def __call__(self, weight: torch.Tensor, pattern: Pattern, **stats) -> Pruned:
        """One layer's mask (a refiner also gets ``keep``, the mask to reselect)."""
        raise NotImplementedError(f"{self.name} is {self.kind}: it has no per-layer mask")

    def problems(self) -> list[str]:
        """What is wrong with the parameters, each as a one-line message naming the flag."""
        return []

    def resolved(self) -> MaskMethod:
        """The method with what a run leaves "auto" (None) at the value it computes with
        when nothing settled it: what the mask key holds, so that equal masks share a key."""
        return self

    @classmethod
    def flag(cls, name: str) -> str:
        return cls.flags.get(name) or f"--{cls.name}-{name.replace('_', '-')}"

    @classmethod
    def parameters(cls) -> list[Field]:
        return list(fields(cls))


def param(default, help: str):
    """A method parameter: its default, and the help its CLI flag shows."""
    return field(default=default, metadata={"help": help})


METHODS: dict[str, type[MaskMethod]] = {}


def register(cls: type[MaskMethod]) -> type[MaskMethod]:
    """Add a method class to the registry (see ``MaskMethod``)."""
    METHODS[cls.name] = cls
    return cls


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


def names_of(kind: str) -> list[str]:
    return sorted(name for name, cls in METHODS.items() if cls.kind == kind)


def method_names() -> list[str]:
    """Every valid --method: each scorer, each scorer with each refiner on top
    (``wanda+dsnot``), and each structured method."""
    scorers = names_of("scorer")
    return scorers + [f"{s}+{r}" for r in names_of("refiner") for s in scorers] + \
        names_of("structured")


def methods_run(prune: dict) -> dict:
    """A prune configuration (as a dict) without the parameters of the registered methods
    it does not run: they change nothing it computes."""
    ran = set(prune["method"].split("+"))
    return {k: v for k, v in prune.items() if k not in METHODS or k in ran}


def split_method(name: str) -> list[type[MaskMethod]]:
    """'wanda+dsnot' -> [Wanda, DSnoT]; raises a one-line error listing the valid names."""
    if name not in method_names():
        raise UserError(f"--method {name!r} is unknown; choose one of "
                        f"{', '.join(method_names())}")
    return [METHODS[part] for part in name.split("+")]


def is_structured(name: str) -> bool:
    return name in METHODS and METHODS[name].kind == "structured"


def sparsify(name: str, weight: torch.Tensor, pattern: Pattern, **stats_and_params) -> Pruned:
    """Run one registered method on one layer: keyword arguments that are the method's
    parameters configure it (defaults otherwise), the rest are its calibration statistics."""
    if name not in METHODS:
        raise UserError(f"--method {name!r} is unknown; choose one of "
                        f"{', '.join(method_names())}")
    cls = METHODS[name]
    own = {f.name for f in fields(cls)}
    method = cls(**{k: v for k, v in stats_and_params.items() if k in own})
    return method(weight, pattern, **{k: v for k, v in stats_and_params.items() if k not in own})
