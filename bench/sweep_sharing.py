"""What sharing cached stages saves a sweep (issue 5): the sweep's wall time against the same
configurations run one by one, each on an empty store.

    python bench/sweep_sharing.py --store S [--sweep KEY] [--validate 2]

A configuration run alone on an empty store computes every stage it needs. Each of those
stages was computed exactly once somewhere in the sweep (state ``Completed``), and its time
is in that configuration's run report, so the one-by-one total is

    Σ over configurations [ Σ over its stages (time of the run that computed that stage)
                            + its own flow overhead (wall − Σ stage times) ]

Stages are matched by what they compute: calibration and dense capture by their artifact
keys, the dense perplexity by the capture, masks and the pruned perplexity by the mask key;
EBFT, LoRA, assembly and the fine-tuned perplexity belong to one configuration. With
``--validate N`` the first N configurations are really run one by one with ``ebft run`` on
empty stores (the converted model copied in, as the sweep's store had it) to check the
estimate against a measurement. Prints a Markdown table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from results_file import write_results

SHARED = {"calibration": lambda r: r["calibration"]["key"],
          "dense-capture": lambda r: r["activations"]["key"],
          "perplexity": lambda r: r["activations"]["key"],
          "masks": lambda r: r["masks"]["key"],
          "perplexity-pruned": lambda r: r["masks"]["key"]}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", default=os.environ.get("EBFT_STORE", ".ebft-store"))
    parser.add_argument("--sweep", default=None, help="sweep key (default: the newest sweep)")
    parser.add_argument("--validate", type=int, default=0,
                        help="also run the first N configurations alone on empty stores")
    parser.add_argument("--out", default="bench/results/sweep_sharing.json")
    return parser.parse_args(argv)


def identity(stage: str, report: dict) -> tuple:
    """What a stage computes: shared stages by artifact key, the rest per configuration."""
    if stage in SHARED:
        return stage, SHARED[stage](report)
    return stage, report["report_path"]


def one_by_one(reports: list[dict]) -> list[dict]:
    """Each configuration's estimated time alone on an empty store (see module doc)."""
    computed: dict[tuple, float] = {}
    for report in reports:
        for stage, seconds in report["seconds"].items():
            if "Completed" in report["states"].get(stage, ""):
                computed.setdefault(identity(stage, report), seconds)
    rows = []
    for report in reports:
        stages = report["seconds"]
        alone = sum(computed.get(identity(stage, report), seconds)
                    for stage, seconds in stages.items())
        overhead = max(0.0, report["wall_seconds"] - sum(stages.values()))
        rows.append({"config": label(report), "wall_in_sweep": report["wall_seconds"],
                     "estimated_alone": round(alone + overhead, 1),
                     "report": report["report_path"]})
    return rows


def label(report: dict) -> str:
    cfg = report["config"]
    sparsity = cfg["prune"]["pattern"] or f"{cfg['prune']['sparsity']:g}"
    return f"{cfg['prune']['method']} {sparsity} {cfg['finetune']} n{cfg['dense']['nsamples']}"


def run_alone(report: dict, models: Path) -> float:
    """Run one configuration with ``ebft run`` on an empty store; returns its wall time."""
    cfg = report["config"]
    dense, prune, train = cfg["dense"], cfg["prune"], cfg["train"]
    with tempfile.TemporaryDirectory(prefix="ebft-alone-") as tmp:
        shutil.copytree(models, Path(tmp) / "models")
        command = [sys.executable, "-m", "flows.cli", "run", "--store", tmp,
                   "--model", dense["model"], "--nsamples", str(dense["nsamples"]),
                   "--seqlen", str(dense["seqlen"]), "--eval-windows",
                   str(dense["eval_windows"] or "all"), "--method", prune["method"],
                   "--sparsity", str(prune["sparsity"]), "--finetune", cfg["finetune"],
                   "--layer-sparsity", prune["layer_sparsity"]]
        if cfg["finetune"] == "ebft":  # the other recoveries refuse EBFT's flags
            command += ["--epochs", str(train["max_epochs"]), "--tune", train["tune"],
                        "--train-batch-size", str(train["batch_size"]),
                        "--remask", "on" if train["remask"] else "off"]
            command += ["--lr", str(train["lr"])] if train["tune"] == "weights" else \
                ["--mask-lr", str(train["mask_lr"])]
        if prune["pattern"]:
            command += ["--pattern", prune["pattern"]]
        started = time.monotonic()
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL,
                       cwd=Path(__file__).resolve().parents[1])
        return round(time.monotonic() - started, 1)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    store = Path(args.store)
    sweeps = sorted((store / "sweeps").glob("*/sweep.json"), key=lambda p: p.stat().st_mtime)
    index = store / "sweeps" / args.sweep / "sweep.json" if args.sweep else sweeps[-1]
    sweep = json.loads(index.read_text())
    reports = [json.loads(Path(p).read_text()) | {"report_path": p} for p in sweep["reports"]]
    rows = one_by_one(reports)
    total_alone = sum(r["estimated_alone"] for r in rows)
    for row in rows[:args.validate]:
        report = next(r for r in reports if r["report_path"] == row["report"])
        row["measured_alone"] = run_alone(report, store / "models")
    print(f"| configurations | sweep wall s | one by one, empty store, s | saving |\n"
          f"|---|---|---|---|\n| {len(rows)} | {sweep['wall_seconds']:.0f} | "
          f"{total_alone:.0f} | {1 - sweep['wall_seconds'] / total_alone:.0%} |")
    checked = [r for r in rows if "measured_alone" in r]
    if checked:
        print("\n| configuration | estimated alone s | measured alone s |\n|---|---|---|")
        for r in checked:
            print(f"| {r['config']} | {r['estimated_alone']:.0f} | {r['measured_alone']:.0f} |")
    write_results(args.out, {"sweep": str(index), "sweep_wall_seconds": sweep["wall_seconds"],
                             "one_by_one_seconds": round(total_alone, 1), "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
