"""Input statistics of a block's linear layers over the calibration set, from one pass of the
block (the mask stage's; the dense capture records the same during its own pass)."""

from __future__ import annotations

import contextlib

import torch

import stages.model.architecture as arch
from stages.model.layer_stats import StatsRecorder


def collect_stats(block, linears: dict, batches, kwargs_for, hessian: bool,
                  amp=None) -> dict:
    """Input statistics of every linear layer of a block over all calibration batches.
    ``amp``: an autocast context for the block's forward (EBFT's re-masking pass runs in
    the training's autocast); the sums stay fp32/fp64 (in-place ops are not autocast)."""
    amp = amp or contextlib.nullcontext()
    with StatsRecorder(linears, hessian) as recorder, torch.inference_mode(), amp:
        for x in batches():
            recorder.next_batch()
            arch.run_block(block, x, kwargs_for(len(x)))
    return recorder.stats
