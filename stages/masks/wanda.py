"""Wanda (Sun et al., 2023): score |W_ij| · ||X_j||₂, compared within each output row."""

import torch

from stages.masks.core import Pattern, keep_from_scores, register


@register("wanda")
def wanda(weight: torch.Tensor, pattern: Pattern, *, input_norms: torch.Tensor,
          **_) -> torch.Tensor:
    """input_norms: the L2 norm of each input feature over all calibration tokens."""
    scores = weight.abs().float() * input_norms.float().reshape(1, -1)
    return keep_from_scores(scores, pattern, per_row=True)
