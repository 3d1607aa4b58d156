"""Reliability: a run killed with SIGKILL resumes where it stopped, with the same weights."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import build_tiny_model
from safetensors import safe_open

from flows.caching import ProcessAwareLockManager

ROOT = Path(__file__).parents[1]


def ebft_run(model: Path, store: Path, data_dir: Path) -> subprocess.Popen:
    """`ebft run` in its own process (and its own ephemeral Prefect server)."""
    args = [sys.executable, "-m", "flows.cli", "run", "--model", str(model), "--store",
            str(store), "--data-dir", str(data_dir), "--nsamples", "8", "--seqlen", "64",
            "--eval-seqlen", "64", "--eval-windows", "1", "--batch-size", "4",
            "--train-batch-size", "2", "--epochs", "40", "--tolerance", "0",
            "--holdout", "0.25", "--lr", "1e-4"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def finished(process: subprocess.Popen, timeout: float = 600) -> str:
    out, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, out[-3000:]
    return out


def weights(store: Path) -> dict[str, torch.Tensor]:
    (folder,) = (store / "models-sparse").iterdir()
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118


@pytest.mark.slow
def test_kill_9_during_a_block_then_rerun_resumes_with_identical_weights(tmp_path, data_dir):
    model = build_tiny_model(tmp_path / "model")
    finished(ebft_run(model, tmp_path / "whole", data_dir))

    store = tmp_path / "killed"
    process = ebft_run(model, store, data_dir)
    blocks = store / "ebft-block"
    deadline = time.monotonic() + 600
    while not (blocks.is_dir() and any((b / "DIGEST").exists() for b in blocks.iterdir())):
        assert process.poll() is None and time.monotonic() < deadline, "no block finished"
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)  # the run and its Prefect server, mid-block
    process.wait()
    finished_blocks = {b: (b / "DIGEST").stat().st_mtime_ns for b in blocks.iterdir()
                       if (b / "DIGEST").exists()}
    done = len(finished_blocks)
    assert 1 <= done < 3, "the kill must land before the last block finished"
    locks = list((store / "prefect" / "locks").glob("*.lock"))
    assert locks, "the killed run should have left its lock behind"

    out = finished(ebft_run(model, store, data_dir))  # must not wait on the dead lock
    # Blocks 0..done-1 are reused as they are (Prefect may call them Completed rather than
    # Cached when the kill landed between the artifact and Prefect's record); the rest train.
    for index in range(3):
        assert (f"block {index} epoch 1:" in out) == (index >= done), (index, done)
    for block, stamp in finished_blocks.items():
        assert (block / "DIGEST").stat().st_mtime_ns == stamp, "a finished block was rewritten"
    mine, theirs = weights(store), weights(tmp_path / "whole")
    assert mine.keys() == theirs.keys()
    for name in mine:
        assert torch.equal(mine[name], theirs[name]), name


def test_a_lock_of_a_dead_process_is_broken_and_a_live_one_is_kept(tmp_path):
    manager = ProcessAwareLockManager(tmp_path)
    assert manager.acquire_lock("stage-a", holder="me")
    assert manager.is_locked("stage-a")  # held by this (live) process
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    owner = tmp_path / "stage-a.owner"
    note = owner.read_text().replace(f'"pid": {os.getpid()}', f'"pid": {dead.stdout.strip()}')
    owner.write_text(note)  # now the holder is a process that has exited
    assert not manager.is_locked("stage-a")
    assert not (tmp_path / "stage-a.lock").exists()
    # A lock without an owner note (another tool, or one being written) is respected.
    (tmp_path / "stage-b.lock").write_text('{"holder": "x", "expiration": null}')
    assert manager.is_locked("stage-b")
