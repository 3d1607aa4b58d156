"""Magnitude pruning: the smallest |W| over the whole layer go (Han et al., 2015)."""

from dataclasses import dataclass

import torch

from stages.masks.core import MaskMethod, Pattern, Pruned, keep_from_scores, register


@register
@dataclass(frozen=True)
class Magnitude(MaskMethod):
    name = "magnitude"

    def __call__(self, weight: torch.Tensor, pattern: Pattern, **_) -> Pruned:
        return Pruned(keep_from_scores(weight.abs().float(), pattern, per_row=False))
