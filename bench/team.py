"""One store for a team, independent blocks on workers: the numbers of issue 21.

    EBFT_DATA_DIR=../shared/data python bench/team.py --work /tmp/team \
        [--parts quality,makespan,remote]

- ``quality``: SmolLM2-135M, the default run, perplexity on the full Wikitext-2 test set,
  with sequential block inputs (the default), ``--block-inputs dense`` and
  ``--mask-inputs dense``, on one store (dense capture and pruned model shared).
- ``makespan``: the EBFT stage with independent blocks on a local Dask cluster of two
  worker processes (one thread each), against sequential blocks in one process with one
  thread; and the projection to k workers from the measured per-block times.
- ``remote``: the default run from scratch on a local folder, against the same from scratch
  on an ``s3://`` store served by a local S3 endpoint (moto), with a fresh local copy.

Prints Markdown tables and writes JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from end_to_end import timed_run
from results_file import write_results

BIN = Path(sys.executable).parent
# Independent blocks cannot re-mask on the fine-tuned path, so no row does: the rows differ in
# their inputs only.
FULL = ["--eval-windows", "all", "--remask", "off"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", required=True, help="a folder for stores and logs")
    parser.add_argument("--parts", default="quality,makespan,remote")
    parser.add_argument("--out", default="bench/results/team.json")
    return parser.parse_args(argv)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def started(args: list[str], log: Path):
    with open(log, "w") as out:
        process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    try:
        yield process
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)


@contextlib.contextmanager
def environment(**values: str):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def summary(run: dict) -> dict:
    return {"wall_s": run["wall_s"], "perplexity": run["perplexity"],
            "ebft_s": run["stages"].get("ebft", {}).get("seconds"),
            "states": {k: v["state"] for k, v in run["stages"].items()}}


def quality(work: Path) -> dict:
    store = work / "quality"
    runs = {"sequential": [], "block-inputs dense": ["--block-inputs", "dense"],
            "mask-inputs dense": ["--mask-inputs", "dense"]}
    return {name: summary(timed_run(["--store", str(store), *FULL, *flags]))
            for name, flags in runs.items()}


def makespan(work: Path) -> dict:
    store = work / "quality"  # capture and masks cached: only the EBFT stage is new
    fresh = ["--store", str(store), "--train-seed", "7", "--remask", "off"]
    with environment(OMP_NUM_THREADS="1"):
        sequential = timed_run(fresh)
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    with started([str(BIN / "dask"), "scheduler", "--host", "127.0.0.1", "--port", str(port),
                  "--no-dashboard"], work / "scheduler.log"), \
            started([str(BIN / "dask"), "worker", address, "--nworkers", "2", "--nthreads",
                     "1", "--no-dashboard", "--local-directory", str(work)],
                    work / "workers.log"):
        time.sleep(10)
        parallel = timed_run([*fresh, "--block-inputs", "dense", "--task-runner", "dask",
                              "--address", address])
    blocks = parallel.get("blocks") or []
    per_block = [b["seconds"] for b in blocks]
    projection = {}
    if per_block:
        total, longest = sum(per_block), max(per_block)
        projection = {k: round(max(total / k, longest), 1) for k in (1, 2, 4, 8, 30)}
    return {"sequential_1_thread": summary(sequential), "dask_2_workers": summary(parallel),
            "speedup": round(sequential["stages"]["ebft"]["seconds"]
                             / parallel["stages"]["ebft"]["seconds"], 2),
            "training_seconds_per_block": per_block,
            "projected_training_makespan_s": projection}


def remote(work: Path) -> dict:
    local = work / "local-store"
    shutil.rmtree(local, ignore_errors=True)
    on_disk = timed_run(["--store", str(local)])
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    creds = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "bench",
             "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1",
             "EBFT_STORE_CACHE": str(work / "s3-cache")}
    shutil.rmtree(work / "s3-cache", ignore_errors=True)
    with started([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                 work / "s3.log"), environment(**creds):
        import boto3

        time.sleep(3)
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="team")
        on_s3 = timed_run(["--store", "s3://team/store"])
    return {"local_folder": summary(on_disk), "s3": summary(on_s3),
            "ratio": round(on_s3["wall_s"] / on_disk["wall_s"], 3)}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    parts = {"quality": quality, "makespan": makespan, "remote": remote}
    out = Path(args.out)  # parts measured before (another --parts) are kept
    results = json.loads(out.read_text()) if out.is_file() else {}
    for name in args.parts.split(","):
        results[name] = parts[name](work)
        print(json.dumps({name: results[name]}, indent=1), flush=True)
        write_results(args.out, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
