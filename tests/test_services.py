"""Against real services on 127.0.0.1, as users run it: a Prefect server with a process worker
firing a scheduled deployment, and sweeps on a Dask cluster and on Ray whose tables equal the
thread runner's."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from conftest import build_tiny_model
from services import BIN, ROOT, api, dask_cluster, prefect_env, prefect_server, service, wait_for

from store import Store

pytestmark = pytest.mark.slow


def succeed(args: list[str], env: dict | None = None, timeout: float = 600) -> str:
    """Run a command from the repository root; its output, after asserting it succeeded."""
    done = subprocess.run(args, cwd=ROOT, env={**os.environ, **(env or {})}, check=False,
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def tiny_run_parameters(model: Path, data_dir: Path) -> dict:
    return {"dense": {"model": str(model), "data_dir": str(data_dir), "nsamples": 8,
                      "seqlen": 64, "eval_seqlen": 64, "eval_windows": 1, "batch_size": 4},
            "train": {"lr": 0.001, "max_epochs": 1, "batch_size": 2, "holdout": 0.25},
            "prune": {"method": "wanda", "sparsity": 0.5}, "finetune": "ebft"}


def test_deployments_deploy_as_pasted_and_a_schedule_fires_runs_the_worker_completes(
        tmp_path, data_dir):
    model = build_tiny_model(tmp_path / "model")
    home = tmp_path / "prefect-home"
    home.mkdir()
    with prefect_server(home) as url:
        env = prefect_env(home, url)
        succeed(["bash", "scripts/deploy.sh"], env)  # the README's step, as pasted
        ours = yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]
        found = {d["name"]: d for d in api(url, "deployments/filter", {})}
        assert set(found) == {d["name"] for d in ours}
        for deployment in found.values():
            assert deployment["pull_steps"] == []  # nothing of this machine frozen in
            assert deployment["global_concurrency_limit"]["limit"] == 1
        nightly = [d for d in found.values() if d["schedules"]]
        assert len(nightly) == 3 and all(s["active"] for d in nightly for s in d["schedules"])
        pools = {p["name"]: p for p in api(url, "work_pools/filter", {})}
        assert pools["ebft-process"]["concurrency_limit"] == 1

        # The main job's deployment, pointed at a tiny model, on a 10 s interval schedule.
        spec = next(d for d in ours if d["name"] == "smollm2-wanda-ebft-nightly")
        spec = {**spec, "name": "tiny-interval", "schedules": [{"interval": 10}],
                "parameters": {"cfg": tiny_run_parameters(model, data_dir)},
                "work_pool": {"name": "ebft-test"}}
        test_yaml = tmp_path / "prefect.yaml"
        test_yaml.write_text(yaml.safe_dump({"name": "ebft-test", "pull": [],
                                             "deployments": [spec]}))
        succeed([str(BIN / "prefect"), "work-pool", "create", "ebft-test", "--type", "process"],
                env)
        succeed([str(BIN / "prefect"), "--no-prompt", "deploy", "--prefect-file",
                 str(test_yaml), "--all"], env)
        (deployment,) = [d for d in api(url, "deployments/filter", {})
                         if d["name"] == "tiny-interval"]

        # A worker elsewhere (not in the repository), its store from the environment.
        store = tmp_path / "worker-store"
        worker_dir = tmp_path / "worker"
        worker_dir.mkdir()
        worker_env = prefect_env(home, url) | {"EBFT_STORE": str(store),
                                               "PREFECT_WORKER_QUERY_SECONDS": "2"}
        runs_filter = {"flow_runs": {"deployment_id": {"any_": [deployment["id"]]},
                                     "state": {"type": {"any_": ["COMPLETED"]}}},
                       "sort": "START_TIME_ASC"}
        with service([str(BIN / "prefect"), "worker", "start", "--pool", "ebft-test"],
                     worker_dir / "worker.log", worker_env, cwd=worker_dir):
            runs = wait_for(lambda: (r := api(url, "flow_runs/filter", runs_filter))
                            and len(r) >= 2 and r, "two scheduled runs completed", 600,
                            worker_dir / "worker.log", every=2)
        states = [{t["name"]: t["state"]["name"] for t in api(
            url, "task_runs/filter", {"task_runs": {"flow_run_id": {"any_": [run["id"]]}}})}
            for run in runs[:2]]
    assert all(run["auto_scheduled"] for run in runs[:2])  # made by the scheduler
    assert (store / "models-sparse").is_dir(), "the run did not use the worker's EBFT_STORE"
    first, second = states
    assert "Completed" in first.values() and len(first) == len(second) >= 8, first
    assert set(second.values()) == {"Cached"}, second


# ---- sweeps on Dask and Ray -----------------------------------------------------------------

def sweep(store: Path, model: Path, data_dir: Path, *runner: str) -> Path:
    """A tiny sweep through the CLI, as a user runs it; returns its output folder."""
    out = succeed([str(BIN / "ebft"), "sweep", "--model", str(model), "--data-dir",
                   str(data_dir), "--store", str(store), "--nsamples", "8", "--seqlen", "64",
                   "--eval-seqlen", "64", "--eval-windows", "2", "--batch-size", "4",
                   "--train-batch-size", "2", "--epochs", "1", "--holdout", "0.25",
                   "--methods", "magnitude,wanda", "--sparsities", "0.5",
                   "--finetunes", "none,ebft", "--parallel", "2", *runner])
    return Path(next(line.split()[1] for line in out.splitlines()
                     if line.startswith("tables/plots")))


@pytest.fixture(scope="module")
def threads_sweep(tmp_path_factory, data_dir) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("threads")
    model = build_tiny_model(root / "model")
    return model, sweep(root / "store", model, data_dir)


def assert_same_tables_and_shared_stages_computed_once(mine: Path, reference: Path) -> None:
    assert (mine / "tables.md").read_text() == (reference / "tables.md").read_text()
    a, b = (pd.read_parquet(p / "runs.parquet") for p in (mine, reference))
    pd.testing.assert_series_equal(a["ppl"], b["ppl"], rtol=1e-5)
    import json

    reports = [json.loads(Path(p).read_text())
               for p in json.loads((mine / "sweep.json").read_text())["reports"]]
    for stage in ("calibration", "dense-capture", "perplexity"):
        states = [r["states"][stage] for r in reports]
        assert states.count("Completed") == 1, (stage, states)


def test_a_sweep_on_a_dask_cluster_of_two_worker_processes_equals_the_thread_runner(
        tmp_path, data_dir, threads_sweep):
    model, reference = threads_sweep
    with dask_cluster(tmp_path) as address:
        mine = sweep(tmp_path / "store", model, data_dir, "--task-runner", "dask",
                     "--address", address)
    assert_same_tables_and_shared_stages_computed_once(mine, reference)
    computed_by = {e["pid"] for e in Store(tmp_path / "store").published()
                   if e["kind"] not in ("reports", "sweeps")}
    assert len(computed_by) == 2, computed_by  # both worker processes computed stages


def test_a_sweep_on_ray_equals_the_thread_runner(tmp_path, data_dir, threads_sweep):
    pytest.importorskip("prefect_ray")
    model, reference = threads_sweep
    mine = sweep(tmp_path / "store", model, data_dir, "--task-runner", "ray")
    assert_same_tables_and_shared_stages_computed_once(mine, reference)


def test_independent_ebft_blocks_on_a_dask_cluster_equal_one_at_a_time(tmp_path, data_dir):
    """--block-inputs dense: every block trains on the dense capture's inputs, so the blocks
    go to the cluster's two worker processes at once; the assembled weights equal the same
    mode run one block at a time (with one torch thread, as Dask workers have)."""
    from test_reliability import finished, run_flags, weights

    model = build_tiny_model(tmp_path / "model")

    def ebft_run(store: Path, *runner: str) -> str:
        flags = [*run_flags(model, store, data_dir, epochs=2), "--block-inputs", "dense",
                 *runner]
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
        return finished(subprocess.Popen([sys.executable, "-m", "flows.cli", *flags], cwd=ROOT,
                                         env=env, stdout=subprocess.PIPE,
                                         stderr=subprocess.STDOUT, text=True))

    ebft_run(tmp_path / "one-at-a-time")
    with dask_cluster(tmp_path) as address:
        ebft_run(tmp_path / "dask", "--task-runner", "dask", "--address", address)
    mine, reference = weights(tmp_path / "dask"), weights(tmp_path / "one-at-a-time")
    assert mine.keys() == reference.keys()
    for name in mine:
        assert torch.equal(mine[name], reference[name]), name
    computed_by = {e["pid"] for e in Store(tmp_path / "dask").published()
                   if e["kind"] == "ebft-block"}
    assert len(computed_by) == 2, computed_by  # both worker processes trained blocks
