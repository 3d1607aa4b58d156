"""What one EBFT block task hands to the next one in the same process.

Block l+1 trains on block l's outputs. Writing them to the store and reading them back is
the disk on the critical path (on a GPU most of the stage's time; a Llama-2-7B at paper
settings writes 2 GB per block). So block l's task keeps its outputs here, in its chain's
slot (one per configuration: a sweep may run several in one process) under the key of its
spec (a digest of everything they depend on), and block l+1's task takes them from memory
when the key matches; the store's copy is written in the background, only so that a killed
run can resume, one write at a time (each holds a boundary). Where the tensors come from
never changes a value (both are the same 16-bit numbers), and a task in another process, or
after a restart, reads the store.

Also here: the dense target of the next block, read from the capture in the background
while this block trains.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import torch

CACHE_NEUTRAL = "where a block's inputs are read from (memory or the store) changes no value"


class Handover:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._kept: dict[str, tuple[str, torch.Tensor]] = {}  # chain -> its newest boundary
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="ebft-boundary-writer")
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="ebft-target-reader")
        self._writes: list[Future] = []
        self._reads: dict[str, Future] = {}

    def keep(self, chain: str, key: str, outputs: torch.Tensor) -> None:
        """Block outputs under their block's key, replacing the chain's previous ones."""
        with self._lock:
            self._kept[chain] = (key, outputs)

    def take(self, chain: str, key: str) -> torch.Tensor | None:
        """The outputs kept under ``key``, or None (then read them from the store)."""
        with self._lock:
            kept = self._kept.get(chain)
            return kept[1] if kept and kept[0] == key else None

    def write_later(self, write: Callable[[], None], what: str) -> None:
        """Run ``write`` on the background writer (writes happen in submission order). A
        failure is logged, not raised: a boundary in the store is only a resume point."""
        def guarded() -> None:
            try:
                write()
            except Exception as err:  # noqa: BLE001 - reported, and the run's values stand
                logging.getLogger("ebft").warning("writing %s failed (%s); a run killed "
                                                  "now resumes from an earlier block", what, err)
        self.flush()  # at most one write pending: each holds a whole boundary
        with self._lock:
            self._writes.append(self._writer.submit(guarded))

    def flush(self) -> None:
        """Wait for every background write submitted so far."""
        with self._lock:
            pending, self._writes = self._writes, []
        for future in pending:
            future.result()

    def prefetch(self, key: str, read: Callable[[], torch.Tensor]) -> None:
        with self._lock:
            if key not in self._reads:
                self._reads[key] = self._reader.submit(read)

    def prefetched(self, key: str) -> torch.Tensor | None:
        """A prefetched tensor (waiting for its read to finish), or None if none was asked."""
        with self._lock:
            future = self._reads.pop(key, None)
        return future.result() if future is not None else None

    def clear(self, chain: str | None = None) -> None:
        """A chain is done (None: every chain): wait for the writes, free its boundary and
        its prefetches."""
        self.flush()
        with self._lock:
            for name in [chain] if chain else list(self._kept):
                self._kept.pop(name, None)
            reads = {k: self._reads.pop(k) for k in list(self._reads)
                     if chain is None or k.startswith(chain)}
        for future in reads.values():
            future.cancel()

    def stop(self) -> None:
        """On an interrupt: end both background threads after their current item. Ctrl-C can
        land while a worker thread is being started, before its executor registers it for
        the interpreter's exit; that thread would wait for work forever and the process
        would never exit. ``shutdown`` wakes it whatever state it is in."""
        for executor in (self._writer, self._reader):
            executor.shutdown(wait=False, cancel_futures=True)


HANDOVER = Handover()
