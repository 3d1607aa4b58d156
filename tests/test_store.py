import pytest

from store import Store
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


def test_digest_json_ignores_key_order_and_code_version_ignores_docstrings():
    assert digest_json({"a": 1, "b": 2}) == digest_json({"b": 2, "a": 1})
    import store.hashing as mod

    assert len(code_version(mod)) == 16
