"""Input statistics of a block's linear layers over the calibration set, from one pass of the
block (the mask stage's; the dense capture records the same during its own pass)."""

from __future__ import annotations

import torch

import stages.model.architecture as arch
from stages.model.layer_stats import StatsRecorder


def collect_stats(block, linears: dict, batches, kwargs_for, hessian: bool) -> dict:
    """Input statistics of every linear layer of a block over all calibration batches."""
    with StatsRecorder(linears, hessian) as recorder, torch.inference_mode():
        for x in batches():
            recorder.next_batch()
            arch.run_block(block, x, kwargs_for(len(x)))
    return recorder.stats
