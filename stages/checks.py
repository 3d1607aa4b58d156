"""Checks of everything a run depends on, made before its first stage.

Each raises a one-line ``UserError`` naming what is wrong and how to fix it, so bad input
never costs minutes of compute, never ends in a raw traceback, and writes nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

from stages.errors import UserError

CACHE_NEUTRAL = "checks made before any stage runs; they compute nothing stored"

# Decoder families whose blocks the stages are tested on (tiny models of each in tests/):
# one ModuleList of identical blocks, nn.Linear projections, a causal mask built by the model.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


def positive(flag: str, value: float | None, allow_zero: bool = False) -> None:
    if value is None:
        return
    if value < 0 or (value == 0 and not allow_zero):
        raise UserError(f"{flag} {value}: must be {'>= 0' if allow_zero else 'positive'}")


# ---- the model ----------------------------------------------------------------------------

def model_config(folder: Path) -> dict:
    """config.json of a model folder, checked to be a supported causal decoder."""
    path = Path(folder) / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise UserError(f"{path} is not a readable JSON config ({type(err).__name__}); "
                        "restore the model's config.json") from err
    check_model_type(config, str(folder))
    return config


def check_model_type(config: dict, where: str) -> None:
    model_type = config.get("model_type")
    if config.get("auto_map"):
        raise UserError(f"model {where} needs its own remote code (auto_map in config.json), "
                        "which ebft never runs; use a model transformers supports natively")
    if config.get("is_encoder_decoder") or model_type not in SUPPORTED_MODEL_TYPES:
        raise UserError(f"model {where}: model_type {model_type!r} is not supported; ebft "
                        "prunes decoder-only causal LMs of the Llama family "
                        f"({', '.join(SUPPORTED_MODEL_TYPES)})")


def check_blocks(model) -> None:
    """The structure the stages need: decoder blocks, each with prunable linear layers."""
    import stages.model.architecture as arch

    blocks = arch.decoder_blocks(model)
    if not arch.linear_layers(blocks[0]):
        raise UserError(f"{type(model).__name__}'s blocks have no nn.Linear layers to prune")


def gguf_metadata(path: Path, wanted: set[str]) -> dict:
    """Scalar key/values from a GGUF header, read without loading tensors (milliseconds;
    the gguf package's reader takes ~5 s on the default model)."""
    scalars = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q",
               11: "q", 12: "d"}
    found: dict = {}
    with open(path, "rb") as f:
        def read(fmt: str):
            return struct.unpack("<" + fmt, f.read(struct.calcsize(fmt)))[0]

        def string() -> str:
            return f.read(read("Q")).decode("utf-8", "replace")

        def value(kind: int):
            if kind in scalars:
                return read(scalars[kind])
            if kind == 8:
                return string()
            if kind == 9:
                item, count = read("I"), read("Q")
                for _ in range(count):
                    value(item)
                return None
            raise UserError(f"{path}: unknown GGUF value type {kind}; reinstall the package")

        if f.read(4) != b"GGUF":
            raise UserError(f"{path} is not a GGUF file; reinstall the package")
        read("I")
        read("Q")
        for _ in range(read("Q")):
            key = string()
            got = value(read("I"))
            if key in wanted:
                found[key] = got
                if len(found) == len(wanted):
                    break
    return found


# ---- data -----------------------------------------------------------------------------------

def text_file(path: Path, what: str) -> str:
    """A UTF-8 text file with at least one non-empty line."""
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as err:
        raise UserError(f"{path} ({what}) cannot be read: {err.strerror}") from err
    except UnicodeDecodeError as err:
        raise UserError(f"{path} ({what}) is not UTF-8 text (byte {err.start}); replace it "
                        "with the original file") from err
    if not text.strip():
        raise UserError(f"{path} ({what}) is empty; replace it with the original file")
    return text


# ---- where the run writes, and what it needs ---------------------------------------------

def nearest_existing(path: Path) -> Path:
    """The path itself, or its closest ancestor that exists (where it would be created)."""
    while not path.exists():
        path = path.parent
    return path


def store_location(root: Path) -> None:
    """The store is a folder we can create and write in."""
    if root.exists() and not root.is_dir():
        raise UserError(f"--store {root} is a file; pass a folder (it is created if missing)")
    existing = nearest_existing(root)
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"--store {root}: {existing} is not writable; pass a folder you can "
                        "write to")


def resources(root: Path, disk_bytes: int, memory_bytes: int) -> None:
    """Refuse a run that cannot fit the store's free disk or the free memory."""
    existing = nearest_existing(root)
    free_disk = shutil.disk_usage(existing).free
    if disk_bytes > free_disk:
        raise UserError(f"this run needs about {gib(disk_bytes)} in the store and "
                        f"{existing} has {gib(free_disk)} free; lower --nsamples or --seqlen, "
                        "or pass --store on a larger disk")
    free_memory = available_memory()
    if memory_bytes > free_memory:
        raise UserError(f"this run needs about {gib(memory_bytes)} of memory and "
                        f"{gib(free_memory)} is available; lower --nsamples, --seqlen or "
                        "--batch-size")


def available_memory() -> int:
    from store.usage import proc_bytes

    available = proc_bytes("/proc/meminfo", "MemAvailable")
    return available if available is not None else \
        os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"
