"""What one EBFT block task hands to the next one in the same process.

Block l+1 trains on block l's outputs. Writing them to the store and reading them back is
the disk on the critical path (on a GPU most of the stage's time; a Llama-2-7B at paper
settings writes 2 GB per block). So block l's task keeps its outputs here, under the key of
its spec (a digest of everything they depend on), and block l+1's task takes them from
memory when the key matches; the store's copy is written in the background, only so that a
killed run can resume. Where the tensors come from never changes a value (both are the same
16-bit numbers), and a task in another process, or after a restart, reads the store.

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
        self._kept: tuple[str, torch.Tensor] | None = None  # one boundary: the newest
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="ebft-boundary-writer")
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="ebft-target-reader")
        self._writes: list[Future] = []
        self._reads: dict[str, Future] = {}

    def keep(self, key: str, outputs: torch.Tensor) -> None:
        """Block outputs under their block's key, replacing the previous ones."""
        with self._lock:
            self._kept = (key, outputs)

    def take(self, key: str) -> torch.Tensor | None:
        """The outputs kept under ``key``, or None (then read them from the store)."""
        with self._lock:
            return self._kept[1] if self._kept and self._kept[0] == key else None

    def write_later(self, write: Callable[[], None], what: str) -> None:
        """Run ``write`` on the background writer (writes happen in submission order). A
        failure is logged, not raised: a boundary in the store is only a resume point."""
        def guarded() -> None:
            try:
                write()
            except Exception as err:  # noqa: BLE001 - reported, and the run's values stand
                logging.getLogger("ebft").warning("writing %s failed (%s); a run killed "
                                                  "now resumes from an earlier block", what, err)
        with self._lock:
            self._writes = [f for f in self._writes if not f.done()]
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

    def clear(self) -> None:
        self.flush()
        with self._lock:
            self._kept, reads, self._reads = None, self._reads, {}
        for future in reads.values():
            future.cancel()


HANDOVER = Handover()
