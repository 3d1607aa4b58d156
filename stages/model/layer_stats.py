"""Statistics of a block's linear layers' inputs over the calibration set, accumulated batch
by batch by forward hooks: what every mask method scores with (norms for Wanda and RIA, mean
and variance for DSnoT and FLAP, Hessians for SparseGPT) and what OWL weighs blocks by.

Here, not in ``stages.masks``, because the dense capture records them too: a stage's code
version covers what it imports, and the capture must not depend on the mask methods."""

from __future__ import annotations

from typing import Self

import torch

# Rows summed in fp32 before their sums join the fp64 totals: a batch converted to fp64 whole
# (``sum(dtype=float64)`` does that) cost EBFT's re-masking pass a third of its time on a
# CPU; a 256-row fp32 slice stays in cache and its sums lose ~1e-7 relative. Accelerators
# sum a whole batch in fp32 (tree reductions, as exact), in one launch.
SUM_ROWS = 256


class LayerStats:
    """Running Σx, Σx² (and Σxxᵀ if asked) over every calibration token, in float64/32.

    The sums live on the device of the inputs (the block's device), so the statistics, and
    the masks computed from them, never leave the GPU.
    """

    def __init__(self, features: int, hessian: bool = False,
                 device: torch.device | str = "cpu") -> None:
        self.count = 0
        self.sum = torch.zeros(features, dtype=torch.float64, device=device)
        self.sumsq = torch.zeros(features, dtype=torch.float64, device=device)
        self.hessian = torch.zeros(features, features, device=device) if hessian else None

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1])
        self.count += len(x)
        step = SUM_ROWS if x.device.type == "cpu" else max(1, len(x))  # a GPU: one launch
        for rows in x.split(step):  # fp32 sums of a few rows, added up in fp64
            rows = rows.float()
            self.sum += rows.sum(0)
            self.sumsq += rows.square().sum(0)
        if self.hessian is not None:
            x = x.float()
            self.hessian.addmm_(x.T, x)

    def to_tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        """The sums, to be saved (Hessians are not: they are per method, and large)."""
        # cloned: layers that share one accumulator (q/k/v) must not share storage on disk
        return {f"{prefix}.count": torch.tensor([self.count]),
                f"{prefix}.sum": self.sum.cpu().clone(),
                f"{prefix}.sumsq": self.sumsq.cpu().clone()}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], prefix: str) -> LayerStats:
        """The statistics ``to_tensors`` saved: a later stage scores with them, no pass."""
        stats = cls(len(tensors[f"{prefix}.sum"]))
        stats.count = int(tensors[f"{prefix}.count"])
        stats.sum, stats.sumsq = tensors[f"{prefix}.sum"], tensors[f"{prefix}.sumsq"]
        return stats

    def as_kwargs(self) -> dict[str, torch.Tensor]:
        """What the methods take: input_norms (Wanda), mean/var (DSnoT), hessian (SparseGPT)."""
        mean = self.sum / self.count
        stats = {"input_norms": self.sumsq.sqrt().float(), "mean": mean.float(),
                 "var": (self.sumsq / self.count - mean**2).clamp_min(0).float()}
        if self.hessian is not None:
            stats["hessian"] = self.hessian
        return stats


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
