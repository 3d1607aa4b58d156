"""Leased locks in the store, so two runs on one store compute each artifact once.

A lock is a file ``<store>/locks/<kind>/<key>.lock`` created with O_EXCL and holding its
owner (host, pid, process start time, when acquired). While held, a background thread
renews the lease by touching the file every ``lease / 4`` seconds. A waiting run breaks
the lock when the lease has run out (the holder stopped renewing: killed, hung, its host
gone) or, on the holder's own host, at once when the holding process no longer exists.
A waiter logs who holds the lock and since when.

Correctness never depends on a lock: artifacts are content-keyed and published
atomically, so a broken lock can at worst cause work to be done twice, never a wrong
result. The lock exists to avoid that double work.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Self

logger = logging.getLogger("ebft")
LEASE_ENV = "EBFT_LOCK_LEASE_SECONDS"
DEFAULT_LEASE_S = 60.0


def process_start(pid: int) -> str | None:
    """The kernel's start time of a process (Linux), to tell a reused pid from the holder."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def process_alive(pid: int, started: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return started is None or process_start(pid) in (None, started)


def lease_seconds() -> float:
    return float(os.environ.get(LEASE_ENV, DEFAULT_LEASE_S))


class StageLock:
    """An exclusive, leased lock on one path; a context manager."""

    def __init__(self, path: Path, lease_s: float | None = None, poll_s: float = 0.2,
                 what: str = "") -> None:
        self.path, self.what = Path(path), what or Path(path).stem
        self.lease_s = lease_s if lease_s is not None else lease_seconds()
        self.poll_s = poll_s
        self.token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    # ---- owner notes -----------------------------------------------------------------------
    def _owner(self) -> dict:
        pid = os.getpid()
        return {"token": self.token, "host": socket.gethostname(), "pid": pid,
                "started": process_start(pid), "acquired": time.time()}

    def read_owner(self) -> dict | None:
        """The holder's note and the age of its last renewal, or None if the lock is free."""
        try:
            note = json.loads(self.path.read_text())
            note["renewed_ago"] = time.time() - self.path.stat().st_mtime
            return note
        except FileNotFoundError:
            return None
        except (OSError, ValueError):  # being written this instant: treat as held and fresh
            return {"token": "", "renewed_ago": 0.0}

    def stale(self, owner: dict) -> str | None:
        """Why the holder is gone, or None while it holds the lock."""
        if owner.get("renewed_ago", 0.0) > self.lease_s:
            return f"its lease ran out ({owner['renewed_ago']:.0f}s > {self.lease_s:.0f}s)"
        if owner.get("host") == socket.gethostname() and "pid" in owner \
                and not process_alive(int(owner["pid"]), owner.get("started")):
            return f"its process {owner['pid']} no longer exists"
        return None

    # ---- acquire / release -----------------------------------------------------------------
    def try_acquire(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(self._owner()))
        self._stop.clear()
        self._renewer = threading.Thread(target=self._renew, daemon=True,
                                         name=f"lease-{self.what}")
        self._renewer.start()
        return True

    def acquire(self) -> None:
        """Wait for the lock, breaking it if its holder is gone; logs who holds it."""
        last_said = 0.0
        while not self.try_acquire():
            owner = self.read_owner()
            if owner is None:
                continue
            why = self.stale(owner)
            if why:
                self.break_stale(owner, why)
                continue
            if time.monotonic() - last_said > 30:
                since = time.strftime("%H:%M:%S", time.localtime(owner.get("acquired", 0)))
                logger.info("waiting for %s: held by %s pid %s since %s (lease renewed %.0fs "
                            "ago, expires after %.0fs without renewal)", self.what,
                            owner.get("host", "?"), owner.get("pid", "?"), since,
                            owner.get("renewed_ago", 0), self.lease_s)
                last_said = time.monotonic()
            time.sleep(self.poll_s)

    def break_stale(self, owner: dict, why: str) -> None:
        """Move the stale lock aside (atomic rename); whoever renames it first wins."""
        aside = self.path.with_name(f"{self.path.name}.broken-{uuid.uuid4().hex[:8]}")
        try:
            os.replace(self.path, aside)
        except FileNotFoundError:
            return
        logger.warning("broke the lock on %s held by %s pid %s: %s", self.what,
                       owner.get("host", "?"), owner.get("pid", "?"), why)
        aside.unlink(missing_ok=True)

    def _renew(self) -> None:
        while not self._stop.wait(self.lease_s / 4):
            try:
                if json.loads(self.path.read_text()).get("token") != self.token:
                    logger.warning("lost the lock on %s (broken by another run); the artifact "
                                   "stays correct, the work may be done twice", self.what)
                    return
                os.utime(self.path)
            except (OSError, ValueError):
                return

    def release(self) -> None:
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join()
        try:
            if json.loads(self.path.read_text()).get("token") == self.token:
                self.path.unlink()
        except (OSError, ValueError):
            pass

    def __enter__(self) -> Self:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
