"""Pruned perplexity of every mask method, before any fine-tuning (paper Tables 1-3, first rows).

    python bench/masks_table.py [--model smollm2-135m] [--nsamples 16] [--eval-windows 6]

Runs the main flow with ``finetune="none"`` once per (method, pattern): calibration, the
dense capture and the dense perplexity are computed once and shared by every row; each row
computes its own masks and pruned perplexity. Prints a Markdown table and writes JSON.
Wall time per row is the mask stage plus the pruned perplexity (as measured by the flow;
"cached" when an earlier run already built it).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

METHODS = ["magnitude", "wanda", "sparsegpt", "wanda+dsnot", "sparsegpt+dsnot"]
PATTERNS = ["0.5", "2:4"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--store", default=os.environ.get("EBFT_STORE", ".ebft-store"))
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--nsamples", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=1024)
    parser.add_argument("--eval-seqlen", type=int, default=2048)
    parser.add_argument("--eval-windows", default="6", help="N or 'all' (148 at 2048)")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--patterns", default=",".join(PATTERNS),
                        help="comma list of unstructured ratios and N:M patterns")
    parser.add_argument("--mask-inputs", default="sequential")
    parser.add_argument("--out", default="bench/results/masks_table.json")
    return parser.parse_args(argv)


def row_config(args: argparse.Namespace, method: str, pattern: str):
    from flows.dense import DenseConfig
    from flows.run import PruneConfig, RunConfig

    windows = None if args.eval_windows == "all" else int(args.eval_windows)
    dense = DenseConfig(model=args.model, store=args.store, data_dir=args.data_dir,
                        nsamples=args.nsamples, seqlen=args.seqlen, eval_seqlen=args.eval_seqlen,
                        eval_windows=windows)
    nm = pattern if ":" in pattern else None
    prune = PruneConfig(method=method, sparsity=0.0 if nm else float(pattern), pattern=nm,
                        mask_inputs=args.mask_inputs, layer_sparsity="uniform")  # the paper's
    return RunConfig(dense=dense, prune=prune, finetune="none")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from flows.cli import prefect_env

    prefect_env()  # no telemetry on offline machines
    from flows.run import prepare, run_flow

    rows, dense = [], None
    started = time.monotonic()
    for pattern in args.patterns.split(","):
        for method in args.methods.split(","):
            cfg = row_config(args, method, pattern)
            prepare(cfg)
            report = run_flow(cfg)
            dense = report["perplexity"]["dense"]
            seconds = report["seconds"]
            rows.append({
                "method": method, "pattern": report["mask_report"]["pattern"],
                "sparsity": report["mask_report"]["overall_sparsity"],
                "perplexity": report["perplexity"]["pruned"]["perplexity"],
                "mask_seconds": seconds["masks"], "eval_seconds": seconds["perplexity-pruned"],
                "mask_state": report["states"]["masks"], "report": report["report_path"],
            })
            print(f"{method:<16} {rows[-1]['pattern']:<8} ppl {rows[-1]['perplexity']:.3f} "
                  f"masks {seconds['masks']}s", flush=True)
    calibration = (f"{args.nsamples} C4 windows of {args.seqlen} tokens, masks from "
                   f"{args.mask_inputs} block inputs")
    evaluation = f"Wikitext-2 test, {dense['windows']} of {dense['windows_total']} windows of " \
                 f"{dense['seqlen']} tokens"
    lines = [f"Model {args.model}; calibration: {calibration}; perplexity: {evaluation}.", "",
             "| method | pattern | sparsity | perplexity | masks s | eval s |",
             "|---|---|---|---|---|---|",
             f"| dense | - | 0 | {dense['perplexity']:.3f} | - | - |"]
    for r in rows:
        mask_time = "cached" if r["mask_state"] == "Cached" else f"{r['mask_seconds']:.0f}"
        lines.append(f"| {r['method']} | {r['pattern']} | {r['sparsity']:.3f} | "
                     f"{r['perplexity']:.3f} | {mask_time} | {r['eval_seconds']:.0f} |")
    table = "\n".join(lines)
    print("\n" + table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"calibration": calibration, "evaluation": evaluation,
                               "dense": dense, "rows": rows, "table": table,
                               "wall_seconds": round(time.monotonic() - started, 1)}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
