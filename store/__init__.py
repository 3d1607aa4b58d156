"""Content-addressed artifact store: hashing, atomic writes, Zarr activation I/O."""

from store.artifacts import Artifact, Store, StoreFull
from store.hashing import code_version, digest_json, digest_path

__all__ = ["Artifact", "Store", "StoreFull", "code_version", "digest_json", "digest_path"]
