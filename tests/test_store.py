import errno

import pytest

from store import Store, StoreFull
from store.hashing import code_version, digest_json


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
    assert [(e["kind"], e["key"]) for e in store.published()] == [
        ("thing", "k5"), ("report", "r"), ("report", "r")]


def test_a_full_disk_is_one_clear_error_and_leaves_nothing(tmp_path):
    store = Store(tmp_path)
    with pytest.raises(StoreFull, match="no space left on the device of the store"), \
            store.writing("thing", "k6") as tmp:
        (tmp / "a.txt").write_text("half")
        raise OSError(errno.ENOSPC, "No space left on device")
    assert store.get("thing", "k6") is None
    assert list((tmp_path / "thing").iterdir()) == []


def test_digest_json_ignores_key_order_and_code_version_ignores_docstrings():
    assert digest_json({"a": 1, "b": 2}) == digest_json({"b": 2, "a": 1})
    import store.hashing as mod

    assert len(code_version(mod)) == 16
