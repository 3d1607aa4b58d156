"""Content-addressed artifact store: hashing, atomic writes, Zarr activation I/O."""

from store.artifacts import Artifact, Store
from store.hashing import code_version, digest_json, digest_path

__all__ = ["Artifact", "Store", "code_version", "digest_json", "digest_path"]
