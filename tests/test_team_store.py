"""`ebft run` on one s3:// store from processes acting as separate machines (their own
working folder and local copy of the store), against a real local S3 endpoint."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import build_tiny_model
from services import s3_server
from test_reliability import count_states, run_flags, stage_states

from store import Store

ROOT = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    with s3_server(tmp_path_factory.mktemp("s3")) as env:
        yield env


def on_machine(name: str, tmp_path: Path, s3: dict, url: str, model: Path, data_dir: Path,
               *extra: str, lease_s: float = 60) -> subprocess.Popen:
    """`ebft run` as another machine would run it: its own folder, its own local copy."""
    home = tmp_path / name
    home.mkdir(exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "EBFT_STORE_CACHE": str(home / "cache"),
           "EBFT_LOCK_LEASE_SECONDS": str(lease_s),
           **{k: v for k, v in s3.items() if k.startswith("AWS_")}}
    flags = run_flags(model, Path("PLACEHOLDER"), data_dir, epochs=3)
    flags[flags.index("PLACEHOLDER")] = url
    return subprocess.Popen([sys.executable, "-m", "flows.cli", *flags, *extra], cwd=home,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def finished(process: subprocess.Popen, timeout: float = 600) -> str:
    out, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, out[-3000:]
    return out


def perplexities(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("wikitext-2")]


@pytest.mark.slow
def test_a_second_machine_reuses_the_first_ones_stages(tmp_path, data_dir, s3):
    model = build_tiny_model(tmp_path / "model")
    url = f"s3://{s3['bucket']}/shared"
    first = finished(on_machine("one", tmp_path, s3, url, model, data_dir))
    # Another machine, another learning rate: calibration, capture, masks and the dense and
    # pruned perplexities come from the first machine's work; only EBFT and what follows run.
    second = finished(on_machine("two", tmp_path, s3, url, model, data_dir, "--lr", "5e-4"))
    states = stage_states(second)
    for stage in ("calibration", "dense-capture", "masks", "perplexity", "perplexity-pruned"):
        assert states[stage] == "Cached", (stage, states)
    assert count_states(states["ebft"]) == {"Completed": 3}
    assert (tmp_path / "two" / "cache").is_dir()  # the local copy it read the capture from
    assert not (tmp_path / "two" / "s3:").exists() and not (tmp_path / "one" / "s3:").exists()
    lines = dict(zip(("one", "two"), (perplexities(first), perplexities(second)), strict=True))
    assert lines["one"][:2] == lines["two"][:2] and lines["one"], lines  # dense and pruned
    # A third machine asking for the first configuration computes nothing.
    third = finished(on_machine("three", tmp_path, s3, url, model, data_dir))
    assert all(count_states(s).keys() == {"Cached"} for s in stage_states(third).values()), \
        stage_states(third)
    assert perplexities(third) == perplexities(first)
    os.environ.update({k: v for k, v in s3.items() if k.startswith("AWS_")})
    published = Store(url).published()
    assert not [e for e in published if not e["kept"]], "an artifact was computed twice"
    assert len({e["host"] for e in published}) == 1  # (all on this host, in three processes)


@pytest.mark.slow
def test_a_killed_machine_s_lock_is_taken_over_and_the_run_finishes(tmp_path, data_dir, s3):
    model = build_tiny_model(tmp_path / "model")
    url = f"s3://{s3['bucket']}/killed"
    env = {k: v for k, v in s3.items() if k.startswith("AWS_")}
    os.environ.update(env)
    remote = Store(url).remote
    doomed = on_machine("one", tmp_path, s3, url, model, data_dir, "--epochs", "40",
                        lease_s=4)
    deadline = time.monotonic() + 300
    while not remote.fs.glob(remote.path("locks", "ebft-block", "*.lock")):
        assert doomed.poll() is None and time.monotonic() < deadline, "no block started"
        time.sleep(0.2)
        remote.fs.invalidate_cache()
    # killed while it holds the block's lock (killing it a few seconds later, once a second
    # machine had started, raced the tiny model's training: on a fast day it had finished)
    os.killpg(doomed.pid, signal.SIGKILL)
    doomed.wait()
    waiter = on_machine("two", tmp_path, s3, url, model, data_dir, "--epochs", "40",
                        lease_s=4)
    out = finished(waiter)
    assert "broke the lock on ebft-block" in out
    assert count_states(stage_states(out)["ebft"])["Completed"] >= 1
    remote.fs.invalidate_cache()
    assert not remote.fs.glob(remote.path("locks", "*", "*.lock")), "a lock was left behind"
