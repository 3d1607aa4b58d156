"""Wanda (Sun et al., 2023): score |W_ij| · ||X_j||₂, compared within each output row."""

from dataclasses import dataclass

import torch

from stages.masks.core import MaskMethod, Pattern, Pruned, keep_from_scores, register


def wanda_scores(weight: torch.Tensor, input_norms: torch.Tensor) -> torch.Tensor:
    return weight.abs().float() * input_norms.float().reshape(1, -1)


@register
@dataclass(frozen=True)
class Wanda(MaskMethod):
    name = "wanda"

    def __call__(self, weight: torch.Tensor, pattern: Pattern, *, input_norms: torch.Tensor,
                 **_) -> Pruned:
        """input_norms: the L2 norm of each input feature over all calibration tokens."""
        return Pruned(keep_from_scores(wanda_scores(weight, input_norms), pattern,
                                       per_row=True))
