"""Issue 22's targets, measured at today's defaults on the Wikitext-2 test split.

    EBFT_DATA_DIR=../shared/data python bench/targets.py --work /tmp/targets \
        [--cases wanda-50,wanda-2:4,wanda-70,sparsegpt-50] [--eval-windows all] \
        [--tasks arc_easy,piqa --zeroshot-limit 500] [--run-flags '--distill-epochs 0']

Each case is one `ebft run` at the defaults with its mask flags, plus the same mask at
uniform block sparsity without fine-tuning (the starting point the targets were set
against; for N:M patterns it is the run's own pruned model). All cases share one store, so
calibration, the dense capture and the dense perplexity are computed once. For each case:
the share of the gap to dense that recovery closes, against both starting points, and the
target. ``--tasks`` adds zero-shot accuracy (lm-eval) of the dense, pruned and recovered
models to the first case: the target is recovered above pruned.

Prints a Markdown table and writes JSON (default ``bench/results/targets.json``).
"""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path

from end_to_end import timed_run
from recovery import gap_closed
from results_file import write_results

# name -> (mask flags, the share of the gap to close)
CASES: dict[str, tuple[list[str], float]] = {
    "wanda-50": (["--method", "wanda", "--sparsity", "0.5"], 0.50),
    "wanda-2:4": (["--method", "wanda", "--pattern", "2:4"], 0.55),
    "wanda-70": (["--method", "wanda", "--sparsity", "0.7"], 0.80),
    "sparsegpt-50": (["--method", "sparsegpt", "--sparsity", "0.5"], 0.50),
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", required=True, help="a folder for the shared store")
    parser.add_argument("--cases", default=",".join(CASES), help="comma list of: "
                        f"{', '.join(CASES)}")
    parser.add_argument("--eval-windows", default="all", help="Wikitext-2 test windows")
    parser.add_argument("--seed", default="0", help="calibration seed")
    parser.add_argument("--tasks", default="", help="zero-shot tasks for the first case")
    parser.add_argument("--zeroshot-limit", default="500")
    parser.add_argument("--run-flags", default="",
                        help="flags for each case's recovered run, not its uniform start, "
                        "e.g. '--distill-epochs 0'")
    parser.add_argument("--out", default="bench/results/targets.json")
    return parser.parse_args(argv)


def zeroshot_means(report_path: str) -> dict:
    report = json.loads(Path(report_path).read_text())
    return {name: r["mean_acc"] for name, r in (report.get("zeroshot") or {}).items() if r}


def measure(args: argparse.Namespace, name: str, zeroshot: bool) -> dict:
    mask_flags, target = CASES[name]
    common = ["--store", str(Path(args.work) / "store"), "--seed", args.seed,
              "--eval-data", "wikitext2", "--eval-windows", args.eval_windows, *mask_flags]
    tasks = ["--tasks", args.tasks, "--zeroshot-limit", args.zeroshot_limit] if zeroshot else []
    run = timed_run([*common, *tasks, *shlex.split(args.run_flags)])
    ppl = run["perplexity"]
    uniform = ppl["pruned"]
    if "--pattern" not in mask_flags:  # the uniform mask's pruned model, the targets' start
        uniform = timed_run([*common, "--layer-sparsity", "uniform", "--finetune", "none"]
                            )["perplexity"]["pruned"]
    closed = gap_closed(ppl, uniform)
    return {"flags": common, "run_flags": args.run_flags, "perplexity": ppl, "uniform_pruned": uniform,
            "gap_closed": closed, "gap_closed_own_start": gap_closed(ppl), "target": target,
            "met": closed is not None and closed >= target, "wall_s": run["wall_s"],
            "ebft_s": run["stages"].get("ebft", {}).get("seconds"),
            "distill_s": run["stages"].get("distill", {}).get("seconds"),
            "zeroshot": zeroshot_means(run["report"]) if zeroshot else {}}


def percent(share: float | None) -> str:
    return "n/a" if share is None else f"{100 * share:.1f}%"


def table(results: dict) -> str:
    head = ("| case | dense | pruned (uniform) | pruned (this mask) | recovered | gap closed "
            "| of own start | target | met |")
    lines = [head, "|---" * 9 + "|"]
    for name, r in results.items():
        p = r["perplexity"]
        closed, own = (percent(r[k]) for k in ("gap_closed", "gap_closed_own_start"))
        lines.append(f"| {name} | {p['dense']:.3f} | {r['uniform_pruned']:.3f} | "
                     f"{p['pruned']:.3f} | {p['finetuned']:.3f} | {closed} | {own} | "
                     f"{100 * r['target']:.0f}% | {'yes' if r['met'] else 'no'} |")
    if "wanda-50" in results and "sparsegpt-50" in results:
        s, w = (results[c]["perplexity"]["finetuned"] for c in ("sparsegpt-50", "wanda-50"))
        lines.append(f"\nSparseGPT start vs Wanda start, recovered: {s:.3f} vs {w:.3f} "
                     f"({'met' if s <= w else 'not met'})")
    for name, r in results.items():
        if r["zeroshot"]:
            z = r["zeroshot"]
            verdict = "met" if z.get("finetuned", 0) > z.get("pruned", 1) else "not met"
            lines.append(f"\nzero-shot mean ({name}): " + ", ".join(
                f"{k} {v:.4f}" for k, v in z.items()) + f" ({verdict})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    Path(args.work).mkdir(parents=True, exist_ok=True)
    results = {}
    for i, name in enumerate(args.cases.split(",")):
        if name not in CASES:
            raise SystemExit(f"unknown case {name!r}; choose from {', '.join(CASES)}")
        results[name] = measure(args, name, zeroshot=bool(args.tasks) and i == 0)
        print(table(results), flush=True)
    write_results(args.out, {"eval_windows": args.eval_windows, "seed": args.seed,
                             "cases": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
