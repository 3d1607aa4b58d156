"""Progress of long loops: a terminal line and a log record every few seconds."""

from __future__ import annotations

import logging
import sys
import time

CACHE_NEUTRAL = "progress messages only"


def logger() -> logging.Logger:
    try:  # inside a Prefect run the message also reaches the Prefect UI
        from prefect.logging import get_run_logger

        return get_run_logger()
    except Exception:  # noqa: BLE001 - outside a run any failure means: plain logging
        return logging.getLogger("ebft")


class Progress:
    def __init__(self, label: str, total: int, every_s: float = 5.0) -> None:
        self.label, self.total, self.every_s = label, total, every_s
        self.start = self.last = time.monotonic()
        self.log = logger()

    def update(self, done: int, extra: str = "") -> None:
        now = time.monotonic()
        if now - self.last < self.every_s and done < self.total:
            return
        self.last = now
        elapsed = now - self.start
        eta = elapsed / max(done, 1) * (self.total - done)
        msg = f"{self.label}: {done}/{self.total} {extra} [{elapsed:.0f}s, eta {eta:.0f}s]"
        if sys.stderr.isatty():
            print("\r" + msg, end="\n" if done >= self.total else "", file=sys.stderr, flush=True)
        self.log.info(msg)
