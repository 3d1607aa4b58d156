"""A 7B-shaped model (or one block of a 70B shape) through the whole `ebft run` on a small
machine: peak memory, where the time goes, bytes read and written (issue 20).

    python bench/big_model.py --work /tmp/big [--config llama-2-7b] [--layers N]
                              [--tokenizer FOLDER] [-- extra ebft run flags]

Makes (once) a random-weight model of a published shape with ``bench/random_model.py``
(bf16, sharded safetensors, written tensor by tensor), then runs `ebft run` on it with a
tiny calibration (4 windows of 256 tokens, 1 epoch, 1 perplexity window of 256) in a fresh
store under ``--work``. Reports the process's peak RSS (the limit to meet: 6 GiB for the 7B
shape), each stage's seconds, I/O seconds, bytes read and written, and peak RSS, and the
EBFT stage's non-training share. Losses and perplexities of random weights mean nothing;
the timings and memory are real. Prints a Markdown table and writes JSON.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

from end_to_end import ROOT, timed_run
from results_file import write_results

TINY = ["--nsamples", "4", "--seqlen", "256", "--eval-seqlen", "256", "--eval-windows", "1",
        "--epochs", "1", "--train-batch-size", "2", "--holdout", "0.25", "--batch-size", "2",
        "--distill-epochs", "0"]  # distillation holds the whole model: not the claim here


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", required=True, help="folder for the model and the store")
    parser.add_argument("--config", default="llama-2-7b")
    parser.add_argument("--layers", type=int, default=None, help="override the depth")
    parser.add_argument("--tokenizer", default=None,
                        help="a tokenizer folder (default: the built-in SmolLM2's)")
    parser.add_argument("--out", default="bench/results/big_model.json")
    parser.add_argument("extra", nargs="*", help="more `ebft run` flags (after --)")
    return parser.parse_args(argv)


def default_tokenizer() -> str:
    from stages.model.model_source import resolve_model

    return resolve_model("smollm2-135m").path


def make_model(args: argparse.Namespace, folder: Path) -> float:
    """The random model, made unless already there; returns the seconds it took."""
    if (folder / "config.json").is_file():
        return 0.0
    started = time.monotonic()
    cmd = [sys.executable, str(ROOT / "bench" / "random_model.py"), "--config", args.config,
           "--tokenizer", args.tokenizer or default_tokenizer(), "--out", str(folder)]
    if args.layers:
        cmd += ["--layers", str(args.layers)]
    subprocess.run(cmd, check=True)
    return round(time.monotonic() - started, 1)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    work = Path(args.work).resolve()
    name = f"{args.config}{f'-{args.layers}l' if args.layers else ''}"
    folder, store = work / name, work / f"store-{name}"
    made = make_model(args, folder)
    size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    print(f"model {folder}: {size / 1e9:.1f} GB of safetensors"
          + (f" (made in {made} s)" if made else ""), flush=True)
    shutil.rmtree(store, ignore_errors=True)
    run = timed_run(["--model", str(folder), "--store", str(store), *TINY, *args.extra])
    print(f"\n{name}: {run['wall_s']} s wall, peak RSS {run['peak_rss_mb'] / 1024:.2f} GiB\n")
    print("| stage | state | seconds | I/O s | read GB | written GB | peak RSS GiB |")
    print("|---|---|---|---|---|---|---|")
    for stage, s in run["stages"].items():
        print(f"| {stage} | {s['state']} | {s['seconds']:.1f} | {s.get('io_seconds', 0):.1f} | "
              f"{s.get('read_bytes', 0) / 1e9:.2f} | {s.get('written_bytes', 0) / 1e9:.2f} | "
              f"{s.get('peak_rss_bytes', 0) / 2**30:.2f} |")
    if run["ebft_time"]:
        t = run["ebft_time"]
        print(f"\nEBFT: {t['training_seconds']} s training of {t['stage_seconds']} s: "
              f"{t['non_training_share']:.0%} outside training")
    write_results(args.out, {"model": str(folder), "config": args.config,
                             "layers": args.layers, "safetensors_bytes": size,
                             "flags": [*TINY, *args.extra], **run})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
