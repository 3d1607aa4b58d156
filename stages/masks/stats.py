"""Calibration statistics of one linear layer's inputs, accumulated batch by batch."""

from __future__ import annotations

import torch


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
        x = x.detach().reshape(-1, x.shape[-1]).float()
        self.count += len(x)
        self.sum += x.sum(0, dtype=torch.float64)
        self.sumsq += (x * x).sum(0, dtype=torch.float64)
        if self.hessian is not None:
            self.hessian.addmm_(x.T, x)

    def to_tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        """The sums, to be saved (Hessians are not: they are per method, and large)."""
        # cloned: layers that share one accumulator (q/k/v) must not share storage on disk
        return {f"{prefix}.count": torch.tensor([self.count]),
                f"{prefix}.sum": self.sum.cpu().clone(),
                f"{prefix}.sumsq": self.sumsq.cpu().clone()}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], prefix: str) -> LayerStats:
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
