"""Recovery options against the recipe before them, decided on held-out data (issue 22).

    EBFT_DATA_DIR=../shared/data python bench/recovery.py --work /tmp/recovery \
        --variants previous,nmse,default --seeds 0,1 [--val-windows 32] [--c4-windows 16]

Each variant is `ebft run` with its flags (``VARIANTS``) on one store, so the calibration,
the dense capture and the masks of a seed are computed once and shared. Each variant is
measured on the Wikitext-2 **validation** split and on held-out C4 documents (never
calibration data), never on the test split; ``--eval-data wikitext2 --val-windows all``
gives the reported numbers once a choice is made. For each, the share of the gap that
pruning opened which the recovery closes: (pruned - recovered) / (pruned - dense).

Prints a Markdown table and writes JSON (default ``bench/results/recovery.json``; existing
results in it are kept and updated).
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
from pathlib import Path

from end_to_end import timed_run
from results_file import write_results

# The default recipe before issue 22, as flags. Every option is measured as it plus a few
# flags, so a variant's name keeps its meaning when the defaults change; "default" is
# whatever the code's defaults are now.
PREVIOUS = ["--layer-sparsity", "uniform", "--remask", "off", "--train-batch-size", "2",
            "--lr", "1e-3", "--loss", "mse", "--epochs", "2", "--distill-epochs", "0"]
# the second round's defaults (OWL, remask, batch 1, lr 2e-3; two block epochs, no
# distillation): what the third and fourth rounds were measured against
SECOND = ["--epochs", "2", "--distill-epochs", "0"]
OWL_REMASK_BATCH1 = ["--layer-sparsity", "owl", "--remask", "on", "--train-batch-size", "1"]

# name -> every flag of `ebft run` that differs from today's defaults
VARIANTS: dict[str, list[str]] = {
    "default": [],
    "previous": PREVIOUS,
    "second": SECOND,
    "nmse": [*PREVIOUS, "--loss", "nmse"],
    "cosine": [*PREVIOUS, "--schedule", "cosine", "--warmup", "0.1"],
    "lr2e-3": [*PREVIOUS, "--lr", "2e-3"],
    "lr5e-4": [*PREVIOUS, "--lr", "5e-4"],
    "no-clip": [*PREVIOUS, "--max-grad-norm", "0"],
    "dense-block": [*PREVIOUS, "--target", "dense-block"],
    "epochs4": [*PREVIOUS, "--epochs", "4"],
    "batch1": [*PREVIOUS, "--train-batch-size", "1"],
    "sublayers": [*PREVIOUS, "--window", "sublayers"],
    "remask": [*PREVIOUS, "--remask", "on"],
    "owl": [*PREVIOUS, "--layer-sparsity", "owl"],
    "owl-remask": [*PREVIOUS, "--layer-sparsity", "owl", "--remask", "on"],
    "owl-remask-batch1": [*PREVIOUS, *OWL_REMASK_BATCH1],
    "owl-remask-batch1-lr2e-3": [*PREVIOUS, *OWL_REMASK_BATCH1, "--lr", "2e-3"],  # = second
    "owl-remask-batch1-lr4e-3": [*PREVIOUS, *OWL_REMASK_BATCH1, "--lr", "4e-3"],
    "generated": [*PREVIOUS, "--calibration", "generated"],
    # third round, each on the second round's defaults
    "train-norms": [*SECOND, "--train-norms"],
    "n32-e1": [*SECOND, "--nsamples", "32", "--epochs", "1"],
    "owl-limit0.12": [*SECOND, "--owl-limit", "0.12"],
    "owl-limit0.04": [*SECOND, "--owl-limit", "0.04"],
    "warmup": [*SECOND, "--warmup", "0.05"],
    "cosine-now": [*SECOND, "--schedule", "cosine"],
    "holdout0": [*SECOND, "--holdout", "0"],
    "lr3e-3": [*SECOND, "--lr", "3e-3"],
    "capped": [*SECOND, "--loss", "capped"],
    "nmse-now": [*SECOND, "--loss", "nmse"],
    # fourth round: the whole model distilled on the dense logits after the block pass
    "distill": ["--epochs", "2", "--distill-epochs", "1", "--distill-lr", "1e-4"],
    "distill-e1": ["--epochs", "1", "--distill-epochs", "1", "--distill-lr", "1e-4"],
    "distill-e1-lr2e-4": ["--epochs", "1", "--distill-epochs", "1", "--distill-lr", "2e-4"],
    # seventh round: distillation of the top blocks only (cheaper: no backward pass below)
    "kd-top0.5": ["--distill-epochs", "1", "--distill-top", "0.5"],
    "start-dense": ["--start", "dense"],
    # for a SparseGPT start (issue 22's "at least as good as Wanda"): its own settings. Until
    # commit 39d7036 SparseGPT's dampening was 0.01 in every run (these variants were
    # measured so); since, "auto" gives 0.3 before EBFT, so "default" is "percdamp0.3" and
    # "percdamp0.01" the paper's
    "percdamp0.01": ["--percdamp", "0.01"],
    "remask-off": ["--remask", "off"],
    "mask-dense": ["--mask-inputs", "dense"],  # remask auto is then off
    "percdamp0.1": ["--percdamp", "0.1"],
    "sgpt-row": ["--sparsegpt-group", "row"],
    "percdamp0.3": ["--percdamp", "0.3"],
    "sgpt-row-percdamp0.1": ["--sparsegpt-group", "row", "--percdamp", "0.1"],
    "percdamp1": ["--percdamp", "1"],
    "sgpt-row-percdamp0.3": ["--sparsegpt-group", "row", "--percdamp", "0.3"],
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", required=True, help="a folder for the shared store")
    parser.add_argument("--variants", default="default",
                        help=f"comma list of: {', '.join(VARIANTS)}")
    parser.add_argument("--seeds", default="0", help="calibration seeds, comma list")
    parser.add_argument("--mask-flags", default="",
                        help="mask flags for every variant, e.g. '--pattern 2:4'")
    parser.add_argument("--val-windows", default="32")
    parser.add_argument("--c4-windows", default="16")
    parser.add_argument("--eval-data", default="wikitext2-validation,c4-heldout")
    parser.add_argument("--out", default="bench/results/recovery.json")
    return parser.parse_args(argv)


def gap_closed(ppl: dict, reference: float | None = None) -> float | None:
    """The share of the gap between dense and ``reference`` (the uniform Wanda mask's pruned
    perplexity, i.e. the "previous" row's; default: this run's own pruned model) that the
    recovery closes."""
    dense, recovered = ppl["dense"], ppl.get("finetuned")
    pruned = reference or ppl["pruned"]
    if recovered is None or pruned <= dense:
        return None
    return (pruned - recovered) / (pruned - dense)


def measure(args: argparse.Namespace, variant: str, seed: str, eval_data: str) -> dict:
    windows = args.c4_windows if eval_data == "c4-heldout" else args.val_windows
    flags = ["--store", str(Path(args.work) / "store"), "--seed", seed,
             "--eval-data", eval_data, "--eval-windows", windows,
             *shlex.split(args.mask_flags), *VARIANTS[variant]]
    run = timed_run(flags)
    ppl = {name: round(value, 4) for name, value in run["perplexity"].items()}
    return {"flags": flags, "perplexity": ppl, "gap_closed": gap_closed(ppl),
            "ebft_s": run["stages"].get("ebft", {}).get("seconds"),
            "distill_s": run["stages"].get("distill", {}).get("seconds"),
            "ebft_state": run["stages"].get("ebft", {}).get("state"),
            "wall_s": run["wall_s"], "windows": windows}


def table(results: dict, eval_sets: list[str], seeds: list[str] | None = None) -> str:
    """One row per variant: pruned and recovered perplexity, and the gap closed against the
    uniform mask's pruned model ("previous") of the same seed; mean (± sd) over ``seeds`` (all: None),
    so compare rows measured on the same seeds."""
    if seeds is not None:
        results = {v: {s: r for s, r in by_seed.items() if s in seeds}
                   for v, by_seed in results.items()}
        results = {v: by_seed for v, by_seed in results.items() if by_seed}
    head = "| variant | " + " | ".join(f"{e}: pruned | recovered | gap closed"
                                       for e in eval_sets)
    lines = [head + " | EBFT s |", "|---" * (3 * len(eval_sets) + 2) + "|"]
    for variant, by_seed in results.items():
        mask_flags = variant.rsplit(" ", 1)[0] if " " in variant else ""
        reference = results.get(f"{mask_flags} previous".strip(), {})
        cells = []
        for e in eval_sets:
            runs = [(seed, r[e]) for seed, r in by_seed.items() if e in r]
            pruned = [r["perplexity"]["pruned"] for _, r in runs]
            ppl = [r["perplexity"].get("finetuned") for _, r in runs]
            gaps = [gap_closed(r["perplexity"], reference.get(seed, {}).get(e, {})
                               .get("perplexity", {}).get("pruned")) for seed, r in runs]
            cells += [spread(pruned, 3), spread(ppl, 3),
                      spread([100 * g for g in gaps if g is not None], 1, "%")]
        seconds = [r[e]["ebft_s"] for r in by_seed.values() for e in eval_sets[:1] if e in r
                   and "Cached" not in (r[e]["ebft_state"] or "Cached")]  # computed here
        lines.append(f"| {variant} | " + " | ".join(cells) + f" | {spread(seconds, 0)} |")
    return "\n".join(lines)


def spread(values: list, digits: int, unit: str = "") -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.{digits}f}{unit}"
    return f"{mean:.{digits}f}{unit} ± {statistics.stdev(values):.{digits}f} (n={len(values)})"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    Path(args.work).mkdir(parents=True, exist_ok=True)
    out = Path(args.out)
    saved = json.loads(out.read_text()) if out.is_file() else {}
    results = saved.setdefault("variants", {})
    eval_sets = args.eval_data.split(",")
    for variant in args.variants.split(","):
        if variant not in VARIANTS:
            raise SystemExit(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")
        for seed in args.seeds.split(","):
            for eval_data in eval_sets:
                run = measure(args, variant, seed, eval_data)
                name = f"{args.mask_flags} {variant}".strip()  # e.g. "--pattern 2:4 nmse"
                results.setdefault(name, {}).setdefault(seed, {})[eval_data] = run
                print(json.dumps({variant: {seed: {eval_data: run}}}), flush=True)
                write_results(str(out), saved)
    print(table(results, eval_sets, args.seeds.split(",")))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
