"""The Prefect API a command talks to: the configured server, or a private one for this run.

Prefect's own ephemeral server is a child in the same process group: Ctrl-C kills it along
with the run, which then spends minutes retrying its last API calls, and ``kill -9`` of the
run leaves it running. Ours is started in its own session (Ctrl-C does not reach it), is
told by the kernel to exit when its parent dies (``PR_SET_PDEATHSIG``, so not even a
``kill -9`` of the run orphans it), and is stopped when the command ends.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx

PR_SET_PDEATHSIG = 1


def _die_with(parent: int):
    """What the server's child process runs between fork and exec: only the prctl call
    (resolved here, in the parent: nothing is loaded after fork), then exit if the parent
    is already gone (it died before the signal was armed)."""
    prctl = ctypes.CDLL(None, use_errno=True).prctl

    def arm() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:
            os._exit(1)
    return arm


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def prefect_api() -> Iterator[str]:
    """Yield the API URL; starts (and finally stops) a private server if none is set."""
    from prefect.settings import PREFECT_API_URL, get_current_settings, temporary_settings

    configured = get_current_settings().api.url
    if configured:
        yield configured
        return
    import prefect

    port = _free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1",
           "PREFECT__SERVER_FINAL": "1"}
    server = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "--app-dir", str(prefect.__module_path__.parent),
         "--factory", "prefect.server.api.server:create_app", "--host", "127.0.0.1",
         "--port", str(port), "--log-level", "error", "--lifespan", "on"],
        env=env, start_new_session=True,  # Ctrl-C in the terminal does not reach it
        preexec_fn=_die_with(os.getpid()))  # noqa: PLW1509 - one prctl call, nothing else
    try:
        _wait_healthy(server, url, float(os.environ.get(
            "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")))
        os.environ["PREFECT_API_URL"] = url  # for child processes (local Dask/Ray workers)
        with temporary_settings({PREFECT_API_URL: url}):
            yield url
    finally:
        _drain_prefect_workers()  # logs and events still queued, while the server can take them
        os.environ.pop("PREFECT_API_URL", None)
        server.terminate()
        try:
            server.wait(timeout=5)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def _drain_prefect_workers(timeout: float = 5.0) -> None:
    """Send what Prefect's background log and event workers still hold, briefly: otherwise
    they retry against the stopped server for minutes when the interpreter exits."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        with contextlib.suppress(Exception):
            worker.drain_all(timeout=timeout)


def _wait_healthy(server: subprocess.Popen, url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the Prefect server for this run exited ({server.returncode})")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        time.sleep(0.1)
    raise RuntimeError(f"the Prefect server for this run did not start within {timeout:.0f}s")
