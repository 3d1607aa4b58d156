"""What a stage is, and the one way every stage is cached.

A stage is a step of the pipeline whose output is an artifact in the store:

- its **spec** (a frozen dataclass, subclass of ``Spec``) holds everything that decides
  the output: the content digests of its inputs and its parameters. The artifact's key is
  the digest of those fields and of the code the stage runs (``store.hashing.code_version``:
  the module that defines the spec and every project module it imports, transitively);
- its **build** writes the artifact's files into a fresh folder, ``build(spec, out,
  **inputs)``; ``inputs`` say where to read things (paths, devices), never what to compute;
- ``produce`` runs it at most once per key: look up and verify the stored artifact, else
  take the key's leased lock, look again (another run may just have published it), and
  only then build. The folder is published atomically when ``build`` returns.

``flows.caching`` wraps ``produce`` in a Prefect task: states, timings and resource use.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from contextlib import AbstractContextManager as ContextManager
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, ClassVar

from store import Artifact, Store, code_version, digest_json

CACHE_NEUTRAL = "the caching of stages, not what they compute"


class Spec:
    """Base of the stage specs (frozen dataclasses): the key rule in one place."""

    not_in_key: ClassVar[tuple[str, ...]] = ()  # fields that change how, not what (batching)

    def key_fields(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k not in self.not_in_key}

    def code_modules(self) -> list[ModuleType]:
        """Where the stage's code starts: the module that defines the spec and its build."""
        return [sys.modules[type(self).__module__]]

    def key(self) -> str:
        return digest_json({**self.key_fields(), "code": code_version(*self.code_modules())})[:32]


def artifact(found: Artifact) -> Artifact:
    return found


def result_json(found: Artifact) -> dict:
    """The ``result.json`` of a result artifact (perplexity, zero-shot)."""
    return json.loads((Path(found.path) / "result.json").read_text())


@dataclass(frozen=True)
class Stage:
    """A stage: the store folder it fills, how to build it, what a flow gets back."""

    kind: str  # artifacts live in <store>/<kind>/<key>
    build: Callable[..., None]  # build(spec, out, **inputs): write the files into ``out``
    result: Callable[[Artifact], Any] = artifact  # the artifact, or the JSON it holds

    def run_name(self, spec: Spec) -> str:
        index = getattr(spec, "index", None)  # EBFT's blocks: one task per block
        return self.kind if index is None else f"{self.kind}-{index}"


def produce(stage: Stage, spec: Spec, store: Store, inputs: dict,
            meter: Callable[[], ContextManager] = nullcontext) -> tuple[Any, bool, Any]:
    """The stage's result, built only if no verified artifact has its key.

    Returns (result, whether this call built it, what ``meter`` measured: the look-up, or
    the build when there was one; a wait for another run's lock is not counted).
    """
    key = spec.key()
    with meter() as measured:
        found = store.checked(stage.kind, key)
    built = False
    if found is None:
        with store.lock(stage.kind, key):
            found = store.checked(stage.kind, key)  # published while we waited?
            if found is None:
                with meter() as measured, store.writing(stage.kind, key) as out:
                    stage.build(spec, out, **inputs)
                found, built = store.get(stage.kind, key), True
    return stage.result(found), built, measured
