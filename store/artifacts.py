"""A folder of artifacts, each named by the content key of what produced it.

Layout: ``<root>/<kind>/<key>/`` holding the artifact's files plus ``DIGEST`` (a digest of
the files, written last). An artifact without ``DIGEST`` is incomplete and is never used.
Writes go to a temporary sibling folder that is renamed into place, so a crash leaves
nothing half-written under the final name.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import shutil
import socket
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from store.hashing import digest_path
from store.locks import StageLock, owned_by_a_gone_process, owner_note

CACHE_NEUTRAL = "where and how artifacts are written, not what they hold"

DIGEST_FILE, STAMP_FILE = "DIGEST", "STAMP"
TMP_PREFIX, OWNER_SUFFIX = ".tmp-", ".owner"
PUBLISHED_LOG = "published.jsonl"
logger = logging.getLogger(__name__)
NO_SPACE = {errno.ENOSPC, errno.EDQUOT}


def stamps(folder: Path) -> str:
    """(name, size, mtime, inode) of every file the digest covers, as one JSON text."""
    rows = []
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = f.relative_to(folder).as_posix()
        if rel not in (DIGEST_FILE, STAMP_FILE):
            st = f.stat()
            rows.append([rel, st.st_size, st.st_mtime_ns, st.st_ino])
    return json.dumps(rows)


class StoreFull(OSError):
    """The store's disk is full: said in one line, with the fix, and nothing left behind."""


class StoreLocationError(ValueError):
    """A --store value this store cannot open: said in one line, with the fix."""


def check_location(location: str) -> None:
    """Refuse URLs (``s3://…``): the store is a local (or mounted) folder for now, and a
    URL taken as a folder name would silently write a local folder named ``s3:``."""
    if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", str(location)):
        raise StoreLocationError(f"--store {location}: URL stores are not supported yet; pass "
                                 "a folder path (a shared or mounted filesystem works across "
                                 "machines)")


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
        check_location(str(root))
        self.root = Path(root).expanduser().resolve()

    def path(self, kind: str, key: str) -> Path:
        return self.root / kind / key

    def lock(self, kind: str, key: str) -> StageLock:
        """The leased lock that makes concurrent runs compute this artifact once."""
        return StageLock(self.root / "locks" / kind / f"{key}.lock", what=f"{kind}/{key[:16]}")

    def get(self, kind: str, key: str) -> Artifact | None:
        """The complete artifact under this key, or None (cheap: reads the stored digest)."""
        folder = self.path(kind, key)
        digest_file = folder / DIGEST_FILE
        if not digest_file.is_file():
            return None
        return Artifact(kind, key, str(folder), digest_file.read_text().strip())

    def verify(self, artifact: Artifact, full: bool = False) -> bool:
        """Whether the artifact's files still match its digest.

        Cheap by default: the files' stamps (size, mtime, inode) are compared with those
        recorded when the digest was last confirmed, and the files are hashed again only
        when a stamp differs (any write changes the mtime). ``full`` always re-hashes
        (``ebft verify``).
        """
        folder = Path(artifact.path)
        stamp_file = folder / STAMP_FILE
        now = stamps(folder)
        if not full and stamp_file.is_file() and stamp_file.read_text() == now:
            return True
        if digest_path(folder) != artifact.digest:
            return False
        with contextlib.suppress(OSError):  # a read-only store stays verifiable
            # written beside the artifact, never inside it: a stray temporary file inside
            # would change its digest
            tmp = folder.parent / f"{TMP_PREFIX}stamp-{folder.name}-{uuid.uuid4().hex[:8]}"
            try:
                tmp.write_text(now)
                os.replace(tmp, stamp_file)
            finally:
                tmp.unlink(missing_ok=True)
        return True

    def checked(self, kind: str, key: str) -> Artifact | None:
        """The artifact under this key if its files still match its digest, else None.

        A corrupted artifact (a truncated chunk, flipped bytes, a missing file) is deleted,
        so the stage that made it recomputes it: it is never silently used.
        """
        found = self.get(kind, key)
        if found is None or self.verify(found):
            return found
        logger.warning("%s/%s does not match its digest: deleted, it will be recomputed",
                       kind, key)
        self.delete(kind, key)
        return None

    def artifacts(self) -> Iterator[Artifact]:
        """Every complete artifact in the store."""
        for digest_file in sorted(self.root.glob(f"*/*/{DIGEST_FILE}")):
            if digest_file.parent.name.startswith(TMP_PREFIX):
                continue  # being written or deleted
            found = self.get(digest_file.parent.parent.name, digest_file.parent.name)
            if found is not None:
                yield found

    @contextlib.contextmanager
    def writing(self, kind: str, key: str, replace: bool = False) -> Iterator[Path]:
        """Yield a temporary folder; on success it becomes the artifact, on error it is removed.

        Content-keyed artifacts are immutable: if another process published the same key
        meanwhile, its copy stays and ours is dropped. ``replace=True`` is for documents
        that describe the latest run (run reports, sweep tables): the new one replaces the old.
        """
        final = self.path(kind, key)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.parent / f"{TMP_PREFIX}{key}-{uuid.uuid4().hex[:8]}"
        owner = tmp.with_name(tmp.name + OWNER_SUFFIX)  # who writes it, for remove_abandoned
        owner.write_text(json.dumps(owner_note()))
        tmp.mkdir()
        try:
            yield tmp
            (tmp / DIGEST_FILE).write_text(digest_path(tmp) + "\n")
            (tmp / STAMP_FILE).write_text(stamps(tmp))  # a rename keeps sizes, mtimes, inodes
            if replace:  # a document of the latest run (report, tables): the new one wins
                self.delete(kind, key)
                os.replace(tmp, final)
                self._log_published(kind, key)
            else:  # content-keyed: immutable, the first copy published stays
                self._publish_once(kind, key, tmp)
        except OSError as err:
            if err.errno not in NO_SPACE:
                raise
            raise StoreFull(err.errno, f"no space left on the device of the store {self.root} "
                            f"while writing {kind}/{key}: free space, or pass --store on a "
                            "larger disk") from err
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
            owner.unlink(missing_ok=True)

    def remove_abandoned(self) -> list[Path]:
        """Remove the temporary folders of writers that are gone (a killed run's half-written
        artifact: GBs for a capture at 7B) and the locks they left. Only folders whose writer
        ran on this host and no longer exists, folders of interrupted deletions, and locks
        whose holder is gone or whose lease ran out; returns what was removed."""
        removed = []
        for tmp in self.root.glob(f"*/{TMP_PREFIX}*"):
            if tmp.name.endswith(OWNER_SUFFIX) or not tmp.is_dir():
                continue
            owner_file = tmp.with_name(tmp.name + OWNER_SUFFIX)
            if not tmp.name.startswith(f"{TMP_PREFIX}deleting-"):
                try:
                    owner = json.loads(owner_file.read_text())
                except (OSError, ValueError):
                    continue  # no note: unknown writer, left alone
                if not owned_by_a_gone_process(owner):
                    continue
            shutil.rmtree(tmp, ignore_errors=True)
            owner_file.unlink(missing_ok=True)
            removed.append(tmp)
        for path in self.root.glob("locks/*/*.lock"):  # locks whose holder is gone
            lock = StageLock(path)
            owner = lock.read_owner()
            why = owner and lock.stale(owner)
            if why:
                lock.break_stale(owner, why)
                removed.append(path)
        if removed:
            logger.info("removed %d temporary folders and locks of runs that are gone",
                        len(removed))
        return removed

    def _publish_once(self, kind: str, key: str, tmp: Path) -> None:
        final = self.path(kind, key)
        if final.exists() and not (final / DIGEST_FILE).is_file():
            self.delete(kind, key)  # an incomplete leftover (never written by this code)
        try:
            os.replace(tmp, final)
            kept = True
        except OSError as err:  # published meanwhile: a rename never replaces a full folder
            if err.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            kept = False  # computed twice: the audit trail says so (concurrency tests read it)
        self._log_published(kind, key, kept=kept)

    def _log_published(self, kind: str, key: str, kept: bool = True) -> None:
        """One JSON line per published artifact (what was computed, when, by which process).

        Appends of one short line are atomic on local POSIX files, so concurrent runs can
        share the log; it is an audit trail, never read by the pipeline.
        """
        line = json.dumps({"kind": kind, "key": key, "time": time.time(), "pid": os.getpid(),
                           "host": socket.gethostname(), "kept": kept})
        with open(self.root / PUBLISHED_LOG, "a") as f:
            f.write(line + "\n")

    def published(self) -> list[dict]:
        path = self.root / PUBLISHED_LOG
        return [json.loads(line) for line in path.read_text().splitlines()] \
            if path.exists() else []

    def delete(self, kind: str, key: str) -> None:
        """Remove an artifact: renamed away first, so it is never seen half-deleted."""
        final = self.path(kind, key)
        if final.exists():
            doomed = final.parent / f"{TMP_PREFIX}deleting-{key}-{uuid.uuid4().hex[:8]}"
            os.replace(final, doomed)
            shutil.rmtree(doomed, ignore_errors=True)


def write_json(folder: Path, name: str, obj: object) -> None:
    """A JSON file of an artifact, in a stable form (sorted keys, so equal content hashes equal)."""
    (folder / name).write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
