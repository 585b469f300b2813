"""State store: schema, migrations, WAL, atomic transactions, aliases and events."""

from __future__ import annotations

import os
import sqlite3
import stat
import subprocess
import sys
import textwrap

import pytest

from daemon import store as store_mod
from daemon.store import SCHEMA_VERSION, StoreError, open_store


class FakeClock:
    def __init__(self, t: float = 1_700_000_000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_fresh_store_has_schema_wal_and_private_folder(tmp_path):
    state = tmp_path / "state"
    s = open_store(state)
    assert s.schema_version == SCHEMA_VERSION
    assert s.query_one("PRAGMA journal_mode")[0] == "wal"
    tables = {r[0] for r in s.query("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"files", "records", "rejects", "snapshots", "snapshot_records", "runs", "adapters",
            "aliases", "events"} <= tables
    assert stat.S_IMODE(os.stat(state).st_mode) == 0o700
    assert s.integrity_check() == "ok"
    s.close()


def test_reopen_does_not_migrate_twice(tmp_path):
    s = open_store(tmp_path)
    s.add_event("test", reason="one")
    s.close()
    s = open_store(tmp_path)
    assert s.schema_version == SCHEMA_VERSION
    assert [e["reason"] for e in s.events()] == ["one"]


def test_migrations_apply_in_order(tmp_path, monkeypatch):
    open_store(tmp_path).close()
    monkeypatch.setattr(store_mod, "MIGRATIONS", store_mod.MIGRATIONS + ["ALTER TABLE runs ADD COLUMN note TEXT"])
    monkeypatch.setattr(store_mod, "SCHEMA_VERSION", SCHEMA_VERSION + 1)
    s = open_store(tmp_path)
    assert s.schema_version == SCHEMA_VERSION + 1
    cols = {r["name"] for r in s.query("PRAGMA table_info(runs)")}
    assert "note" in cols


def test_failed_migration_rolls_back_completely(tmp_path, monkeypatch):
    open_store(tmp_path).close()
    broken = "CREATE TABLE extra (x INTEGER); INSERT INTO no_such_table VALUES (1)"
    monkeypatch.setattr(store_mod, "MIGRATIONS", store_mod.MIGRATIONS + [broken])
    monkeypatch.setattr(store_mod, "SCHEMA_VERSION", SCHEMA_VERSION + 1)
    with pytest.raises(StoreError):
        open_store(tmp_path)
    monkeypatch.undo()
    s = open_store(tmp_path)
    assert s.schema_version == SCHEMA_VERSION
    assert not s.query("SELECT name FROM sqlite_master WHERE name = 'extra'")


def test_newer_schema_is_refused(tmp_path):
    s = open_store(tmp_path)
    s._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 5}")
    s.close()
    with pytest.raises(StoreError, match="newer than this lorad"):
        open_store(tmp_path)


def test_corrupt_database_is_refused_with_a_reason(tmp_path):
    (tmp_path / "lorad.db").write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreError, match="cannot be opened"):
        open_store(tmp_path)


def test_transaction_is_all_or_nothing(tmp_path):
    s = open_store(tmp_path)
    with pytest.raises(RuntimeError):
        with s.transaction() as tx:
            s.add_event("a", db=tx)
            s.set_alias("champion", None, reason="x", db=tx)
            raise RuntimeError("crash in the middle")
    assert s.events() == []
    assert s.get_alias("champion") is None
    assert s.query("SELECT * FROM aliases") == []


def test_alias_changes_are_events_with_who_and_why(tmp_path):
    clock = FakeClock()
    s = open_store(tmp_path, clock=clock)
    with s.transaction() as tx:
        for v in ("v1", "v2"):
            tx.execute("INSERT INTO adapters (version, path, sha256, base_model, created_at) VALUES (?, ?, ?, ?, ?)",
                       (v, f"/a/{v}", "0" * 64, "base", clock()))
    s.set_alias("champion", "v1", reason="first promotion", actor="alice")
    clock.t += 10
    s.set_alias("champion", "v2", reason="better holdout loss")
    assert s.get_alias("champion") == "v2"
    events = s.events(kind="alias")
    assert [e["data"] for e in events] == [{"from": "v1", "to": "v2"}, {"from": None, "to": "v1"}]
    assert events[1]["actor"] == "alice" and events[0]["ts"] == clock.t
    with pytest.raises(sqlite3.IntegrityError):
        s.set_alias("champion", "does-not-exist", reason="typo")
    assert s.get_alias("champion") == "v2"


def test_kill_9_mid_transaction_leaves_nothing_half_written(tmp_path):
    open_store(tmp_path).close()
    code = textwrap.dedent(f"""
        import os, signal
        from daemon.store import open_store
        s = open_store({str(tmp_path)!r})
        s.add_event("committed")
        with s.transaction() as tx:
            for i in range(100):
                s.add_event("half", db=tx)
            os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True)
    assert proc.returncode == -9
    s = open_store(tmp_path)
    assert [e["kind"] for e in s.events(limit=200)] == ["committed"]
    assert s.integrity_check() == "ok"


def test_concurrent_reader_sees_committed_state(tmp_path):
    writer = open_store(tmp_path)
    reader = open_store(tmp_path, readonly=True)
    with writer.transaction() as tx:
        writer.add_event("x", db=tx)
        assert reader.events() == []  # WAL: the reader is not blocked and sees the old state
    assert len(reader.events()) == 1


def test_readonly_store_cannot_write(tmp_path):
    open_store(tmp_path).close()
    ro = open_store(tmp_path, readonly=True)
    with pytest.raises(sqlite3.OperationalError):
        ro.add_event("nope")


def test_counts_track_pending_records(tmp_path):
    s = open_store(tmp_path)
    with s.transaction() as tx:
        tx.execute("INSERT INTO files (path, name, sha256, size, mtime, status, created_at) "
                   "VALUES ('/f', 'f', 'h', 1, 0, 'done', 0)")
        for i, split in enumerate(["train", "train", "holdout"]):
            tx.execute("INSERT INTO records (content_hash, file_id, line, kind, payload, split, n_chars, ingested_at) "
                       "VALUES (?, 1, ?, 'text', '{}', ?, 1, 0)", (f"h{i}", i + 1, split))
        tx.execute("INSERT INTO snapshots (id, created_at, n_new, n_replay, n_holdout, manifest) "
                   "VALUES ('s1', 0, 1, 0, 0, '{}')")
        tx.execute("INSERT INTO snapshot_records VALUES ('s1', 1, 'new')")
    c = s.counts()
    assert c["records"] == 3 and c["files"] == 1
    assert c["records_pending"] == 1
    with pytest.raises(sqlite3.IntegrityError):
        with s.transaction() as tx:
            tx.execute("INSERT INTO records (content_hash, file_id, line, kind, payload, split, n_chars, ingested_at) "
                       "VALUES ('h0', 1, 9, 'text', '{}', 'train', 1, 0)")
    assert s.counts()["records"] == 3


def test_records_of_a_failed_run_become_pending_again(tmp_path):
    s = open_store(tmp_path)
    with s.transaction() as tx:
        tx.execute("INSERT INTO files (path, name, sha256, size, mtime, status, created_at) "
                   "VALUES ('/f', 'f', 'h', 1, 0, 'done', 0)")
        tx.execute("INSERT INTO records (content_hash, file_id, line, kind, payload, split, n_chars, ingested_at) "
                   "VALUES ('h1', 1, 1, 'text', '{}', 'train', 1, 0)")
        tx.execute("INSERT INTO snapshots (id, created_at, n_new, n_replay, n_holdout, manifest) "
                   "VALUES ('s1', 0, 1, 0, 0, '{}')")
        tx.execute("INSERT INTO snapshot_records VALUES ('s1', 1, 'new')")
        tx.execute("INSERT INTO runs (id, kind, status, snapshot_id, created_at) VALUES ('r1', 'train', 'running', 's1', 0)")
    assert s.counts()["records_pending"] == 0
    with s.transaction() as tx:
        tx.execute("UPDATE runs SET status = 'failed' WHERE id = 'r1'")
    assert s.counts()["records_pending"] == 1, "a failed run did not learn its records"
    with s.transaction() as tx:
        tx.execute("INSERT INTO runs (id, kind, status, snapshot_id, created_at) VALUES ('r2', 'train', 'succeeded', 's1', 1)")
    assert s.counts()["records_pending"] == 0


def test_the_pending_records_query_looks_records_up_by_index(tmp_path):
    """Which records are pending is asked per record of snapshot_records (training, `lorad status`, /status):
    without an index on record_id that is a scan of every snapshot row per record (seconds at 13k records)."""
    from daemon.runs import learned_records, pending_sql

    s = open_store(tmp_path)
    sql, args = pending_sql("COUNT(*)")
    plan = " | ".join(r[3] for r in s.query("EXPLAIN QUERY PLAN " + sql, args))
    assert "SEARCH s USING INDEX snapshot_records_record" in plan and "SCAN s" not in plan, plan
    learned = " | ".join(r[3] for r in s.query("EXPLAIN QUERY PLAN SELECT r.id FROM records r WHERE "
                                               "r.split = 'train' AND EXISTS (SELECT 1 FROM snapshot_records s "
                                               "WHERE s.record_id = r.id AND s.role = ?)", ("new",)))
    assert "SCAN s" not in learned, learned
    with s.transaction() as tx:
        assert learned_records(tx, "r.id") == []
    s.close()
