"""A store on object storage (``s3://``, ``gs://``, ``az://``, ``file://``, ``memory://``).

The store's layout is the same as a local one: ``<url>/<kind>/<key>/`` holding the
artifact's files and ``DIGEST``. Object stores have no rename, so an artifact is published
by uploading every file under its key and then ``DIGEST`` last, created only if absent
(S3's ``If-None-Match: *``): the first publisher wins, and a reader trusts only a key whose
``DIGEST`` exists and matches what it downloaded. Stages never read the remote directly:
``store.Store`` keeps a local read-through copy of every artifact it uses, so a block reads
its activations at disk speed.

Endpoint and credentials come from the filesystem's usual places (for S3: the
``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY`` … variables or
``~/.aws``), nothing project-specific.
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
import uuid
from pathlib import Path

CACHE_NEUTRAL = "where artifacts are stored, not what they hold"

URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
DIGEST_FILE, STAMP_FILE = "DIGEST", "STAMP"


def is_url(location: str) -> bool:
    return bool(URL.match(str(location)))


class StoreLocationError(ValueError):
    """A --store value that cannot be used: one line naming the problem and the fix."""


class Remote:
    """The object-storage side of a store: listing, upload, download, conditional writes."""

    def __init__(self, url: str) -> None:
        import fsspec

        self.url = url.rstrip("/")
        protocol = self.url.split("://", 1)[0]
        try:
            self.fs, self.base = fsspec.core.url_to_fs(self.url, **storage_options(protocol))
        except (ImportError, ValueError) as err:
            raise StoreLocationError(f"--store {url}: {describe(err)}") from err
        self.base = self.base.rstrip("/")
        self.s3 = protocol in ("s3", "s3a")
        if self.s3:
            check_conditional_writes()

    def path(self, *parts: str) -> str:
        return "/".join([self.base, *parts])

    # ---- artifacts ---------------------------------------------------------------------------
    def digest(self, kind: str, key: str) -> str | None:
        """The published digest of an artifact, or None while it is not (fully) published."""
        try:
            return self.fs.cat_file(self.path(kind, key, DIGEST_FILE)).decode().strip()
        except FileNotFoundError:
            return None

    def download(self, kind: str, key: str, dest: Path) -> None:
        """Every file under the artifact's key into ``dest`` (which must not exist)."""
        prefix = self.path(kind, key)
        files = [f for f in self.fs.find(prefix) if not f.endswith(f"/{STAMP_FILE}")]
        dest.mkdir(parents=True)
        for remote in files:
            local = dest / remote[len(prefix) + 1:]
            local.parent.mkdir(parents=True, exist_ok=True)
            self.fs.get_file(remote, str(local))

    def upload(self, folder: Path, kind: str, key: str, replace: bool = False) -> bool:
        """Publish a finished local artifact folder; returns False when another writer
        published this key first (theirs stays: content-keyed artifacts are immutable).
        ``replace``: a document of the latest run (a report), which replaces the old one."""
        prefix = self.path(kind, key)
        if replace:
            self.delete(kind, key)
        elif self.digest(kind, key) is not None:
            return False
        elif self.fs.exists(prefix):  # files of an upload that died before its DIGEST
            self.fs.rm(prefix, recursive=True)
        for file in sorted(p for p in folder.rglob("*") if p.is_file()):
            name = file.relative_to(folder).as_posix()
            if name not in (DIGEST_FILE, STAMP_FILE):
                self.fs.put_file(str(file), f"{prefix}/{name}")
        digest = (folder / DIGEST_FILE).read_bytes()
        if replace:
            self.fs.pipe_file(f"{prefix}/{DIGEST_FILE}", digest)
            return True
        try:  # the manifest last, only if absent: the first publisher wins
            self.fs.pipe_file(f"{prefix}/{DIGEST_FILE}", digest, mode="create")
        except FileExistsError:
            return False
        return True

    def delete(self, kind: str, key: str) -> None:
        """Unpublish (the manifest first, so no reader trusts a half-deleted artifact)."""
        prefix = self.path(kind, key)
        try:
            self.fs.rm_file(f"{prefix}/{DIGEST_FILE}")
        except FileNotFoundError:
            pass
        if self.fs.exists(prefix):
            self.fs.rm(prefix, recursive=True)

    def artifacts(self) -> list[tuple[str, str]]:
        """(kind, key) of every published artifact."""
        found = []
        for path in self.fs.glob(self.path("*", "*", DIGEST_FILE)):
            kind, key = path.rstrip("/").split("/")[-3:-1]
            if kind not in ("locks", "published"):
                found.append((kind, key))
        return sorted(found)

    # ---- the audit trail: one object per event (objects cannot be appended to) -------------
    def log(self, event: dict) -> None:
        name = f"{time.time():.6f}-{uuid.uuid4().hex[:8]}.json"
        self.fs.pipe_file(self.path("published", name), json.dumps(event).encode())

    def published(self) -> list[dict]:
        paths = sorted(self.fs.glob(self.path("published", "*.json")))
        return [json.loads(self.fs.cat_file(p)) for p in paths]

    # ---- conditional writes, for locks --------------------------------------------------------
    def read(self, path: str) -> tuple[dict, str, float] | None:
        """(JSON note, version tag, seconds since it was written) of an object, or None."""
        try:
            info = self.fs.info(path)
            data = self.fs.cat_file(path)
        except FileNotFoundError:
            return None
        try:
            note = json.loads(data)
        except ValueError:
            note = {}
        return (note if isinstance(note, dict) else {}), version_of(info), age_of(info)

    def create(self, path: str, note: dict) -> str | None:
        """Write ``note`` only if nothing is at ``path``; its version tag, or None."""
        try:
            self.fs.pipe_file(path, json.dumps(note).encode(), mode="create")
        except FileExistsError:
            return None
        except OSError as err:
            if conflicting(err):  # another conditional write at the same moment (S3's 409)
                return None
            raise
        found = self.read(path)
        return found[1] if found and found[0].get("token") == note.get("token") else None

    def replace(self, path: str, note: dict, version: str) -> str | None:
        """Overwrite ``path`` only if it is still at ``version``; the new tag, or None.
        Atomic on S3 (If-Match); elsewhere a read-then-write (correctness never depends on
        a lock: at worst two runs do the same work)."""
        body = json.dumps(note).encode()
        if self.s3:
            bucket, key, _ = self.fs.split_path(path)
            try:
                return self.fs.call_s3("put_object", Bucket=bucket, Key=key, Body=body,
                                       IfMatch=version)["ETag"]
            except FileNotFoundError:
                return None
            except OSError as err:
                if precondition_failed(err) or conflicting(err):
                    return None
                raise  # a passing failure (503, timeout): the caller retries
        found = self.read(path)
        if found is None or found[1] != version:
            return None
        self.fs.pipe_file(path, body)
        found = self.read(path)
        return found[1] if found else None

    def remove(self, path: str, version: str) -> bool:
        """Delete ``path`` only if it is still at ``version`` (atomic on S3)."""
        if self.s3:
            bucket, key, _ = self.fs.split_path(path)
            try:
                self.fs.call_s3("delete_object", Bucket=bucket, Key=key, IfMatch=version)
            except FileNotFoundError:
                return False
            except OSError as err:
                if precondition_failed(err) or conflicting(err):
                    return False
                raise
            self.fs.invalidate_cache(path)
            return True
        found = self.read(path)
        if found is None or found[1] != version:
            return False
        self.fs.rm_file(path)
        return True

    # ---- before any stage runs ---------------------------------------------------------------
    def check(self) -> None:
        """Write, read back and delete a probe object: a bad URL, missing credentials, an
        unreachable endpoint or a missing bucket is one clear line, before anything runs."""
        probe = self.path(".probe", f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex}")
        try:
            self.fs.pipe_file(probe, b"ebft")
            if self.fs.cat_file(probe) != b"ebft":
                raise StoreLocationError("what was written there reads back differently")
            self.fs.rm_file(probe)
        except StoreLocationError as err:
            raise StoreLocationError(f"--store {self.url}: {err}") from err
        except Exception as err:
            raise StoreLocationError(f"--store {self.url}: {describe(err)}") from err


def precondition_failed(err: OSError) -> bool:
    """S3's 412: the object is not at the version the condition named."""
    text = f"{err} {err.__cause__!r}"
    return "pre-condition" in text or "PreconditionFailed" in text


def conflicting(err: OSError) -> bool:
    """S3's 409 ConditionalRequestConflict: two conditional writes at once; try again."""
    return "ConditionalRequestConflict" in f"{err} {err.__cause__!r}"


def check_conditional_writes() -> None:
    """s3fs passes only the parameters the installed botocore knows, so with an old botocore
    If-Match and If-None-Match would be dropped silently and every write would win."""
    import botocore.session

    model = botocore.session.get_session().get_service_model("s3")
    needed = [("PutObject", "IfNoneMatch"), ("PutObject", "IfMatch"), ("DeleteObject", "IfMatch")]
    missing = [f"{op}.{name}" for op, name in needed
               if name not in model.operation_model(op).input_shape.members]
    if missing:
        import botocore

        raise StoreLocationError(f"botocore {botocore.__version__} has no conditional writes "
                                 f"({', '.join(missing)}), which the store's publication and "
                                 "locks need: upgrade boto3/botocore (and s3fs)")


def storage_options(protocol: str) -> dict:
    """Short timeouts and few retries for S3, so an unreachable endpoint fails in seconds,
    not after minutes of back-off. Everything else comes from the usual places."""
    if protocol in ("s3", "s3a"):
        # (a new client each time: fsspec's instance cache would keep the endpoint and
        # credentials of the first one made in this process)
        return {"config_kwargs": {"connect_timeout": 5, "read_timeout": 120,
                                  "retries": {"max_attempts": 3}},
                "skip_instance_cache": True}
    if protocol in ("file", "local"):
        return {"auto_mkdir": True}  # as an object store: a key's "folders" need no creating
    return {}


def version_of(info: dict) -> str:
    """What changes whenever an object is rewritten: S3's ETag, else size and mtime."""
    for name in ("ETag", "etag", "generation", "version_id"):
        if info.get(name):
            return str(info[name])
    return f"{info.get('size')}-{info.get('mtime') or info.get('created') or ''}"


def age_of(info: dict) -> float:
    stamp = info.get("LastModified") or info.get("mtime") or info.get("created")
    if stamp is None:
        return 0.0
    seconds = stamp.timestamp() if hasattr(stamp, "timestamp") else float(stamp)
    return max(0.0, time.time() - seconds)


def describe(err: BaseException) -> str:
    """An exception of any storage backend as what a user does about it."""
    text = f"{type(err).__name__}: {err}".strip()
    name = type(err).__name__
    if isinstance(err, ImportError):
        return f"{err}; install the filesystem's package (s3fs for s3://, gcsfs for gs://, " \
               "adlfs for az://)"
    if "Protocol not known" in str(err) or "Protocol not known" in text:
        return f"{err}: not a storage URL fsspec knows; use a folder path or s3://, gs://, " \
               "az://, file://"
    if name in ("NoCredentialsError", "PartialCredentialsError") or \
            "Unable to locate credentials" in text:
        return "no credentials found; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or a " \
               "profile in ~/.aws)"
    if "NoSuchBucket" in text or (isinstance(err, FileNotFoundError)):
        return f"the bucket does not exist ({err}); create it first"
    if isinstance(err, PermissionError) or "AccessDenied" in text or "InvalidAccessKeyId" \
            in text or "SignatureDoesNotMatch" in text:
        return f"access denied ({err}); check the credentials and the bucket's permissions"
    if "Could not connect" in text or "EndpointConnectionError" in text or \
            "ConnectTimeout" in text or isinstance(err, ConnectionError):
        return f"cannot reach the endpoint ({err}); check AWS_ENDPOINT_URL and the network"
    return text
