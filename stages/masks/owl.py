"""OWL, outlier-weighed layer-wise sparsity (Yin et al., 2023, arXiv 2310.05175).

Blocks with more *outliers* (Wanda scores |W_ij|·||X_j|| far above their mean) are pruned
less, blocks with fewer more, and the mean over blocks stays the target. A block's outlier
ratio D_l is the share of its linear weights whose score exceeds ``threshold`` (the paper's
M) times the mean score over all of the block's linear weights; the ratios are scaled linearly to a width of
2·``limit`` (the paper's λ) and centred on the target:

    sparsity_l = target - (d_l - mean(d)),   d = 2·limit · (D - min D) / (max D - min D)

The paper reports Wanda at 70% on LLaMA-7B going from 85.8 to 24.6 perplexity with M = 5,
λ = 0.08, our defaults. Scores come from the dense model on the dense capture, the same for
every mask method: the capture records the input norms as it runs, so the ratios cost no
pass of their own.
"""

from __future__ import annotations

import torch

from stages.model.layer_stats import LayerStats


def outlier_ratio(scores: list[torch.Tensor], threshold: float) -> float:
    """The share of a block's scores (all its layers together) above ``threshold`` times
    their mean."""
    total = sum(s.numel() for s in scores)
    mean = sum(float(s.double().sum()) for s in scores) / total
    return sum(int((s > threshold * mean).sum()) for s in scores) / total


def fits(sparsity: float, limit: float) -> bool:
    """Whether every block's sparsity stays inside (0, 1): one block can sit up to 2·limit
    from the target (when it alone stands out), on either side."""
    return 0 <= 2 * limit < min(sparsity, 1 - sparsity)


def owl_sparsities(ratios: list[float], target: float, limit: float) -> list[float]:
    """Per-block sparsities: more outliers, less sparsity; spread 2·limit, mean ``target``."""
    low, high = min(ratios), max(ratios)
    if high == low:  # no block stands out: uniform
        return [target] * len(ratios)
    scaled = [2 * limit * (r - low) / (high - low) for r in ratios]
    mean = sum(scaled) / len(scaled)
    return [target - (d - mean) for d in scaled]


def block_outlier_ratio(linears: dict, stats: dict[str, LayerStats], threshold: float) -> float:
    """One dense block's outlier ratio from its layers' input statistics."""
    scores = [linear.weight.data.abs().float()  # Wanda's score: |W_ij| x ||X_j||
              * stats[name].as_kwargs()["input_norms"].float().reshape(1, -1)
              for name, linear in linears.items()]
    return outlier_ratio(scores, threshold)
