"""How stage tasks are cached: by content key, with records and locks inside the store.

The key is the stage spec's content digest (inputs' content + parameters + code version),
never the run id or a path. Records live in ``<store>/prefect/`` so a shared store shares
its cache; SERIALIZABLE isolation with file locks makes two concurrent runs compute a
stage once. If a record exists but the artifact it points to is gone or corrupted (its files
no longer match its DIGEST), the stage reruns.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from pathlib import Path
from typing import Any

from prefect.cache_policies import CachePolicy
from prefect.locking.filesystem import FileSystemLockManager
from prefect.states import State

from store import Store

logger = logging.getLogger(__name__)


def _process_start(pid: int) -> str | None:
    """The kernel's start time of a process (Linux), to tell a reused pid from the holder."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int, started: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return started is None or _process_start(pid) in (None, started)


class ProcessAwareLockManager(FileSystemLockManager):
    """Prefect's file locks, minus the ones a killed process leaves behind.

    A Prefect lock file names only a random holder id, so a run killed with SIGKILL during
    a stage leaves a lock nobody releases, and the next run waits for it forever. Next to
    each lock we record the holding process (host, pid, start time); a lock whose process
    no longer exists on this host is broken. Locks held from another host are respected.
    """

    def _owner_path(self, key: str) -> Path:
        return Path(self._lock_path_for_key(key)).with_suffix(".owner")

    def acquire_lock(self, key: str, holder: str, acquire_timeout: float | None = None,
                     hold_timeout: float | None = None) -> bool:
        acquired = super().acquire_lock(key, holder, acquire_timeout, hold_timeout)
        if acquired:
            owner = {"holder": holder, "host": socket.gethostname(), "pid": os.getpid(),
                     "started": _process_start(os.getpid())}
            tmp = self._owner_path(key).with_suffix(f".owner.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(owner))
            tmp.replace(self._owner_path(key))
        return acquired

    def release_lock(self, key: str, holder: str) -> None:
        super().release_lock(key, holder)
        self._owner_path(key).unlink(missing_ok=True)

    def is_locked(self, key: str, use_cache: bool = False) -> bool:
        if not super().is_locked(key, use_cache):
            return False
        if self._holder_is_gone(key):
            logger.warning("breaking the lock on %s: its process no longer exists", key)
            Path(self._lock_path_for_key(key)).unlink(missing_ok=True)
            self._owner_path(key).unlink(missing_ok=True)
            self._locks.pop(key, None)
            return False
        return True

    def _holder_is_gone(self, key: str) -> bool:
        info = self._get_lock_info(key, use_cache=False)
        try:
            owner = json.loads(self._owner_path(key).read_text())
        except (OSError, ValueError):
            return False  # no owner note (yet): assume the holder is alive
        if info is None or owner.get("holder") != info.get("holder"):
            return False  # the note belongs to an earlier holder of this key
        if owner.get("host") != socket.gethostname():
            return False
        return not _alive(int(owner["pid"]), owner.get("started"))


class ContentKey(CachePolicy):
    def compute_key(self, task_ctx, inputs: dict[str, Any], flow_parameters, **kwargs) -> str:
        return f"{task_ctx.task.name}-{inputs['spec'].key()}"


def run_stage(task, kind: str, store: Store, spec, **kwargs) -> State:
    """Run a stage task under content-key caching; returns its final Prefect state."""
    base = store.root / "prefect"
    policy = ContentKey().configure(
        key_storage=str(base / "records"),
        lock_manager=ProcessAwareLockManager(lock_files_directory=base / "locks"),
        isolation_level="SERIALIZABLE",
    )
    configured = task.with_options(
        cache_policy=policy,
        persist_result=True,
        # Results sit beside their records in the store, whatever the environment says (a
        # Path is a local folder to Prefect): a record pointing elsewhere is a cache miss
        # waiting to happen, and two stores must never share result files.
        result_storage=base / "results",
        result_serializer="json",  # results are paths and digests; nothing is ever unpickled
        # No artifact, or one whose files no longer match its digest (then it is deleted):
        # the record is ignored and the stage recomputes.
        refresh_cache=store.checked(kind, spec.key()) is None,
    )
    return configured(spec=spec, store_root=str(store.root), return_state=True, **kwargs)
