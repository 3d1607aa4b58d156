import errno

import pytest

from store import Store, StoreFull
from store.hashing import code_version, digest_json
from store.locks import StageLock


def test_atomic_write_publishes_complete_artifact(tmp_path):
    store = Store(tmp_path)
    with store.writing("thing", "k1") as tmp:
        (tmp / "a.txt").write_text("hello")
    art = store.get("thing", "k1")
    assert art is not None and store.verify(art)
    assert not [p for p in (tmp_path / "thing").iterdir() if p.name.startswith(".tmp")]


def test_failed_write_leaves_nothing(tmp_path):
    store = Store(tmp_path)
    with pytest.raises(RuntimeError), store.writing("thing", "k2") as tmp:
        (tmp / "a.txt").write_text("half")
        raise RuntimeError("disk full")
    assert store.get("thing", "k2") is None
    assert list((tmp_path / "thing").iterdir()) == []


def test_verify_detects_flipped_bytes(tmp_path):
    store = Store(tmp_path)
    with store.writing("thing", "k3") as tmp:
        (tmp / "a.bin").write_bytes(b"\x00" * 64)
    art = store.get("thing", "k3")
    (tmp_path / "thing" / "k3" / "a.bin").write_bytes(b"\x01" + b"\x00" * 63)
    assert not store.verify(art)


def test_checked_deletes_a_corrupted_artifact_so_it_is_recomputed(tmp_path):
    store = Store(tmp_path)
    with store.writing("thing", "k4") as tmp:
        (tmp / "a.bin").write_bytes(b"\x00" * 64)
    assert store.checked("thing", "k4") is not None
    with open(tmp_path / "thing" / "k4" / "a.bin", "r+b") as f:  # truncated
        f.truncate(10)
    assert store.checked("thing", "k4") is None
    assert not (tmp_path / "thing" / "k4").exists()


def test_a_key_published_meanwhile_is_kept_and_documents_are_replaced(tmp_path):
    store = Store(tmp_path)
    for text in ("first", "second"):
        with store.writing("thing", "k5") as tmp:
            (tmp / "a.txt").write_text(text)
        with store.writing("report", "r", replace=True) as tmp:
            (tmp / "a.txt").write_text(text)
    assert (tmp_path / "thing" / "k5" / "a.txt").read_text() == "first"
    assert (tmp_path / "report" / "r" / "a.txt").read_text() == "second"
    assert [(e["kind"], e["key"], e["kept"]) for e in store.published()] == [
        ("thing", "k5", True), ("report", "r", True), ("thing", "k5", False),
        ("report", "r", True)]


def test_a_full_disk_is_one_clear_error_and_leaves_nothing(tmp_path):
    store = Store(tmp_path)
    with pytest.raises(StoreFull, match="no space left on the device of the store"), \
            store.writing("thing", "k6") as tmp:
        (tmp / "a.txt").write_text("half")
        raise OSError(errno.ENOSPC, "No space left on device")
    assert store.get("thing", "k6") is None
    assert list((tmp_path / "thing").iterdir()) == []


def test_a_url_store_is_refused_in_one_line():
    from store import StoreLocationError

    with pytest.raises(StoreLocationError, match="--store s3://bucket/x: URL stores"):
        Store("s3://bucket/x")


def test_digest_json_ignores_key_order_and_code_version_ignores_docstrings():
    assert digest_json({"a": 1, "b": 2}) == digest_json({"b": 2, "a": 1})
    import store.hashing as mod

    assert len(code_version(mod)) == 16


# ---- leased locks ---------------------------------------------------------------------------

def _note(path, **fields) -> None:
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"token": "other", "acquired": 0.0, **fields}))


def test_a_lock_of_a_dead_process_on_this_host_is_broken_at_once(tmp_path):
    import socket
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    path = tmp_path / "stage.lock"
    _note(path, host=socket.gethostname(), pid=int(dead.stdout))
    lock = StageLock(path, lease_s=3600)
    assert lock.read_owner()["pid"] == int(dead.stdout)
    with lock:
        assert lock.read_owner()["token"] == lock.token
    assert not path.exists()  # released


def test_a_lock_from_another_host_is_respected_until_its_lease_runs_out(tmp_path, caplog):
    import logging
    import os
    import threading
    import time

    path = tmp_path / "stage.lock"
    _note(path, host="elsewhere", pid=1, acquired=time.time())
    waiter = StageLock(path, lease_s=1.0, poll_s=0.05, what="masks/abc")
    assert not waiter.try_acquire()
    assert waiter._stale(waiter.read_owner()) is None  # renewed just now: held
    os.utime(path, (time.time() - 5, time.time() - 5))  # the holder stopped renewing
    with caplog.at_level(logging.INFO, logger="ebft"), waiter:
        assert waiter.read_owner()["token"] == waiter.token
    assert "lease ran out" in caplog.text and "elsewhere" in caplog.text

    # A live holder that keeps renewing is waited for, and the waiter says who holds it.
    holder = StageLock(path, lease_s=0.4)
    holder.acquire()
    got = threading.Event()
    waiting = StageLock(path, lease_s=0.4, poll_s=0.05, what="masks/abc")
    thread = threading.Thread(target=lambda: (waiting.acquire(), got.set()))
    with caplog.at_level(logging.INFO, logger="ebft"):
        thread.start()
        time.sleep(1.5)  # several lease periods: the holder's renewals keep it
        assert not got.is_set()
        assert "waiting for masks/abc: held by" in caplog.text
        holder.release()
        thread.join(timeout=5)
    assert got.is_set()
    waiting.release()
