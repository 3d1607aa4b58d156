"""Project EBFT time, memory and store size for a large model from per-token costs (issue 6).

    python bench/scale_projection.py [--config llama-2-7b | path/to/config.json]
                                     [--efficiency 0.5] [--nsamples 256] [--epochs 10]

The formula (per block l, T = nsamples x seqlen tokens, N = the block's linear weights,
B x S = the training batch, d = hidden size):
    train FLOPs / epoch = 6 N T + 6 (T / S) S^2 d        (matmuls, forward + backward)
    forward FLOPs        = 2 N T + 2 (T / S) S^2 d        (the block's outputs, once)
    time = blocks x (epochs x train + forward) / (efficiency x peak), plus the dense capture
           and the mask stage (about two forwards per block).
The efficiency is the achieved fraction of the matmul peak; bench/throughput.py measures
it on the machine at hand (written to bench/results/throughput.json; 71% fp32 on our CPU),
and the projection takes 0.5 unless told otherwise (GPU kernels at these shapes reach
40-60% in public MFU reports; treat the number as an estimate, not a measurement).
Early stopping only shortens this: ``--epochs`` is the paper's maximum T = 10.

Memory on the device: only the current block is there. fp32 weights, gradients and two
AdamW moments (16 bytes per trained weight), the input and target batch, and the
activations kept for the backward pass: about 34 S B d bytes per block in 16-bit with
flash attention (Korthikanti et al., 2022, "Reducing Activation Recomputation in Large
Transformer Models", Table 2, without the 5as/h attention term), twice that in fp32.
Host memory: the whole model (one 16-bit copy) plus one streamed batch. Store: the dense capture
holds blocks + 1 boundaries of T x d values in 16-bit.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from results_file import write_results

# Published configurations (config.json of the Hugging Face releases).
CONFIGS = {
    "llama-2-7b": {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                   "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000},
    "tinyllama-1.1b": {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22,
                       "num_attention_heads": 32, "num_key_value_heads": 4, "vocab_size": 32000},
    "llama-3-70b": {"hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
                    "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 128256},
    "smollm2-135m": {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
                     "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152},
}
# Dense matmul peaks from the vendors' data sheets, TFLOP/s (no sparsity), and memory, GB.
GPUS = {
    "16GB (V100-16GB, fp32: no bf16)": {"tflops": 15.7, "memory_gb": 16, "bf16": False},
    "16GB (RTX A4000, bf16)": {"tflops": 76.7, "memory_gb": 16, "bf16": True},
    "80GB (A100-80GB, bf16)": {"tflops": 312.0, "memory_gb": 80, "bf16": True},
    "80GB (H100-80GB SXM, bf16)": {"tflops": 989.0, "memory_gb": 80, "bf16": True},
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="llama-2-7b",
                        help=f"one of {sorted(CONFIGS)} or a config.json path")
    parser.add_argument("--nsamples", type=int, default=256)
    parser.add_argument("--seqlen", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--efficiency", type=float, default=0.5)
    parser.add_argument("--out", default="bench/results/scale_projection.json")
    return parser.parse_args(argv)


def load_config(name: str) -> dict:
    if name in CONFIGS:
        return CONFIGS[name]
    return json.loads(Path(name).read_text())


def project(cfg: dict, gpu: dict, args: argparse.Namespace) -> dict:
    d, inter, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    heads, kv = cfg["num_attention_heads"], cfg.get("num_key_value_heads") or \
        cfg["num_attention_heads"]
    kv_dim = d * kv // heads
    n_block = 2 * d * d + 2 * d * kv_dim + 3 * d * inter  # q, o, k, v, gate, up, down
    tokens, s, b = args.nsamples * args.seqlen, args.seqlen, args.batch
    attention = 6 * (tokens / s) * s * s * d
    train = 6 * n_block * tokens + attention
    forward = 2 * n_block * tokens + attention / 3
    flops = layers * (args.epochs * train + forward) + 3 * layers * forward  # + capture, masks
    achieved = gpu.get("efficiency", args.efficiency) * gpu["tflops"] * 1e12
    seconds = flops / achieved
    act_bytes = 34 * s * b * d * (1 if gpu["bf16"] else 2)
    device_gb = (16 * n_block + act_bytes + 2 * b * s * d * 4) / 1e9
    total_params = layers * n_block + 2 * cfg["vocab_size"] * d
    return {"block_linear_weights": n_block, "flops": flops, "hours": seconds / 3600,
            "seconds_per_block_epoch": train / achieved,
            "device_memory_gb": device_gb, "fits": device_gb < gpu["memory_gb"],
            "host_memory_gb": total_params * 2 / 1e9 + 2 * b * s * d * 4 / 1e9,
            "store_gb": (layers + 1) * tokens * d * 2 / 1e9}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = load_config(args.config)
    gpus = dict(GPUS)
    measured = Path("bench/results/throughput.json")
    if measured.exists():  # this machine, at its measured peak and efficiency: a check
        found = json.loads(measured.read_text())
        best = max(r["fraction_of_peak"] for r in found["rows"] if r["precision"] == "fp32")
        print(f"this machine (bench/throughput.py): fp32 peak {found['peaks_gflops']['fp32']:.0f}"
              f" GFLOP/s, {best:.0%} of it in the EBFT step (its row uses both)")
        gpus["this machine (measured peak and efficiency)"] = {
            "tflops": found["peaks_gflops"]["fp32"] / 1e3, "efficiency": best,
            "memory_gb": 24, "bf16": False}
    print(f"{args.config}: {args.nsamples} x {args.seqlen} calibration, batch {args.batch}, "
          f"{args.epochs} epochs (no early stop), efficiency {args.efficiency:.0%} of peak")
    print("| GPU | peak TFLOP/s | s per block-epoch | total hours | device GB | fits | "
          "host GB | store GB |")
    print("|---|---|---|---|---|---|---|---|")
    results = {}
    for name, gpu in gpus.items():
        r = project(cfg, gpu, args)
        results[name] = r
        print(f"| {name} | {gpu['tflops']:.3g} | {r['seconds_per_block_epoch']:.1f} | "
              f"{r['hours']:.2f} | {r['device_memory_gb']:.1f} | {r['fits']} | "
              f"{r['host_memory_gb']:.1f} | {r['store_gb']:.0f} |")
    write_results(args.out, {"args": vars(args), "config": cfg, "gpus": gpus,
                               "projection": results})
    return 0 if math.isfinite(sum(r["hours"] for r in results.values())) else 1


if __name__ == "__main__":
    raise SystemExit(main())
