"""DSnoT (Zhang et al., 2023): training-free mask reselection ("dynamic sparse, no training").

Per output row i, the expected output change caused by pruning is
    e_i = Σ_{j pruned} W_ij · E[x_j].
Each cycle swaps one pruned and one kept weight in every row still improving: it regrows
the pruned weight that moves e_i toward 0 the most (scaled by 1 / Var[x_j]^power) and prunes
the least important kept weight (Wanda score) whose removal also moves e_i toward 0. A swap
is made only while |e_i| is above ``threshold`` and only if it makes |e_i| smaller, so the
error never grows, and the number pruned per row (per N:M group) never changes.
Published defaults: 50 cycles, threshold 0.1, variance power 1 (DSnoT's README command).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from stages.masks.core import MaskMethod, Pattern, Pruned, param, register
from stages.masks.methods.wanda import wanda_scores

INF = float("inf")


def expected_error(weight: torch.Tensor, keep: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """e_i = Σ over pruned j of W_ij E[x_j], one value per output row."""
    return (weight.float() * mean.float().reshape(1, -1) * ~keep).sum(dim=1)


@register
@dataclass(frozen=True)
class DSnoT(MaskMethod):
    name = "dsnot"
    kind = "refiner"
    cycles: int = param(50, "at most this many swaps per row")
    threshold: float = param(0.1, "rows whose |expected error| is below this stop swapping")
    var_power: float = param(1.0, "power of the input variance in the regrowing score")

    def __call__(self, weight: torch.Tensor, pattern: Pattern, *, keep: torch.Tensor,
                 input_norms: torch.Tensor, mean: torch.Tensor, var: torch.Tensor,
                 **_) -> Pruned:
        """Reselect ``keep`` (from Wanda or SparseGPT) for the weights as they are."""
        return dsnot(weight, pattern, keep, input_norms, mean, var, self.cycles,
                     self.threshold, self.var_power)

    def problems(self) -> list[str]:
        return [f"{self.flag(name)} {getattr(self, name)}: must be >= 0"
                for name in ("cycles", "threshold", "var_power") if getattr(self, name) < 0]


def dsnot(weight: torch.Tensor, pattern: Pattern, keep: torch.Tensor,
          input_norms: torch.Tensor, mean: torch.Tensor, var: torch.Tensor,
          max_cycles: int = 50, threshold: float = 0.1, var_power: float = 1.0) -> Pruned:
    """Reselect ``keep`` (from Wanda or SparseGPT) for the weights as they are."""
    w = weight.float()
    keep = keep.clone()
    contrib = w * mean.float().reshape(1, -1)  # what each weight adds to e_i if pruned
    grow_value = contrib / var.float().clamp_min(1e-12).reshape(1, -1) ** var_power
    importance = wanda_scores(w, input_norms)
    error = (contrib * ~keep).sum(dim=1)
    active = torch.ones(len(w), dtype=torch.bool, device=w.device)
    rows = torch.arange(len(w), device=w.device)

    for _ in range(max_cycles):
        sign = torch.sign(error).reshape(-1, 1)
        grow = torch.where(keep, -INF, sign * grow_value).argmax(dim=1)
        # candidates to prune: kept, and pruning them pushes e_i toward 0 (opposite sign)
        allowed = keep & (torch.sign(contrib) != sign)
        if pattern.is_nm:  # stay in the regrown weight's group so N:M still holds
            group = torch.arange(w.shape[1], device=w.device) // pattern.m
            allowed &= group.reshape(1, -1) == (grow // pattern.m).reshape(-1, 1)
        scores = torch.where(allowed, importance, INF)
        prune = scores.argmin(dim=1)
        found = scores[rows, prune] < INF
        new_error = error - contrib[rows, grow] + contrib[rows, prune]
        active &= found & (error.abs() > threshold) & (new_error.abs() < error.abs())
        if not active.any():
            break
        keep[rows[active], grow[active]] = True
        keep[rows[active], prune[active]] = False
        error = torch.where(active, new_error, error)
    return Pruned(keep)
