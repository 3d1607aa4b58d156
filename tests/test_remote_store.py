"""A store at a URL: publication with a manifest, read-through copies, locks across
machines. Against a real local S3 endpoint (moto's server, started here) and fsspec's
``file://`` (the same code path without a server)."""

from __future__ import annotations

import json
import threading
import time

import pytest
from services import s3_server

from store import Store, StoreLocationError
from store.locks import ObjectLock


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    with s3_server(tmp_path_factory.mktemp("s3")) as env:
        yield env


@pytest.fixture(params=["s3", "file"])
def url(request, tmp_path, monkeypatch):
    """A fresh store URL; the S3 endpoint and credentials come from the AWS variables."""
    if request.param == "file":
        return f"file://{tmp_path / 'remote'}"
    env = request.getfixturevalue("s3")
    for name, value in env.items():
        if name.startswith("AWS_"):
            monkeypatch.setenv(name, value)
    return f"s3://{env['bucket']}/{request.node.name.replace('[', '-').rstrip(']')}"


def machine(tmp_path, monkeypatch, name: str, url: str) -> Store:
    """The store as one machine sees it: its own local copy (read-through cache)."""
    monkeypatch.setenv("EBFT_STORE_CACHE", str(tmp_path / name))
    return Store(url)


def publish(store: Store, kind: str, key: str, text: str, replace: bool = False) -> None:
    with store.writing(kind, key, replace=replace) as tmp:
        (tmp / "a.txt").write_text(text)
        (tmp / "sub").mkdir()
        (tmp / "sub" / "b.bin").write_bytes(text.encode() * 3)


def test_an_artifact_published_on_one_machine_is_read_on_another(tmp_path, monkeypatch, url):
    one = machine(tmp_path, monkeypatch, "one", url)
    two = machine(tmp_path, monkeypatch, "two", url)
    assert one.root != two.root
    assert two.get("masks", "k1") is None
    publish(one, "masks", "k1", "hello")
    found = two.get("masks", "k1")
    assert found is not None and found.path.startswith(str(two.root))
    assert found.digest == one.get("masks", "k1").digest
    assert (two.root / "masks" / "k1" / "sub" / "b.bin").read_bytes() == b"hello" * 3
    assert two.checked("masks", "k1") == found
    assert [(a.kind, a.key) for a in two.artifacts()] == [("masks", "k1")]
    assert [e["key"] for e in two.published()] == ["k1"]


def test_files_without_a_manifest_are_never_trusted(tmp_path, monkeypatch, url):
    """An upload that died before its DIGEST leaves files a reader must ignore; the next
    publisher replaces them."""
    one = machine(tmp_path, monkeypatch, "one", url)
    one.remote.fs.pipe_file(one.remote.path("masks", "k2", "a.txt"), b"half")
    two = machine(tmp_path, monkeypatch, "two", url)
    assert two.get("masks", "k2") is None
    publish(two, "masks", "k2", "whole")
    three = machine(tmp_path, monkeypatch, "three", url)
    assert (three.root / "masks" / "k2" / "a.txt").exists() is False
    assert (tmp := three.get("masks", "k2")) is not None
    assert (three.root / "masks" / "k2" / "a.txt").read_text() == "whole", tmp


def test_a_damaged_remote_artifact_is_unpublished_and_a_damaged_copy_refetched(
        tmp_path, monkeypatch, url):
    one = machine(tmp_path, monkeypatch, "one", url)
    publish(one, "masks", "k3", "good")
    two = machine(tmp_path, monkeypatch, "two", url)
    assert two.get("masks", "k3") is not None
    (two.root / "masks" / "k3" / "a.txt").write_text("bad!")  # this machine's copy
    assert two.checked("masks", "k3") is not None  # downloaded again
    assert (two.root / "masks" / "k3" / "a.txt").read_text() == "good"
    one.remote.fs.pipe_file(one.remote.path("masks", "k3", "a.txt"), b"evil")  # the remote's
    three = machine(tmp_path, monkeypatch, "three", url)
    assert three.get("masks", "k3") is None
    assert one.remote.digest("masks", "k3") is None  # unpublished: it will be recomputed


def test_the_first_publisher_wins_and_documents_are_replaced(tmp_path, monkeypatch, url):
    one = machine(tmp_path, monkeypatch, "one", url)
    two = machine(tmp_path, monkeypatch, "two", url)
    publish(one, "masks", "k4", "first")
    publish(two, "masks", "k4", "second")  # computed twice: theirs stays, everywhere
    assert (two.root / "masks" / "k4" / "a.txt").read_text() == "first"
    assert [e["kept"] for e in one.published()] == [True, False]
    publish(one, "reports", "r", "old", replace=True)
    publish(two, "reports", "r", "new", replace=True)
    three = machine(tmp_path, monkeypatch, "three", url)
    assert (three.root / "reports" / "r" / "a.txt").exists() is False
    three.get("reports", "r")
    assert (three.root / "reports" / "r" / "a.txt").read_text() == "new"
    two.delete("masks", "k4")
    assert one.remote.digest("masks", "k4") is None
    assert machine(tmp_path, monkeypatch, "four", url).get("masks", "k4") is None


def test_a_remote_lock_is_exclusive_renewed_and_broken_after_its_lease(
        tmp_path, monkeypatch, url, caplog):
    store = machine(tmp_path, monkeypatch, "one", url)
    path = store.remote.path("locks", "masks", "k5.lock")
    holder = ObjectLock(store.remote, path, lease_s=2.0, poll_s=0.1)
    assert holder.try_acquire()
    assert not ObjectLock(store.remote, path, lease_s=2.0).try_acquire()
    time.sleep(3.0)  # renewed every 0.5 s: a waiter must not break it
    waiter = ObjectLock(store.remote, path, lease_s=2.0, poll_s=0.1)
    got = threading.Event()
    thread = threading.Thread(target=lambda: (waiter.acquire(), got.set()))
    thread.start()
    assert not got.wait(1.5), "a renewed lock was taken"
    holder._stop.set()  # the holder dies: it stops renewing, without releasing
    holder._renewer.join()
    assert got.wait(10), "the lock was not broken after its lease ran out"
    thread.join()
    assert "lease ran out" in caplog.text
    note = json.loads(store.remote.fs.cat_file(path))
    assert note["token"] == waiter.token
    waiter.release()
    assert not store.remote.fs.exists(path)


def test_bad_store_urls_are_one_clear_error(tmp_path, monkeypatch, s3):
    from store.remote import Remote

    with pytest.raises(StoreLocationError, match="--store nosuch://x: .*not a storage URL"):
        Store("nosuch://x")
    for name, value in s3.items():
        if name.startswith("AWS_"):
            monkeypatch.setenv(name, value)
    with pytest.raises(StoreLocationError, match="bucket does not exist"):
        Remote("s3://no-such-bucket/x").check()
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    started = time.monotonic()
    with pytest.raises(StoreLocationError, match="cannot reach the endpoint"):
        Remote(f"s3://{s3['bucket']}/x").check()
    assert time.monotonic() - started < 60
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3["AWS_ENDPOINT_URL"])
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    with pytest.raises(StoreLocationError, match="no credentials"):
        Remote(f"s3://{s3['bucket']}/x").check()
