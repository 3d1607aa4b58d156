"""Leased locks in the store, so two runs on one store compute each artifact once.

A lock is a file ``<store>/locks/<kind>/<key>.lock`` holding its owner (host, machine, pid,
process start time, when acquired, lease). It is created with its note in one step (a
complete note is hard-linked into place, which fails if the lock exists), so no reader sees
it half-written. While held, a background thread renews the lease by touching the file every
``lease / 4`` seconds. A waiting run breaks the lock when the lease has run out (the holder
stopped renewing: killed, its host gone or cut off) or, on the holder's own machine
(hostname, boot and pid namespace), at once when the holding process no longer exists. A
holder that hangs but keeps its process alive keeps renewing: the lease protects against
lost holders, not slow ones. A waiter logs who holds the lock and since when.

Correctness never depends on a lock: artifacts are content-keyed and published
atomically, so a broken lock can at worst cause work to be done twice, never a wrong
result. The lock exists to avoid that double work.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Self

CACHE_NEUTRAL = "who computes an artifact, not what it holds"

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


def machine() -> str:
    """This host as pids see it: hostname, boot and pid namespace. Containers sharing a
    hostname have their own pid namespaces, so a pid is only judged where all three match."""
    def read(path: str) -> str:
        try:
            return Path(path).read_text().strip()
        except OSError:
            return ""

    try:
        namespace = str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        namespace = ""
    return f"{socket.gethostname()}|{read('/proc/sys/kernel/random/boot_id')}|{namespace}"


def owned_by_a_gone_process(owner: dict) -> bool:
    """Whether an owner note names a process of this machine that no longer exists."""
    return owner.get("machine") == machine() and "pid" in owner \
        and not process_alive(int(owner["pid"]), owner.get("started"))


def owner_note() -> dict:
    pid = os.getpid()
    return {"host": socket.gethostname(), "machine": machine(), "pid": pid,
            "started": process_start(pid)}


def lease_seconds() -> float:
    return float(os.environ.get(LEASE_ENV, DEFAULT_LEASE_S))


def read_note(path: Path) -> dict:
    try:
        note = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return note if isinstance(note, dict) else {}


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

    def read_owner(self) -> dict | None:
        """The holder's note and the age of its last renewal, or None if the lock is free.
        An unreadable note (a foreign or damaged file) still ages, so its lease runs out."""
        try:
            renewed_ago = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return None
        return {"token": "", **read_note(self.path), "renewed_ago": renewed_ago}

    def stale(self, owner: dict) -> str | None:
        """Why the holder is gone, or None while it holds the lock. The lease is the
        holder's own (it renews at a quarter of it)."""
        lease = float(owner.get("lease_s") or self.lease_s)
        if owner.get("renewed_ago", 0.0) > lease:
            return f"its lease ran out ({owner['renewed_ago']:.0f}s > {lease:.0f}s)"
        if owned_by_a_gone_process(owner):
            return f"its process {owner['pid']} no longer exists"
        return None

    # ---- acquire / release -----------------------------------------------------------------
    def try_acquire(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        note = self.path.with_name(f".{self.path.name}.{self.token}")
        note.write_text(json.dumps({**owner_note(), "token": self.token,
                                    "acquired": time.time(), "lease_s": self.lease_s}))
        try:
            os.link(note, self.path)
        except FileExistsError:
            return False
        finally:
            note.unlink(missing_ok=True)
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
                            owner.get("renewed_ago", 0),
                            float(owner.get("lease_s") or self.lease_s))
                last_said = time.monotonic()
            time.sleep(self.poll_s)

    def break_stale(self, owner: dict, why: str) -> None:
        """Move the stale lock aside (atomic rename). If what moved is not the lock judged
        stale (another waiter broke it and took it meanwhile), it is put back."""
        aside = self.path.with_name(f".{self.path.name}.broken-{uuid.uuid4().hex[:8]}")
        try:
            os.replace(self.path, aside)
        except FileNotFoundError:
            return
        if read_note(aside).get("token", "") != owner.get("token", ""):
            with contextlib.suppress(FileExistsError):
                os.link(aside, self.path)
            aside.unlink(missing_ok=True)
            return
        logger.warning("broke the lock on %s held by %s pid %s: %s", self.what,
                       owner.get("host", "?"), owner.get("pid", "?"), why)
        aside.unlink(missing_ok=True)

    def _renew(self) -> None:
        """Touch the lock while held; a passing I/O error (NFS) is retried next period."""
        while not self._stop.wait(self.lease_s / 4):
            if read_note(self.path).get("token") != self.token:
                if not self._stop.is_set():
                    logger.warning("lost the lock on %s (broken by another run); the artifact "
                                   "stays correct, the work may be done twice", self.what)
                return
            try:
                os.utime(self.path)
            except FileNotFoundError:
                return
            except OSError as err:
                logger.warning("could not renew the lock on %s (%s); retrying", self.what, err)

    def release(self) -> None:
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join()
        if read_note(self.path).get("token") == self.token:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> Self:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class ObjectLock:
    """The same leased lock on an object store (``store.remote.Remote``), for runs on
    several machines sharing one bucket. The lock is an object created only if absent; the
    holder renews it by rewriting it only if it is still the version it wrote (S3's
    If-Match), which also refreshes its modification time; a waiter breaks it when that time
    is older than the lease (or its process is gone, on the waiter's own machine) by deleting
    it only if it is still the version judged stale. So two waiters cannot both take it, and
    a holder knows when it lost it. Ages are measured against this machine's clock: hosts
    sharing a store need clocks within a small part of the lease (NTP)."""

    def __init__(self, remote, path: str, lease_s: float | None = None, poll_s: float = 0.5,
                 what: str = "") -> None:
        self.remote, self.path, self.what = remote, path, what or path.rsplit("/", 1)[-1]
        self.lease_s = lease_s if lease_s is not None else lease_seconds()
        self.poll_s = poll_s
        self.token = uuid.uuid4().hex
        self.version: str | None = None
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    def _note(self) -> dict:
        return {**owner_note(), "token": self.token, "acquired": time.time(),
                "lease_s": self.lease_s}

    def try_acquire(self) -> bool:
        self.version = self.remote.create(self.path, self._note())
        if self.version is None:
            return False
        self._stop.clear()
        self._renewer = threading.Thread(target=self._renew, daemon=True,
                                         name=f"lease-{self.what}")
        self._renewer.start()
        return True

    def stale(self, note: dict, age: float) -> str | None:
        lease = float(note.get("lease_s") or self.lease_s)
        if age > lease:
            return f"its lease ran out ({age:.0f}s > {lease:.0f}s)"
        if owned_by_a_gone_process(note):
            return f"its process {note['pid']} no longer exists"
        return None

    def acquire(self) -> None:
        last_said = 0.0
        while not self._attempt():
            try:
                found = self.remote.read(self.path)
            except OSError as err:  # a passing failure of the endpoint: try again
                logger.warning("reading the lock on %s failed (%s); retrying", self.what, err)
                time.sleep(self.poll_s)
                continue
            if found is None:
                continue
            note, version, age = found
            why = self.stale(note, age)
            if why:
                if self._removed(version):
                    logger.warning("broke the lock on %s held by %s pid %s: %s", self.what,
                                   note.get("host", "?"), note.get("pid", "?"), why)
                continue
            if time.monotonic() - last_said > 30:
                logger.info("waiting for %s: held by %s pid %s (renewed %.0fs ago, expires "
                            "after %.0fs without renewal)", self.what, note.get("host", "?"),
                            note.get("pid", "?"), age, float(note.get("lease_s") or 0))
                last_said = time.monotonic()
            time.sleep(self.poll_s)

    def _attempt(self) -> bool:
        try:
            return self.try_acquire()
        except OSError as err:
            logger.warning("taking the lock on %s failed (%s); retrying", self.what, err)
            time.sleep(self.poll_s)
            return False

    def _removed(self, version: str) -> bool:
        try:
            return self.remote.remove(self.path, version)
        except OSError as err:
            logger.warning("breaking the lock on %s failed (%s); retrying", self.what, err)
            return False

    def _renew(self) -> None:
        while not self._stop.wait(self.lease_s / 4):
            try:
                version = self.remote.replace(self.path, self._note(), self.version)
            except OSError as err:
                logger.warning("could not renew the lock on %s (%s); retrying", self.what, err)
                continue
            if version is None:
                if not self._stop.is_set():
                    logger.warning("lost the lock on %s (broken by another run); the artifact "
                                   "stays correct, the work may be done twice", self.what)
                return
            self.version = version

    def release(self) -> None:
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join()
        if self.version is not None:
            with contextlib.suppress(OSError):
                self.remote.remove(self.path, self.version)

    def __enter__(self) -> Self:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
