"""EBFT training throughput against the machine's measured matmul peak (issue 6).

    python bench/throughput.py [--model smollm2-135m] [--blocks 0,14,29] [--batch 2]

1. Peak: the best of several large square matmuls (fp32, and bf16) on this device.
2. The EBFT training step (forward, MSE, backward, masked AdamW step) on real blocks of the
   model, at the default batch and sequence length, in fp32 and under bf16 autocast.
3. Achieved FLOP/s = the block's matmul FLOPs / step time, and its ratio to the peak of
   the precision it ran in.

FLOPs counted per step (T tokens, B sequences of S, hidden d, N linear weights of the block):
linear layers 6·N·T (forward 2·N·T, backward twice that), attention score and value
matmuls 6·B·S²·d (causal: half of the 12·B·S²·d a full square would cost). Elementwise work
(norms, rotary, SiLU, softmax, the optimiser) is not counted: it is overhead.
Prints a Markdown table and writes JSON (``--out``); ``--profile`` also prints the top ops.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from results_file import write_results

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--blocks", default="0,14,29", help="comma list of block indices")
    parser.add_argument("--batch", type=int, default=2, help="sequences per step (the default run's was 2 "
                        "until issue 22, now 1)")
    parser.add_argument("--seqlen", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per measurement")
    parser.add_argument("--matmul-size", type=int, default=2048)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--profile", action="store_true", help="print where a step's time goes")
    parser.add_argument("--out", default="bench/results/throughput.json")
    return parser.parse_args(argv)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(size: int, dtype: torch.dtype, device: torch.device,
                repeats: int = 10) -> tuple[float, int]:
    """Best FLOP/s of a square matmul, after a warm-up; returns (FLOP/s, size used).

    CPUs without native bf16 run bf16 matmuls orders of magnitude slower than fp32; the size
    is reduced (halving) until one product takes under 3 s, so the benchmark still finishes.
    """
    while True:
        a = torch.randn(size, size, device=device).to(dtype)
        b = torch.randn(size, size, device=device).to(dtype)
        sync(device)
        start = time.perf_counter()
        a @ b
        sync(device)
        if time.perf_counter() - start < 3 or size <= 256:
            break
        size //= 2
    a @ b  # a second warm-up: thread pools and caches settle
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best, size


def block_flops(block, batch: int, seqlen: int, hidden: int) -> float:
    import stages.model.architecture as arch

    linear = sum(m.weight.numel() for m in arch.linear_layers(block).values())
    tokens = batch * seqlen
    return 6 * linear * tokens + 6 * batch * seqlen**2 * hidden


def time_steps(block, keep, kwargs, cfg, device, batch, seqlen, hidden, steps) -> list[float]:
    """Seconds per EBFT step: the production step itself (BlockTuner.step: forward, MSE,
    backward, masked update), on random inputs."""
    from stages.recovery.block_training import BlockTuner, autocast_for

    tuner = BlockTuner(block, keep, cfg, nm_m=0)
    amp = autocast_for(cfg, device, torch.float32)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, seqlen, hidden, generator=gen).to(device)
    y = torch.randn(batch, seqlen, hidden, generator=gen).to(device)
    times = []
    for step in range(steps + 1):  # the first step warms up
        sync(device)
        start = time.perf_counter()
        tuner.step(x, y, kwargs, amp)
        sync(device)
        if step:
            times.append(time.perf_counter() - start)
    return times


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import copy

    import stages.model.architecture as arch
    from stages.masks import parse_pattern, sparsify
    from stages.model.devices import resolve_device
    from stages.model.model_source import load_model, resolve_model
    from stages.recovery.block_training import TrainConfig

    device = resolve_device(args.device)
    precisions = args.precisions.split(",")
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    peaks, peak_sizes = {}, {}
    for p in precisions:
        peaks[p], peak_sizes[p] = matmul_peak(args.matmul_size, dtypes[p], device)
        print(f"matmul peak {p} ({peak_sizes[p]}^2): {peaks[p] / 1e9:.1f} GFLOP/s", flush=True)

    model = load_model(resolve_model(args.model), torch.float32)
    blocks = arch.decoder_blocks(model)
    hidden = model.config.hidden_size
    kwargs = arch.block_kwargs(model, args.batch, args.seqlen, device, torch.float32)
    pattern = parse_pattern(0.5, None)
    rows = []
    for index in [int(i) for i in args.blocks.split(",")]:
        for precision in precisions:
            block = copy.deepcopy(blocks[index]).to(device)
            keep = {name: sparsify("magnitude", linear.weight.data, pattern).keep
                    for name, linear in arch.linear_layers(block).items()}
            cfg = TrainConfig(autocast="bfloat16" if precision == "bf16" else "none")
            times = time_steps(block, keep, kwargs, cfg, device, args.batch, args.seqlen,
                               hidden, args.steps)
            seconds = statistics.median(times)
            flops = block_flops(block, args.batch, args.seqlen, hidden)
            rows.append({"block": index, "precision": precision, "seconds_per_step": seconds,
                         "tokens_per_s": args.batch * args.seqlen / seconds,
                         "achieved_gflops": flops / seconds / 1e9,
                         "peak_gflops": peaks[precision] / 1e9,
                         "fraction_of_peak": flops / seconds / peaks[precision],
                         "fraction_of_fp32_peak": flops / seconds / peaks["fp32"]
                         if "fp32" in peaks else None})
            r = rows[-1]
            print(f"block {index} {precision}: {seconds:.3f} s/step, "
                  f"{r['tokens_per_s']:.0f} tok/s, {r['achieved_gflops']:.1f} GFLOP/s "
                  f"= {r['fraction_of_peak']:.0%} of the {precision} peak", flush=True)
            if args.profile and index == int(args.blocks.split(",")[0]):
                profile(block, keep, kwargs, cfg, device, args, hidden)

    print()
    print(f"device: {device}, threads: {torch.get_num_threads()}, batch {args.batch} x "
          f"{args.seqlen} tokens, torch {torch.__version__}")
    print("| block | precision | s/step | tokens/s | GFLOP/s | peak GFLOP/s | of peak |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['block']} | {r['precision']} | {r['seconds_per_step']:.3f} | "
              f"{r['tokens_per_s']:.0f} | {r['achieved_gflops']:.1f} | {r['peak_gflops']:.1f} | "
              f"{r['fraction_of_peak']:.0%} |")
    write_results(args.out, {"device": str(device), "threads": torch.get_num_threads(),
                               "peaks_gflops": {p: v / 1e9 for p, v in peaks.items()},
                               "peak_sizes": peak_sizes,
                               "args": vars(args), "rows": rows})
    return 0


def profile(block, keep, kwargs, cfg, device, args, hidden) -> None:
    """Print the ops that take most of a step's time (torch.profiler, 3 steps)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda"
                                           else [])
    with torch_profile(activities=activities) as prof:
        time_steps(block, keep, kwargs, cfg, device, args.batch, args.seqlen, hidden, 2)
    sort = "cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=15))


if __name__ == "__main__":
    raise SystemExit(main())
