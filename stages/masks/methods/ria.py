"""RIA, Relative Importance and Activations (Zhang et al., ICLR 2024, "Plug-and-Play: An
Efficient Post-training Pruning Method for Large Language Models").

A weight's relative importance is its magnitude relative to the other weights of its row
(the same output) plus relative to the other weights of its column (the same input):

    RI_ij = |W_ij| / Σ_k |W_ik| + |W_ij| / Σ_k |W_kj|

scaled by the input's activation norm to a power a (the paper uses a = 0.5), and compared
within each output row, as Wanda does:  score_ij = RI_ij · ||X_j||₂^a.

This module is the whole of the method: the registry, the CLI flag ``--ria-power``, its
validation and its own part of the mask key all come from the class below.
"""

from dataclasses import dataclass

import torch

from stages.masks.core import MaskMethod, Pattern, Pruned, keep_from_scores, param, register


def ria_scores(weight: torch.Tensor, input_norms: torch.Tensor, power: float) -> torch.Tensor:
    w = weight.abs().float()
    relative = w / w.sum(dim=1, keepdim=True).clamp_min(1e-12) + \
        w / w.sum(dim=0, keepdim=True).clamp_min(1e-12)
    return relative * input_norms.float().reshape(1, -1) ** power


@register
@dataclass(frozen=True)
class RIA(MaskMethod):
    name = "ria"
    power: float = param(0.5, "power a of the input activation norm in the score")

    def __call__(self, weight: torch.Tensor, pattern: Pattern, *, input_norms: torch.Tensor,
                 **_) -> Pruned:
        scores = ria_scores(weight, input_norms, self.power)
        return Pruned(keep_from_scores(scores, pattern, per_row=True))

    def problems(self) -> list[str]:
        return [] if self.power >= 0 else [f"--ria-power {self.power}: must be >= 0"]
