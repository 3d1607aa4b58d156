"""Where a stage's time and memory go: I/O seconds, bytes moved, peak memory.

``io_time()`` wraps the reads and writes of activations and the loading of weights, adding
their wall time to a per-process counter; ``measure()`` takes those counters, the
process's byte counts (``/proc/self/io``: every read and write call, page cache included)
and its peak RSS (reset before the stage through ``/proc/self/clear_refs``) around one
stage. Per process: stages running at once in one process (a thread-parallel sweep) share
the counters, so their split is approximate there. The byte counts are read()/write() calls
(a Prefect API call counts; memory-mapped safetensors reads do not).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

CACHE_NEUTRAL = "measurements of time and memory"

_lock = threading.Lock()
_io_seconds = [0.0]


@contextlib.contextmanager
def io_time() -> Iterator[None]:
    """Count the enclosed block's wall time as load/I-O time."""
    start = time.monotonic()
    try:
        yield
    finally:
        with _lock:
            _io_seconds[0] += time.monotonic() - start


@dataclass
class Usage:
    seconds: float = 0.0  # wall time of the stage body
    io_seconds: float = 0.0  # of which loading weights and reading/writing activations
    read_bytes: int = 0
    written_bytes: int = 0
    peak_rss_bytes: int = 0  # peak resident memory of the process during the stage
    peak_device_bytes: int = 0  # CUDA: peak allocated on the device during the stage

    @property
    def compute_seconds(self) -> float:
        return max(0.0, self.seconds - self.io_seconds)

    def to_dict(self) -> dict:
        return {**asdict(self), "compute_seconds": round(self.compute_seconds, 3)}

    def __add__(self, other: Usage) -> Usage:
        return Usage(self.seconds + other.seconds, self.io_seconds + other.io_seconds,
                     self.read_bytes + other.read_bytes,
                     self.written_bytes + other.written_bytes,
                     max(self.peak_rss_bytes, other.peak_rss_bytes),
                     max(self.peak_device_bytes, other.peak_device_bytes))


def _proc_io() -> tuple[int, int]:
    try:
        fields = dict(line.split(": ") for line in
                      Path("/proc/self/io").read_text().splitlines())
        return int(fields["rchar"]), int(fields["wchar"])
    except (OSError, KeyError, ValueError):
        return 0, 0


def proc_bytes(path: str, field: str) -> int | None:
    """A ``Field:  N kB`` line of a /proc file (meminfo, status), in bytes; None if absent."""
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _peak_rss() -> int:
    return proc_bytes("/proc/self/status", "VmHWM") or 0


def _reset_peak_rss() -> None:
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


@contextlib.contextmanager
def measure() -> Iterator[Usage]:
    """Measure the enclosed stage; the yielded Usage is filled in when the block ends."""
    import torch

    usage = Usage()
    cuda = torch.cuda.is_initialized()  # never start CUDA just to measure (CPU runs)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    _reset_peak_rss()
    read0, written0 = _proc_io()
    io0, start = _io_seconds[0], time.monotonic()
    try:
        yield usage
    finally:
        read1, written1 = _proc_io()
        usage.seconds = round(time.monotonic() - start, 3)
        usage.io_seconds = round(min(_io_seconds[0] - io0, usage.seconds), 3)
        usage.read_bytes, usage.written_bytes = read1 - read0, written1 - written0
        usage.peak_rss_bytes = _peak_rss()
        usage.peak_device_bytes = torch.cuda.max_memory_allocated() if cuda else 0  # current
        # device: the one the run's stages use
