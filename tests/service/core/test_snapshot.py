"""The memory store's snapshot: written atomically, read back whole; expired sessions and
sessions of model builds not served are dropped; a corrupt, cut or foreign file is set
aside with a warning and the store starts empty; a loaded snapshot is removed (a later
crash must not bring back older state)."""

from __future__ import annotations

import logging
import time

import numpy as np
from carousel.service import snapshot
from carousel.service.store import MemoryStore, SessionRecord

BUILDS = {("m", 1): "ab" * 32, ("m", 2): "cd" * 32}


def record(sid: str, version: int = 1, ttl: float = 60.0, used: float | None = None,
           position: int = 3) -> SessionRecord:
    r = SessionRecord(sid, "m", version, np.arange(5, dtype=np.float32) * position, ttl,
                      position=position)
    if used is not None:
        r.last_used_at = used
    return r


def store_of(*records: SessionRecord) -> MemoryStore:
    s = MemoryStore()
    s.restore(list(records))
    return s


def test_a_snapshot_round_trips_every_live_session(tmp_path):
    path = tmp_path / "sessions.snap"
    kept = record("a", position=7)
    kept.last_start, kept.last_digest = 4, b"\x05" * 16
    kept.last_result = {"y": np.ones((2, 2), np.float32)}
    stale = record("gone", ttl=1.0, used=time.time() - 10)
    assert snapshot.save(path, store_of(kept, record("b", version=2), stale), BUILDS) == 2
    assert not list(tmp_path.glob(".*tmp")), "no temporary file is left behind"
    fresh = MemoryStore()
    assert snapshot.load(path, fresh, BUILDS) == 2
    assert not path.exists(), "a loaded snapshot is removed"
    a = fresh.cached("a")
    assert (a.position, a.last_start, a.last_digest) == (7, 4, b"\x05" * 16)
    np.testing.assert_array_equal(a.row, kept.row)
    np.testing.assert_array_equal(a.last_result["y"], kept.last_result["y"])
    assert a.created_at == kept.created_at and a.ttl_s == kept.ttl_s
    assert fresh.cached("b").version == 2 and fresh.cached("gone") is None


def test_sessions_expired_meanwhile_or_of_builds_not_served_are_dropped(tmp_path):
    path = tmp_path / "sessions.snap"
    snapshot.save(path, store_of(record("soon", ttl=0.2), record("v2", version=2),
                                 record("ok")), BUILDS)
    time.sleep(0.3)
    fresh = MemoryStore()
    # Version 2 is now another build (re-exported), and version 1 is still the same one.
    assert snapshot.load(path, fresh, {("m", 1): "ab" * 32, ("m", 2): "ef" * 32}) == 1
    assert fresh.cached("ok") is not None
    assert fresh.cached("soon") is None and fresh.cached("v2") is None


def test_a_corrupt_cut_or_foreign_file_is_set_aside(tmp_path, caplog):
    good = tmp_path / "good.snap"
    snapshot.save(good, store_of(record("a"), record("b")), BUILDS)
    data = good.read_bytes()
    flipped = bytearray(data)
    flipped[len(snapshot.MAGIC) + 40] ^= 0xFF
    cases = {"cut": data[: len(data) // 2], "flipped": bytes(flipped),
             "foreign": b'{"not": "a snapshot"}', "empty": b""}
    for name, content in cases.items():
        path = tmp_path / f"{name}.snap"
        path.write_bytes(content)
        store = MemoryStore()
        with caplog.at_level(logging.WARNING, logger="carousel.service"):
            assert snapshot.load(path, store, BUILDS) == 0, name
        assert not path.exists(), name
        aside = list(tmp_path.glob(f"{name}.snap.bad-*"))
        assert len(aside) == 1 and aside[0].read_bytes() == content, name
        assert "set aside" in caplog.text
        assert store.cached("a") is None


def test_no_file_means_an_empty_start(tmp_path):
    assert snapshot.load(tmp_path / "none.snap", MemoryStore(), BUILDS) == 0
