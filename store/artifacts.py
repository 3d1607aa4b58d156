"""A folder of artifacts, each named by the content key of what produced it.

Layout: ``<root>/<kind>/<key>/`` holding the artifact's files plus ``DIGEST`` (a digest of
the files, written last). An artifact without ``DIGEST`` is incomplete and is never used.
Writes go to a temporary sibling folder that is renamed into place, so a crash leaves
nothing half-written under the final name.

A store may also be a URL (``s3://bucket/prefix``, any fsspec filesystem: ``store.remote``).
Then the folder is this machine's read-through copy of it (``EBFT_STORE_CACHE``, default
``~/.cache/ebft/stores/<digest of the URL>``): an artifact is published to the remote
first (manifest last, first publisher wins), and an artifact found only on the remote is
downloaded, checked against its manifest, and used from the local copy. Locks live on the
remote (``store.locks.ObjectLock``), so runs on several machines compute each artifact once.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import socket
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from store.hashing import digest_json, digest_path
from store.locks import ObjectLock, StageLock, owned_by_a_gone_process, owner_note
from store.remote import Remote, is_url

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


def cache_folder(url: str) -> Path:
    """This machine's read-through copy of a remote store."""
    base = os.environ.get("EBFT_STORE_CACHE") or Path.home() / ".cache" / "ebft" / "stores"
    return Path(base).expanduser().resolve() / digest_json(url.rstrip("/"))[:16]


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
    def __init__(self, location: str | os.PathLike) -> None:
        self.location = str(location)  # what --store said: a folder, or a URL
        self.remote = Remote(self.location) if is_url(self.location) else None
        self.root = cache_folder(self.location) if self.remote else \
            Path(location).expanduser().resolve()

    def path(self, kind: str, key: str) -> Path:
        return self.root / kind / key

    def lock(self, kind: str, key: str) -> StageLock | ObjectLock:
        """The leased lock that makes concurrent runs compute this artifact once."""
        what = f"{kind}/{key[:16]}"
        if self.remote:
            return ObjectLock(self.remote, self.remote.path("locks", kind, f"{key}.lock"),
                              what=what)
        return StageLock(self.root / "locks" / kind / f"{key}.lock", what=what)

    def get(self, kind: str, key: str) -> Artifact | None:
        """The complete artifact under this key, or None (cheap: reads the stored digest;
        from a remote store, downloads it the first time)."""
        folder = self.path(kind, key)
        digest_file = folder / DIGEST_FILE
        if digest_file.is_file() and self.remote:
            self._reconcile(kind, key, digest_file.read_text().strip())
        if not digest_file.is_file() and not (self.remote and self._fetch(kind, key)):
            return None
        return Artifact(kind, key, str(folder), digest_file.read_text().strip())

    def _reconcile(self, kind: str, key: str, digest: str) -> None:
        """A local copy stands for the remote artifact only while the remote has it: if it
        was unpublished there, publish this copy again; if another copy replaced it, take
        that one (one small read per look-up)."""
        published = self.remote.digest(kind, key)
        if published == digest:
            return
        if published is None and self.verify(self.get_local(kind, key)):
            self.remote.upload(self.path(kind, key), kind, key)
            return
        self._delete_local(kind, key)

    def get_local(self, kind: str, key: str) -> Artifact:
        folder = self.path(kind, key)
        return Artifact(kind, key, str(folder), (folder / DIGEST_FILE).read_text().strip())

    def keys(self, kind: str) -> list[str]:
        """The keys of every complete artifact of one kind (of a remote store: published)."""
        if self.remote:
            return [key for k, key in self.remote.artifacts() if k == kind]
        return sorted(p.parent.name for p in self.root.glob(f"{kind}/*/{DIGEST_FILE}")
                      if not p.parent.name.startswith(TMP_PREFIX))

    def _fetch(self, kind: str, key: str) -> bool:
        """Download a published remote artifact into the local copy; False if there is none.
        What arrives must match its manifest, else it is unpublished (it will be recomputed)."""
        digest = self.remote.digest(kind, key)
        if digest is None:
            return False
        final = self.path(kind, key)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.parent / f"{TMP_PREFIX}{key}-{uuid.uuid4().hex[:8]}"
        try:
            self.remote.download(kind, key, tmp)
            if digest_path(tmp) != digest or \
                    (tmp / DIGEST_FILE).read_text().strip() != digest:
                logger.warning("%s/%s on %s does not match its manifest: unpublished, it will "
                               "be recomputed", kind, key, self.location)
                self.remote.delete(kind, key)
                return False
            (tmp / STAMP_FILE).write_text(stamps(tmp))
            with contextlib.suppress(OSError):  # another run of this machine got it first
                os.replace(tmp, final)
            return (final / DIGEST_FILE).is_file()
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

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
        if self.remote:  # the local copy is damaged: drop it, download it again
            logger.warning("%s/%s: the local copy does not match its digest: downloading it "
                           "again", kind, key)
            self._delete_local(kind, key)
            found = self.get(kind, key)
            if found is None or self.verify(found):
                return found
        logger.warning("%s/%s does not match its digest: deleted, it will be recomputed",
                       kind, key)
        self.delete(kind, key)
        return None

    def artifacts(self) -> Iterator[Artifact]:
        """Every complete artifact in the store (of a remote store: downloaded)."""
        if self.remote:
            for kind, key in self.remote.artifacts():
                found = self.get(kind, key)
                if found is not None:
                    yield found
            return
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
            if self.remote:  # the remote is the store; this folder is only its copy
                kept = self.remote.upload(tmp, kind, key, replace=replace)
                self._delete_local(kind, key)
                if kept:
                    os.replace(tmp, final)
                elif not self._fetch(kind, key):  # published first elsewhere: use theirs
                    raise OSError(f"{kind}/{key} was published by another run meanwhile but "
                                  f"cannot be read back from {self.location}; rerun")
                self._log_published(kind, key, kept=kept)
            elif replace:  # a document of the latest run (report, tables): the new one wins
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
        event = {"kind": kind, "key": key, "time": time.time(), "pid": os.getpid(),
                 "host": socket.gethostname(), "kept": kept}
        if self.remote:
            self.remote.log(event)
            return
        line = json.dumps(event)
        with open(self.root / PUBLISHED_LOG, "a") as f:
            f.write(line + "\n")

    def published(self) -> list[dict]:
        if self.remote:
            return sorted(self.remote.published(), key=lambda e: e["time"])
        path = self.root / PUBLISHED_LOG
        return [json.loads(line) for line in path.read_text().splitlines()] \
            if path.exists() else []

    def delete(self, kind: str, key: str) -> None:
        """Remove an artifact (from the remote too): renamed away first, so it is never
        seen half-deleted."""
        if self.remote:
            self.remote.delete(kind, key)
        self._delete_local(kind, key)

    def _delete_local(self, kind: str, key: str) -> None:
        final = self.path(kind, key)
        if final.exists():
            doomed = final.parent / f"{TMP_PREFIX}deleting-{key}-{uuid.uuid4().hex[:8]}"
            os.replace(final, doomed)
            shutil.rmtree(doomed, ignore_errors=True)


def write_json(folder: Path, name: str, obj: object) -> None:
    """A JSON file of an artifact, in a stable form (sorted keys, so equal content hashes equal)."""
    (folder / name).write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
