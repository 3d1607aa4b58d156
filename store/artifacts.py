"""A folder of artifacts, each named by the content key of what produced it.

Layout: ``<root>/<kind>/<key>/`` holding the artifact's files plus ``DIGEST`` (a digest of
the files, written last). An artifact without ``DIGEST`` is incomplete and is never used.
Writes go to a temporary sibling folder that is renamed into place, so a crash leaves
nothing half-written under the final name.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from store.hashing import digest_path

DIGEST_FILE = "DIGEST"


@dataclass(frozen=True)
class Artifact:
    """What stages pass to each other: where an artifact lives and what identifies it."""

    kind: str
    key: str
    path: str
    digest: str

    def to_dict(self) -> dict:
        return asdict(self)


class Store:
    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root).expanduser().resolve()

    def path(self, kind: str, key: str) -> Path:
        return self.root / kind / key

    def get(self, kind: str, key: str) -> Artifact | None:
        """The complete artifact under this key, or None (cheap: reads the stored digest)."""
        folder = self.path(kind, key)
        digest_file = folder / DIGEST_FILE
        if not digest_file.is_file():
            return None
        return Artifact(kind, key, str(folder), digest_file.read_text().strip())

    def verify(self, artifact: Artifact) -> bool:
        """Recompute the digest of the files and compare with the stored one."""
        return digest_path(Path(artifact.path)) == artifact.digest

    @contextlib.contextmanager
    def writing(self, kind: str, key: str) -> Iterator[Path]:
        """Yield a temporary folder; on success it becomes the artifact, on error it is removed."""
        final = self.path(kind, key)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.parent / f".tmp-{key}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            yield tmp
            (tmp / DIGEST_FILE).write_text(digest_path(tmp) + "\n")
            if final.exists():  # an incomplete leftover, or a corrupted artifact being replaced
                shutil.rmtree(final)
            os.replace(tmp, final)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

    def delete(self, kind: str, key: str) -> None:
        """Remove an artifact: renamed away first, so it is never seen half-deleted."""
        final = self.path(kind, key)
        if final.exists():
            doomed = final.parent / f".tmp-deleting-{key}-{uuid.uuid4().hex[:8]}"
            os.replace(final, doomed)
            shutil.rmtree(doomed, ignore_errors=True)

    def write_json(self, folder: Path, name: str, obj: object) -> None:
        (folder / name).write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")

    def size_bytes(self, kind: str | None = None) -> int:
        base = self.root / kind if kind else self.root
        return sum(p.stat().st_size for p in base.rglob("*") if p.is_file())
