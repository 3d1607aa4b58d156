"""`ebft run` end to end: first run, fully cached rerun, and a learning-rate change (issue 6).

    python bench/end_to_end.py --store /tmp/e2e-store [--fresh] [-- extra ebft run flags]

Runs three `ebft run` processes on one store: (1) the default job (on a new store with
``--fresh``), (2) the same command again (every stage should be Cached), (3) the same with
``--lr 1e-4`` (calibration, capture, masks and their perplexities Cached; only the EBFT
blocks, assembly and the fine-tuned perplexity recompute). For each: wall time, peak RSS of
that process, every stage's Prefect state and seconds, and the store size afterwards.
Prints a Markdown table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from results_file import write_results

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", required=True)
    parser.add_argument("--fresh", action="store_true", help="delete the store first")
    parser.add_argument("--out", default="bench/results/end_to_end.json")
    parser.add_argument("extra", nargs="*", help="more `ebft run` flags (after --)")
    return parser.parse_args(argv)


def store_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def timed_run(flags: list[str]) -> dict:
    """One `ebft run` process: its wall time, peak RSS, and the states in its summary."""
    cmd = [sys.executable, "-m", "flows.cli", "run", *flags]
    start = time.monotonic()
    process = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    lines = []
    for line in process.stdout:  # EBFT_BENCH_ECHO=1: show the run's output as it comes
        lines.append(line)
        if os.environ.get("EBFT_BENCH_ECHO"):
            print(line, end="", file=sys.stderr, flush=True)
    out = "".join(lines)
    _pid, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode:
        raise SystemExit(f"ebft run failed ({process.returncode}):\n{out[-3000:]}")
    # The run's machine-readable report, not its printed summary.
    path = next(line.split()[1] for line in out.splitlines() if line.startswith("report "))
    report = json.loads(Path(path).read_text())
    stages = {name: {"state": state, "seconds": report["seconds"][name],
                     **report["usage"].get(name, {})}
              for name, state in report["states"].items()}
    perplexity = {name: r["perplexity"] for name, r in report["perplexity"].items() if r}
    # Each stage resets the process's RSS high-water mark to measure its own peak, and
    # ru_maxrss reads that same mark: the process's peak is the largest of the stages'.
    stage_peak = max((s.get("peak_rss_bytes", 0) for s in stages.values()), default=0)
    peak = max(usage.ru_maxrss * 1024, stage_peak)
    return {"wall_s": round(time.monotonic() - start, 1),
            "peak_rss_mb": round(peak / 2**20), "stages": stages,
            "perplexity": perplexity, "ebft_time": report.get("ebft_time"),
            "blocks": report.get("blocks") or [], "report": path,
            "summary": out.strip().splitlines()[-30:]}  # the run's printed summary


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    store = Path(args.store).resolve()
    if args.fresh and store.exists():
        shutil.rmtree(store)
    base = ["--store", str(store), *args.extra]
    runs = {}
    for name, flags in [("first", base), ("cached rerun", base),
                        ("--lr 1e-4", [*base, "--lr", "1e-4"])]:
        runs[name] = timed_run(flags)
        runs[name]["store_gb"] = round(store_bytes(store) / 1e9, 3)
        r = runs[name]
        print(f"{name}: {r['wall_s']} s wall, peak RSS {r['peak_rss_mb']} MB, store "
              f"{r['store_gb']} GB", flush=True)
    names = list(runs)
    stage_names = list(runs[names[0]]["stages"])
    print()
    print("| stage | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for stage in stage_names:
        cells = [f"{runs[n]['stages'].get(stage, {}).get('state', '-')} "
                 f"{runs[n]['stages'].get(stage, {}).get('seconds', 0):.1f}s" for n in names]
        print(f"| {stage} | " + " | ".join(cells) + " |")
    print("| wall time | " + " | ".join(f"{runs[n]['wall_s']} s" for n in names) + " |")
    print("| peak RSS | " + " | ".join(f"{runs[n]['peak_rss_mb']} MB" for n in names) + " |")
    print("| store size | " + " | ".join(f"{runs[n]['store_gb']} GB" for n in names) + " |")
    for n in names:
        print(f"{n}: perplexity " + "; ".join(f"{k} {v:.3f}"
                                              for k, v in runs[n]["perplexity"].items()))
    write_results(args.out, {"store": str(store), "runs": runs})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
