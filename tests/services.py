"""Real services on 127.0.0.1 for the tests that talk to them: a Prefect server and worker,
a Dask scheduler and workers. Each is a subprocess in its own process group, stopped (the
whole group) when its context ends."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

ROOT = Path(__file__).parents[1]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def service(args: list[str], log: Path, env: dict | None = None,
            cwd: Path | None = None) -> Iterator[subprocess.Popen]:
    with open(log, "w") as out:
        process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, cwd=cwd or ROOT,
                                   env={**os.environ, **(env or {})}, start_new_session=True)
    try:
        yield process
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def wait_for(check, what: str, timeout: float, log: Path | None = None, every: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            result = check()
            if result:
                return result
        time.sleep(every)
    tail = log.read_text()[-3000:] if log and log.exists() else ""
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}\n{tail}")


def prefect_env(home: Path, api_url: str | None = None) -> dict:
    """Settings for Prefect processes of the tests: their own home, no telemetry."""
    env = {"PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_API_DATABASE_CONNECTION_URL":
               f"sqlite+aiosqlite:///{home / 'prefect.db'}"}
    if api_url:
        env["PREFECT_API_URL"] = api_url
    return env


@contextlib.contextmanager
def prefect_server(home: Path) -> Iterator[str]:
    """`prefect server start` on a free port with a fast scheduler loop; yields the API URL."""
    port = free_port()
    env = prefect_env(home) | {"PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "2",
                               "PREFECT_SERVER_SERVICES_LATE_RUNS_ENABLED": "false",
                               "PREFECT_UI_ENABLED": "false"}
    log = home / "server.log"
    with service([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port",
                  str(port)], log, env):
        url = f"http://127.0.0.1:{port}/api"
        wait_for(lambda: httpx.get(f"{url}/health", timeout=2).json() is True,
                 "the Prefect server", 180, log)
        yield url


def api(url: str, path: str, body: dict | None = None):
    """One call of the Prefect REST API (POST with a body, else GET)."""
    if body is None:
        response = httpx.get(f"{url}/{path}", timeout=30)
    else:
        response = httpx.post(f"{url}/{path}", json=body, timeout=30)
    response.raise_for_status()
    return response.json()


@contextlib.contextmanager
def dask_cluster(workdir: Path, workers: int = 2) -> Iterator[str]:
    """A Dask scheduler and ``workers`` worker processes (one thread each); yields its address."""
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    with service([str(BIN / "dask"), "scheduler", "--host", "127.0.0.1", "--port", str(port),
                  "--no-dashboard"], workdir / "scheduler.log"), \
            service([str(BIN / "dask"), "worker", address, "--nworkers", str(workers),
                     "--nthreads", "1", "--no-dashboard", "--local-directory",
                     str(workdir)], workdir / "workers.log"):
        from distributed import Client

        with Client(address, timeout=60) as client:
            client.wait_for_workers(workers, timeout=120)
        yield address


@contextlib.contextmanager
def s3_server(folder: Path, bucket: str = "ebft-test") -> Iterator[dict]:
    """A local S3-compatible endpoint (moto's standalone server) with one bucket; yields the
    environment a client needs (endpoint and credentials, the usual AWS variables)."""
    port = free_port()
    log = folder / "s3.log"
    folder.mkdir(parents=True, exist_ok=True)
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    with service([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)], log):
        wait_for(lambda: httpx.get(env["AWS_ENDPOINT_URL"], timeout=2).status_code < 500,
                 "the S3 server", 60, log)
        import boto3

        boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], aws_access_key_id="testing",
                     aws_secret_access_key="testing",
                     region_name="us-east-1").create_bucket(Bucket=bucket)
        yield env | {"bucket": bucket}
