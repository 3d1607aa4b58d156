"""Magnitude pruning: the smallest |W| over the whole layer go (Han et al., 2015)."""

import torch

from stages.masks.core import Pattern, Pruned, keep_from_scores, register


@register("magnitude")
def magnitude(weight: torch.Tensor, pattern: Pattern, **_) -> Pruned:
    return Pruned(keep_from_scores(weight.abs().float(), pattern, per_row=False))
