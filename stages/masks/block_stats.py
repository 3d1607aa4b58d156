"""Input statistics of a block's linear layers over the calibration set (every mask method's
input: norms for Wanda and RIA, mean and variance for DSnoT and FLAP, Hessians for SparseGPT)."""

from __future__ import annotations

from typing import Self

import torch

import stages.model.architecture as arch
from stages.masks import LayerStats


class StatsRecorder:
    """Forward hooks on a block's linear layers that add each batch's inputs to their
    ``LayerStats``, whatever runs the block (the mask stage's pass, or the dense capture's).

    Layers fed the very same tensor (q/k/v, gate/up) share one accumulator, so the Hessian
    of a shared input is computed once. Call ``next_batch()`` before each batch.
    """

    def __init__(self, linears: dict, hessian: bool) -> None:
        self.linears, self.hessian = linears, hessian
        self.stats: dict[str, LayerStats] = {}
        self._this_batch: list[tuple[torch.Tensor, LayerStats]] = []
        self._handles: list = []

    def _hook(self, name: str):
        def record(_module, args):
            x = args[0]
            for seen, acc in self._this_batch:
                if seen is x:
                    self.stats.setdefault(name, acc)
                    return
            acc = self.stats.setdefault(name, LayerStats(x.shape[-1], self.hessian, x.device))
            acc.add(x)
            self._this_batch.append((x, acc))
        return record

    def next_batch(self) -> None:
        self._this_batch.clear()

    def __enter__(self) -> Self:
        self._handles = [m.register_forward_pre_hook(self._hook(n))
                         for n, m in self.linears.items()]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._this_batch.clear()


def collect_stats(block, linears: dict, batches, kwargs_for, hessian: bool) -> dict:
    """Input statistics of every linear layer of a block over all calibration batches."""
    with StatsRecorder(linears, hessian) as recorder, torch.inference_mode():
        for x in batches():
            recorder.next_batch()
            arch.run_block(block, x, kwargs_for(len(x)))
    return recorder.stats
