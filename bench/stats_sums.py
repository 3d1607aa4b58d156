"""How long the input statistics of one calibration batch take, and how exact they are.

    python bench/stats_sums.py [--batch 8] [--seqlen 1024]

Times ``LayerStats.add`` (what the capture, the mask stage and EBFT's re-masking pass run on
every linear layer's input) on SmolLM2-135M's input widths (576: attention and MLP inputs;
1536: the down projection's), fp32 and bf16 inputs (under autocast some layers see bf16),
and its sums' largest relative error against a float64 reference. Run it at two commits to
compare implementations.
"""

from __future__ import annotations

import argparse
import time

import torch

from stages.model.layer_stats import LayerStats


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    print("| input | features | ms per batch | rel. error Σx | rel. error Σx² |")
    print("|---|---|---|---|---|")
    for dtype in (torch.float32, torch.bfloat16):
        for features in (576, 1536):
            x = (torch.randn(args.batch, args.seqlen, features) * 3 + 1).to(dtype)
            acc = LayerStats(features)
            acc.add(x)  # warm-up
            start = time.perf_counter()
            for _ in range(args.repeats):
                acc.add(x)
            ms = 1e3 * (time.perf_counter() - start) / args.repeats
            ref = x.double().reshape(-1, features)
            n = args.repeats + 1
            err_sum = ((acc.sum / n - ref.sum(0)).abs() / ref.abs().sum(0)).max().item()
            err_sq = ((acc.sumsq / n - (ref * ref).sum(0)).abs() / (ref * ref).sum(0)).max()
            print(f"| {str(dtype).removeprefix('torch.')} | {features} | {ms:.1f} | "
                  f"{err_sum:.1e} | {err_sq.item():.1e} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
