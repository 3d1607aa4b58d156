"""Input statistics of a block's linear layers over the calibration set (every mask method's
input: norms for Wanda and RIA, mean and variance for DSnoT and FLAP, Hessians for SparseGPT)."""

from __future__ import annotations

import torch

import stages.model.architecture as arch
from stages.masks import LayerStats


def collect_stats(block, linears: dict, batches, kwargs_for, hessian: bool) -> dict:
    """Input statistics of every linear layer of a block over all calibration batches.

    Layers fed the very same tensor (q/k/v, gate/up) share one accumulator, so the
    Hessian of a shared input is computed once.
    """
    stats: dict[str, LayerStats] = {}
    this_batch: list[tuple[torch.Tensor, LayerStats]] = []

    def hook(name):
        def record(_module, args):
            x = args[0]
            for seen, acc in this_batch:
                if seen is x:
                    stats.setdefault(name, acc)
                    return
            acc = stats.setdefault(name, LayerStats(x.shape[-1], hessian, x.device))
            acc.add(x)
            this_batch.append((x, acc))
        return record

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in linears.items()]
    try:
        with torch.inference_mode():
            for x in batches():
                this_batch.clear()
                arch.run_block(block, x, kwargs_for(len(x)))
    finally:
        for handle in handles:
            handle.remove()
        this_batch.clear()
    return stats
