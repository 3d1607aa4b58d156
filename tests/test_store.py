import errno
import os

import pytest

from store import Store, StoreFull
from store.hashing import digest_json
from store.locks import StageLock, machine


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


def test_digest_json_ignores_key_order():
    assert digest_json({"a": 1, "b": 2}) == digest_json({"b": 2, "a": 1})


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
    _note(path, host=socket.gethostname(), machine=machine(), pid=int(dead.stdout))
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
    assert waiter.stale(waiter.read_owner()) is None  # renewed just now: held
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


def test_temporary_folders_of_gone_writers_are_removed_and_live_ones_kept(tmp_path):
    import json
    import subprocess
    import sys

    store = Store(tmp_path)
    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True, check=True).stdout)
    here = machine()
    owners = {"dead": (here, dead), "live": (here, os.getpid()),
              "remote": ("another-host|boot|1", dead)}
    for name, (where, pid) in owners.items():
        folder = tmp_path / "activations" / f".tmp-{name}-0000"
        (folder / "activations.zarr").mkdir(parents=True)
        (folder.parent / f"{folder.name}.owner").write_text(json.dumps({"machine": where,
                                                                         "pid": pid}))
    deleting = tmp_path / "activations" / ".tmp-deleting-old-0000"
    deleting.mkdir()
    removed = {p.name for p in store.remove_abandoned()}
    assert removed == {".tmp-dead-0000", ".tmp-deleting-old-0000"}
    left = {p.name for p in (tmp_path / "activations").iterdir()}
    assert left == {".tmp-live-0000", ".tmp-live-0000.owner", ".tmp-remote-0000",
                    ".tmp-remote-0000.owner"}


def test_stamps_spare_the_rehash_and_any_write_is_still_caught(tmp_path, monkeypatch):
    from store import artifacts

    store = Store(tmp_path)
    with store.writing("thing", "k7") as tmp:
        (tmp / "a.bin").write_bytes(b"\x00" * 64)
    art = store.get("thing", "k7")
    hashed = []
    real = artifacts.digest_path
    monkeypatch.setattr(artifacts, "digest_path", lambda p: hashed.append(p) or real(p))
    assert store.verify(art) and hashed == []  # stamps unchanged: no re-read
    assert store.verify(art, full=True) and len(hashed) == 1
    (tmp_path / "thing" / "k7" / "a.bin").write_bytes(b"\x01" + b"\x00" * 63)  # same size
    assert not store.verify(art)


def test_ebft_verify_rehashes_every_artifact_and_names_the_corrupted(tmp_path, capsys):
    from flows.cli import main

    store = Store(tmp_path)
    for key in ("a", "b"):
        with store.writing("thing", key) as tmp:
            (tmp / "x.bin").write_bytes(b"\x00" * 32)
    assert main(["verify", "--store", str(tmp_path)]) == 0
    assert "verified     2 artifacts" in capsys.readouterr().out
    path = tmp_path / "thing" / "b" / "x.bin"
    stat = path.stat()
    path.write_bytes(b"\x01" + b"\x00" * 31)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same size, same mtime
    assert store.verify(store.get("thing", "b"))  # a stamp check cannot see this one...
    assert main(["verify", "--store", str(tmp_path)]) == 1  # ...the full re-hash does
    assert "corrupted    thing/b" in capsys.readouterr().out
