"""How a stage runs: one runner does the caching, locking and verification of every stage.

A stage is a Prefect task whose result is an artifact in the store, named by the content
key of its spec (inputs' content + parameters + code version), never the run id or a path.
The cache is the store itself, not Prefect's result records: the runner

1. looks for the artifact and verifies it against its digest (a corrupted one is deleted);
2. if absent, takes the stage's leased lock (``store.locks``), looks again (another run may
   have just published it), and only then computes it;
3. releases the lock as soon as the stage ends, and reports the task as ``Cached`` when it
   found the artifact (itself or after waiting for another run) and ``Completed`` when it
   computed it, so Prefect's UI and the run report say what was really computed.

So two runs on one store (threads, processes, Dask or Ray workers, other hosts on a shared
filesystem) compute each stage once, and the one that waited reports ``Cached``.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from prefect.cache_policies import NO_CACHE
from prefect.states import Completed, State

from store import Artifact, Store
from store.usage import Usage, measure

logger = logging.getLogger("ebft")
FINISHED: list[str] = []  # kinds of the stages this process finished (for an interrupted run)
Reader = Callable[[Artifact], Any]


def as_dict(artifact: Artifact) -> dict:
    return artifact.to_dict()


def read_result(artifact: Artifact) -> dict:
    """The ``result.json`` of a result artifact (perplexity, zero-shot)."""
    from pathlib import Path

    return json.loads((Path(artifact.path) / "result.json").read_text())


def cached_stage(kind: str, read: Reader = as_dict):
    """Wrap a stage body ``fn(spec, store_root, **kwargs)`` with the store-backed cache.

    ``read`` turns a stored artifact into the value the body would have returned (its
    artifact dict, or for results like perplexity the JSON it holds).
    """
    def decorate(fn: Callable[..., Any]) -> Callable[..., State]:
        @functools.wraps(fn)
        def body(spec, store_root: str, **kwargs) -> State:
            store = Store(store_root)
            key = spec.key()
            with measure() as usage:  # the check, or the computation (not a lock wait)
                found = store.checked(kind, key)
            if found is None:
                with store.lock(kind, key):
                    found = store.checked(kind, key)  # published while we waited?
                    if found is None:
                        with measure() as usage:
                            result, name = fn(spec, store_root, **kwargs), "Completed"
            if found is not None:
                result, name = read(found), "Cached"
            FINISHED.append(kind)
            # The usage travels in the state's message, also back from Dask or Ray workers.
            return Completed(name=name, data=result, message=json.dumps(usage.to_dict()))
        return body
    return decorate


def run_stage(task, spec, store: Store, **kwargs) -> State:
    """Run a stage task; returns its final Prefect state (``Cached`` or ``Completed``).

    Prefect's own result caching is off: the store is the cache (see the module doc), and
    results travel in memory (they are paths, digests and small dicts), so nothing is
    pickled into the store and no record can point at a deleted artifact.
    """
    configured = task.with_options(cache_policy=NO_CACHE, persist_result=False)
    return configured(spec=spec, store_root=str(store.root), return_state=True, **kwargs)


def usage_of(state: State) -> Usage:
    """The resource use a stage task reported in its state's message."""
    try:
        fields = json.loads(state.message or "")
    except ValueError:
        return Usage()
    fields.pop("compute_seconds", None)
    return Usage(**fields)


class StageLog:
    """Prefect state, wall seconds and resource use of each stage of one flow run."""

    def __init__(self) -> None:
        self.states: dict[str, str] = {}
        self.seconds: dict[str, float] = {}
        self.usage: dict[str, dict] = {}

    def run(self, name: str, start_stage: Callable[[], State]):
        """Run one stage (``start_stage`` returns its state); returns its result."""
        started = time.monotonic()
        state = start_stage()
        self.record(name, [state], time.monotonic() - started)
        return state.result()

    def record(self, name: str, states: list[State], seconds: float) -> None:
        """One stage made of several tasks (EBFT's blocks) counts as their sum."""
        counts = Counter(state.name for state in states)
        self.states[name] = states[0].name if len(states) == 1 else \
            ", ".join(f"{n} {state}" for state, n in counts.items())
        self.seconds[name] = round(seconds, 1)
        self.usage[name] = sum((usage_of(s) for s in states), Usage()).to_dict()
