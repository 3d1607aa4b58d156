"""The default run's wall time against the previous default recipe's (issue 22: within 1.25x).

    EBFT_DATA_DIR=../shared/data python bench/default_cost.py --work /tmp/cost [-- flags]

Both are `ebft run` from an empty store, one after the other in the same session on the
same machine, so the ratio does not depend on which CPU ran them. "previous" is the default
recipe before issue 22 written as flags of today's code (uniform sparsity, masks chosen
once, batch 2, lr 1e-3, plain MSE, two block epochs, no distillation). Prints a Markdown table and writes JSON.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from end_to_end import timed_run
from results_file import write_results

RECIPES: dict[str, list[str]] = {
    "previous": ["--layer-sparsity", "uniform", "--remask", "off", "--train-batch-size", "2",
                 "--lr", "1e-3", "--loss", "mse", "--epochs", "2", "--distill-epochs", "0"],
    "default": [],
}
STAGES = ("dense-capture", "masks", "ebft", "distill", "perplexity-finetuned")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", required=True, help="a folder for the two stores")
    parser.add_argument("--out", default="bench/results/default_cost.json")
    parser.add_argument("extra", nargs="*", help="more `ebft run` flags for both (after --)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    runs = {}
    for name, flags in RECIPES.items():
        store = Path(args.work).resolve() / name
        if store.exists():
            shutil.rmtree(store)
        runs[name] = timed_run(["--store", str(store), *flags, *args.extra])
        runs[name]["flags"] = flags + args.extra
    base = runs["previous"]["wall_s"]
    print("| recipe | wall s | ratio | " + " | ".join(f"{s} s" for s in STAGES)
          + " | dense / pruned / recovered |")
    print("|---" * (4 + len(STAGES)) + "|")
    for name, run in runs.items():
        stages = " | ".join(f"{run['stages'].get(s, {}).get('seconds', 0.0):.1f}" for s in STAGES)
        ppl = " / ".join(f"{run['perplexity'][k]:.3f}" for k in ("dense", "pruned", "finetuned"))
        print(f"| {name} | {run['wall_s']} | {run['wall_s'] / base:.2f}x | {stages} | {ppl} |")
    print("\n".join(runs["default"]["summary"]))
    write_results(args.out, {"runs": runs})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
