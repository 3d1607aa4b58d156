"""How stage tasks are cached: by content key, with records and locks inside the store.

The key is the stage spec's content digest (inputs' content + parameters + code version),
never the run id or a path. Records live in ``<store>/prefect/`` so a shared store shares
its cache; SERIALIZABLE isolation with file locks makes two concurrent runs compute a
stage once. If a record exists but the artifact it points to is gone, the stage reruns.
"""

from __future__ import annotations

from typing import Any

from prefect.cache_policies import CachePolicy
from prefect.locking.filesystem import FileSystemLockManager
from prefect.states import State

from store import Store


class ContentKey(CachePolicy):
    def compute_key(self, task_ctx, inputs: dict[str, Any], flow_parameters, **kwargs) -> str:
        return f"{task_ctx.task.name}-{inputs['spec'].key()}"


def run_stage(task, kind: str, store: Store, spec, **kwargs) -> State:
    """Run a stage task under content-key caching; returns its final Prefect state."""
    base = store.root / "prefect"
    policy = ContentKey().configure(
        key_storage=str(base / "records"),
        lock_manager=FileSystemLockManager(lock_files_directory=base / "locks"),
        isolation_level="SERIALIZABLE",
    )
    configured = task.with_options(
        cache_policy=policy,
        persist_result=True,
        result_serializer="json",  # results are paths and digests; nothing is ever unpickled
        refresh_cache=store.get(kind, spec.key()) is None,
    )
    return configured(spec=spec, store_root=str(store.root), return_state=True, **kwargs)
