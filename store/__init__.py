"""Content-addressed artifact store: hashing, atomic writes, Zarr activation I/O."""

from store.artifacts import Artifact, Store, StoreFull, write_json
from store.hashing import code_version, digest_json, digest_path
from store.remote import StoreLocationError

__all__ = ["Artifact", "Store", "StoreFull", "StoreLocationError", "code_version", "digest_json",
           "digest_path", "write_json"]
