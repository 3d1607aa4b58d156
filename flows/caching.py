"""How a stage runs in a flow: one Prefect task for every stage.

The caching itself is ``stages.stage.produce``: the store is the cache. An artifact is
named by the content key of its spec (inputs' content + parameters + code version), never
the run id or a path; a run looks it up and verifies it, else takes the stage's leased
lock (``store.locks``), looks again, and only then computes it, releasing the lock as soon
as the stage ends. So two runs on one store (threads, processes, Dask or Ray workers,
other hosts on a shared filesystem) compute each stage once.

This module makes that a Prefect task named after the stage, whose final state says what
really happened, ``Completed`` (computed here) or ``Cached`` (found, perhaps after waiting
for another run), and carries the stage's resource use in its message.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from collections.abc import Callable

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.futures import PrefectFuture
from prefect.states import Completed, State

from stages.stage import Spec, Stage, produce
from store import Artifact, Store
from store.usage import Usage, measure

logger = logging.getLogger("ebft")
FINISHED: list[str] = []  # kinds of the stages this process finished (for an interrupted run)


@task
def stage_task(stage: Stage, spec: Spec, store_location: str, inputs: dict) -> State:
    store = Store(store_location)
    inputs = {name: here(store, value) for name, value in inputs.items()}
    result, built, usage = produce(stage, spec, store, inputs, measure)
    FINISHED.append(stage.kind)
    # The usage travels in the state's message, also back from Dask or Ray workers.
    return Completed(name="Completed" if built else "Cached", data=result,
                     message=json.dumps(usage.to_dict()))


def here(store: Store, value):
    """An input artifact as this machine has it: artifacts travel between tasks (and
    machines: Dask or Ray workers) by kind and key; the path is this machine's own copy
    (a store mounted elsewhere, or a remote store's local copy, downloaded if needed)."""
    if isinstance(value, list):
        return [here(store, v) for v in value]
    if not isinstance(value, Artifact):
        return value
    found = store.get(value.kind, value.key)
    if found is None:
        raise FileNotFoundError(f"{value.kind}/{value.key} is not in the store "
                                f"{store.location}; rerun the flow to recompute it")
    return found


def run_stage(stage: Stage, spec: Spec, store: Store, **inputs) -> State:
    """Run a stage as a Prefect task; returns its final state (``Cached`` or ``Completed``).

    Prefect's own result caching is off: the store is the cache, and results travel in
    memory (they are paths, digests and small dicts), so nothing is pickled into the store
    and no record can point at a deleted artifact.
    """
    return configured(stage, spec)(stage=stage, spec=spec, store_location=store.location,
                                   inputs=inputs, return_state=True)


def configured(stage: Stage, spec: Spec):
    return stage_task.with_options(name=stage.kind, task_run_name=stage.run_name(spec),
                                   cache_policy=NO_CACHE, persist_result=False)


def submit_stage(stage: Stage, spec: Spec, store: Store, **inputs) -> PrefectFuture:
    """The same task, submitted to the flow's task runner (threads, Dask, Ray) without
    waiting: for stages that do not depend on each other (independent EBFT blocks)."""
    return configured(stage, spec).submit(stage=stage, spec=spec,
                                          store_location=store.location, inputs=inputs)


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

    def __init__(self, store: Store) -> None:
        self.store = store
        self.states: dict[str, str] = {}
        self.seconds: dict[str, float] = {}
        self.usage: dict[str, dict] = {}

    def run(self, name: str, start_stage: Callable[[], State]):
        """Run one stage (``start_stage`` returns its state); returns its result."""
        started = time.monotonic()
        state = start_stage()
        self.record(name, [state], time.monotonic() - started)
        return here(self.store, state.result())

    def record(self, name: str, states: list[State], seconds: float) -> None:
        """One stage made of several tasks (EBFT's blocks) counts as their sum."""
        counts = Counter(state.name for state in states)
        self.states[name] = states[0].name if len(states) == 1 else \
            ", ".join(f"{n} {state}" for state, n in counts.items())
        self.seconds[name] = round(seconds, 1)
        self.usage[name] = sum((usage_of(s) for s in states), Usage()).to_dict()
