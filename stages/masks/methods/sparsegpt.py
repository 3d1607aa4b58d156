"""SparseGPT (Frantar & Alistarh, 2023): OBS pruning with the weight update, column by column.

The layer's inputs X give the Hessian H = XᵀX of the reconstruction loss ||WX - ŴX||².
Columns are visited left to right in blocks of ``blocksize``; within a block the mask is
chosen by the OBS saliency w² / [H⁻¹]_jj², and each pruned weight's error is spread over the
not-yet-visited columns through the Cholesky factor of H⁻¹, so the kept weights compensate.

Which weights of a block compete for its pruned share is ``group``: ``block`` (the paper) ranks
all rows of the block together, so rows of large weights keep more than rows of small ones;
``row`` prunes each row's share of the block alone, Wanda's per-output comparison group (Sun
et al., 2023: it matters for LLMs), so every output keeps the same number of inputs.

The dampening λ (``percdamp``, a fraction of H's mean diagonal) is the paper's 1% for a
pruned model on its own, and 30% where EBFT trains the weights after (``auto``, settled by
the run's configuration): on SmolLM2 with 16 calibration windows the heavier dampening
makes a worse pruned model but a better start for EBFT (docs/results.md, "SparseGPT start").
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

import torch

from stages.masks.core import MaskMethod, Pattern, Pruned, check_nm_fits, param, register

PAPER_PERCDAMP = 0.01  # Frantar & Alistarh, 2023
BEFORE_EBFT_PERCDAMP = 0.3  # measured on held-out data before EBFT (issue 22)


def inverse_hessian_factor(hessian: torch.Tensor, weight: torch.Tensor,
                           percdamp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + λI)⁻¹, λ = percdamp · mean(diag H). Zeroes dead inputs."""
    h = hessian.double().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    weight[:, dead] = 0.0
    h.diagonal().add_(percdamp * torch.diag(h).mean())
    h_inv = torch.cholesky_inverse(torch.linalg.cholesky(h))
    return torch.linalg.cholesky(h_inv, upper=True).float()


@register
@dataclass(frozen=True)
class SparseGPT(MaskMethod):
    name = "sparsegpt"
    needs_hessian = True
    flags: ClassVar[dict[str, str]] = {"blocksize": "--blocksize", "percdamp": "--percdamp"}
    blocksize: int = param(128, "columns pruned and updated together")
    percdamp: float | None = param(
        None, "dampening λ of the Hessian, a fraction of its mean diagonal; auto: "
        f"{BEFORE_EBFT_PERCDAMP} before EBFT trains the weights, else {PAPER_PERCDAMP} (the paper's)")
    group: str = param("block", "the weights that compete for a column block's pruned share: "
                       "block (all its rows, as the paper) or row (each row alone, as Wanda)")

    def __call__(self, weight: torch.Tensor, pattern: Pattern, *, hessian: torch.Tensor,
                 **_) -> Pruned:
        return sparsegpt(weight, pattern, hessian, self.blocksize, self.resolved().percdamp,
                         per_row=self.group == "row")

    def resolved(self) -> SparseGPT:
        """Unsettled (called outside a run), the dampening is the paper's."""
        return self if self.percdamp is not None else replace(self, percdamp=PAPER_PERCDAMP)

    def problems(self) -> list[str]:
        group = ([] if self.group in GROUPS else
                 [f"{self.flag('group')} {self.group!r}: choose {' or '.join(GROUPS)}"])
        return group + update_problems(self)


GROUPS = ("block", "row")


def update_problems(method: SparseGPT | OBS) -> list[str]:
    """The checks of the update's parameters, each naming the method's own flag."""
    return [message for ok, message in (
        (method.blocksize >= 1,
         f"{method.flag('blocksize')} {method.blocksize}: must be at least 1"),
        (method.percdamp is None or 0 < method.percdamp <= 1,
         (f"{method.flag('percdamp')} {method.percdamp}: must be in (0, 1], a fraction of "
          "the mean Hessian diagonal (SparseGPT uses 0.01)"))) if not ok]


def sparsegpt(weight: torch.Tensor, pattern: Pattern, hessian: torch.Tensor,
              blocksize: int = 128, percdamp: float = 0.01,
              keep: torch.Tensor | None = None, per_row: bool = False) -> Pruned:
    """hessian: Σ x xᵀ over calibration tokens (any positive scale: only ratios matter).
    ``keep``: a mask chosen already (by another method): only the update, no choice.
    ``per_row``: each row prunes its own share of every column block (else all rows'
    weights of the block compete); N:M patterns are per row anyway."""
    w = weight.detach().float().clone()
    cols = w.shape[1]
    if pattern.is_nm:
        check_nm_fits(cols, pattern)
        blocksize = max(pattern.m, blocksize - blocksize % pattern.m)
    u = inverse_hessian_factor(hessian.to(w.device), w, percdamp)
    chosen = torch.ones_like(w, dtype=torch.bool)

    for start in range(0, cols, blocksize):
        stop = min(start + blocksize, cols)
        w1, u1 = w[:, start:stop].clone(), u[start:stop, start:stop]
        errors = torch.zeros_like(w1)
        drop1 = torch.zeros_like(w1, dtype=torch.bool)
        if keep is not None:
            drop1 = ~keep[:, start:stop].to(w.device)
        elif not pattern.is_nm:  # this block's share of pruned weights
            saliency = w1**2 / torch.diag(u1).reshape(1, -1) ** 2
            if per_row:  # counted cumulatively, so a row's total is int(cols · sparsity)
                n_drop = int(stop * pattern.sparsity) - int(start * pattern.sparsity)
                lowest = saliency.topk(n_drop, dim=1, largest=False).indices
                drop1.scatter_(1, lowest, True)
            else:
                n_drop = int(saliency.numel() * pattern.sparsity)
                drop1.view(-1)[saliency.flatten().topk(n_drop, largest=False).indices] = True
        for i in range(stop - start):
            if keep is None and pattern.is_nm and i % pattern.m == 0:
                group = w1[:, i:i + pattern.m] ** 2 / torch.diag(u1)[i:i + pattern.m] ** 2
                lowest = group.topk(pattern.n, dim=1, largest=False).indices
                drop1[:, i:i + pattern.m].scatter_(1, lowest, True)
            column = w1[:, i]
            pruned = torch.where(drop1[:, i], torch.zeros_like(column), column)
            err = (column - pruned) / u1[i, i]
            w1[:, i:] -= err.unsqueeze(1) @ u1[i, i:].unsqueeze(0)
            w1[:, i] = pruned
            errors[:, i] = err
        w[:, start:stop] = w1
        chosen[:, start:stop] = ~drop1
        w[:, stop:] -= errors @ u[start:stop, stop:]
    return Pruned(chosen, (w * chosen).to(weight.dtype))


@register
@dataclass(frozen=True)
class OBS(MaskMethod):
    """SparseGPT's weight update alone, on a mask another method chose (``wanda+obs``): the
    kept weights absorb the pruned ones' share of each output, ||WX - ŴX||² being least on
    the calibration inputs, so the pruned model starts closer to the dense one."""

    name = "obs"
    kind = "refiner"
    needs_hessian = True
    from_dense = True  # the update is solved from the dense weights (sparsegpt+obs = sparsegpt)
    blocksize: int = param(128, "columns updated together")
    percdamp: float = param(0.01, "dampening λ of the Hessian, a fraction of its mean diagonal")

    def __call__(self, weight: torch.Tensor, pattern: Pattern, *, keep: torch.Tensor,
                 hessian: torch.Tensor, **_) -> Pruned:
        return sparsegpt(weight, pattern, hessian, self.blocksize, self.percdamp, keep=keep)

    def problems(self) -> list[str]:
        return update_problems(self)
