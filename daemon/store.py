"""SQLite state store: files, records, snapshots, runs, adapters, aliases and events.

WAL mode so readers (``lorad status``, the server) never block the writer; every state
change runs in ONE ``BEGIN IMMEDIATE`` transaction, so after ``kill -9`` at any instant
the database holds either all of a change or none of it. The schema is versioned with
``PRAGMA user_version`` and upgraded by the ordered ``MIGRATIONS`` list at open.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import stat
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

DB_NAME = "lorad.db"
PAGE_SIZE = 16384  # bytes per SQLite page of a newly created database

# Each entry upgrades the schema by one version; never edit a released entry, append a new one.
MIGRATIONS: list[str] = [
    # v1: the initial schema.
    """
    CREATE TABLE files (
        id            INTEGER PRIMARY KEY,
        path          TEXT NOT NULL,              -- where the file was found
        name          TEXT NOT NULL,
        sha256        TEXT NOT NULL,              -- content hash of the whole file
        size          INTEGER NOT NULL,
        mtime         REAL NOT NULL,
        source        TEXT NOT NULL DEFAULT 'inbox',   -- inbox | cli
        status        TEXT NOT NULL CHECK (status IN ('ingesting', 'done', 'rejected')),
        reason        TEXT,                       -- why a whole file was rejected
        records_total INTEGER NOT NULL DEFAULT 0,
        accepted      INTEGER NOT NULL DEFAULT 0,
        duplicates    INTEGER NOT NULL DEFAULT 0,
        rejected      INTEGER NOT NULL DEFAULT 0,
        moved_to      TEXT,
        created_at    REAL NOT NULL,
        finished_at   REAL
    );
    CREATE INDEX files_identity ON files (path, size, mtime);
    CREATE INDEX files_sha ON files (sha256);

    CREATE TABLE records (
        id            INTEGER PRIMARY KEY,
        content_hash  TEXT NOT NULL UNIQUE,       -- exact dedup across everything ever ingested
        file_id       INTEGER NOT NULL REFERENCES files(id),
        line          INTEGER NOT NULL,           -- 1-based line / row / array index in the file
        kind          TEXT NOT NULL CHECK (kind IN ('chat', 'text')),
        payload       TEXT NOT NULL,              -- normalised JSON: {"messages": [...]} or {"text": ...}
        category      TEXT,
        split         TEXT NOT NULL CHECK (split IN ('train', 'holdout')),
        n_chars       INTEGER NOT NULL,
        ingested_at   REAL NOT NULL
    );
    CREATE INDEX records_file ON records (file_id);
    CREATE INDEX records_ingested ON records (ingested_at);

    CREATE TABLE rejects (
        id            INTEGER PRIMARY KEY,
        file_id       INTEGER NOT NULL REFERENCES files(id),
        line          INTEGER NOT NULL,
        outcome       TEXT NOT NULL CHECK (outcome IN ('rejected', 'duplicate')),
        reason        TEXT NOT NULL
    );
    CREATE INDEX rejects_file ON rejects (file_id);

    CREATE TABLE snapshots (
        id            TEXT PRIMARY KEY,           -- sha256 of the sorted record ids and roles
        created_at    REAL NOT NULL,
        n_new         INTEGER NOT NULL,
        n_replay      INTEGER NOT NULL,
        n_holdout     INTEGER NOT NULL,
        manifest      TEXT NOT NULL               -- JSON: how it was built (config, seed, cutoff)
    );
    CREATE TABLE snapshot_records (
        snapshot_id   TEXT NOT NULL REFERENCES snapshots(id),
        record_id     INTEGER NOT NULL REFERENCES records(id),
        role          TEXT NOT NULL CHECK (role IN ('new', 'replay', 'holdout')),
        PRIMARY KEY (snapshot_id, record_id)
    );

    CREATE TABLE runs (
        id            TEXT PRIMARY KEY,
        kind          TEXT NOT NULL,              -- train | eval | ...
        status        TEXT NOT NULL CHECK (status IN ('queued', 'running', 'succeeded', 'failed', 'interrupted')),
        snapshot_id   TEXT REFERENCES snapshots(id),
        parent_version TEXT,
        trigger       TEXT,                       -- drift | monthly | manual
        config        TEXT NOT NULL DEFAULT '{}',
        pid           INTEGER,
        step          INTEGER NOT NULL DEFAULT 0,
        total_steps   INTEGER,
        reason        TEXT,
        result        TEXT,
        created_at    REAL NOT NULL,
        started_at    REAL,
        finished_at   REAL
    );
    CREATE INDEX runs_status ON runs (status);

    CREATE TABLE adapters (
        version       TEXT PRIMARY KEY,
        path          TEXT NOT NULL,
        sha256        TEXT NOT NULL,              -- of adapter_model.safetensors
        base_model    TEXT NOT NULL,
        base_hash     TEXT,
        parent        TEXT REFERENCES adapters(version),
        snapshot_id   TEXT,
        run_id        TEXT,
        metrics       TEXT NOT NULL DEFAULT '{}',
        eval_report   TEXT,
        created_at    REAL NOT NULL
    );

    CREATE TABLE aliases (
        name          TEXT PRIMARY KEY,           -- champion, previous_champion, ...
        version       TEXT REFERENCES adapters(version),   -- NULL = the base model
        updated_at    REAL NOT NULL
    );

    CREATE TABLE events (
        id            INTEGER PRIMARY KEY,
        ts            REAL NOT NULL,
        kind          TEXT NOT NULL,              -- ingest, drift, train, eval, promote, rollback, ...
        subject       TEXT,
        ok            INTEGER,                    -- the decision, where the event is one
        reason        TEXT,
        actor         TEXT NOT NULL DEFAULT 'daemon',
        data          TEXT NOT NULL DEFAULT '{}'
    );
    CREATE INDEX events_kind_ts ON events (kind, ts);
    """,
    # v2: "is this record in a live snapshot?" (the pending-records query behind training, `lorad status` and
    # /status) looked records up by record_id in a table keyed by (snapshot_id, record_id): a scan of every
    # snapshot row per record, 2.5 s at 13k records and growing with their square.
    """
    CREATE INDEX snapshot_records_record ON snapshot_records (record_id, role);
    """,
]

SCHEMA_VERSION = len(MIGRATIONS)

class StoreError(RuntimeError):
    """The state database cannot be used (corrupt, newer schema, unwritable)."""


class Store:
    """Thread-safe access to ``lorad.db``; pass ``clock`` to control timestamps in tests."""

    def __init__(self, path: str | os.PathLike, *, clock: Callable[[], float] = time.time,
                 readonly: bool = False):
        self.path = Path(path)
        self.clock = clock
        self._lock = threading.RLock()
        if not readonly:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            if readonly:
                self._db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, check_same_thread=False,
                                           isolation_level=None, timeout=300)
            else:
                self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=300)
            self._db.row_factory = sqlite3.Row
            self._db.execute("PRAGMA busy_timeout = 300000")
            self._db.execute("PRAGMA foreign_keys = ON")
            if not readonly:
                # Applies only when the file is created. Records are ~1-3 KB of JSON: 16 KiB pages waste less
                # space than 4 KiB ones, and a big ingest writes fewer WAL frames.
                self._db.execute(f"PRAGMA page_size = {PAGE_SIZE}")
                self._db.execute("PRAGMA journal_mode = WAL")
                # NORMAL is durable across process crashes in WAL mode; only an OS crash can lose the last commit.
                self._db.execute("PRAGMA synchronous = NORMAL")
                self._migrate()
            else:
                self._check_version()
        except sqlite3.DatabaseError as e:
            raise StoreError(f"state database {self.path} cannot be opened: {e}. "
                             f"If it is corrupt, move it aside and restore a backup.") from e

    # -- schema -------------------------------------------------------------------------

    def _check_version(self) -> int:
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise StoreError(f"state database {self.path} has schema v{version}, newer than this lorad "
                             f"(v{SCHEMA_VERSION}); upgrade lorad")
        return version

    def _migrate(self) -> None:
        with self._lock:
            version = self._check_version()
            for target in range(version + 1, SCHEMA_VERSION + 1):
                # executescript commits implicitly, so run the DDL statement by statement inside one transaction.
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    for statement in _split_sql(MIGRATIONS[target - 1]):
                        self._db.execute(statement)
                    self._db.execute(f"PRAGMA user_version = {target}")
                    self._db.execute("COMMIT")
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise

    @property
    def schema_version(self) -> int:
        return self._db.execute("PRAGMA user_version").fetchone()[0]

    # -- transactions ---------------------------------------------------------------------

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One atomic state change: everything inside commits together or not at all."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            else:
                self._db.execute("COMMIT")

    def query(self, sql: str, params: tuple | dict = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, params).fetchall()

    def query_one(self, sql: str, params: tuple | dict = ()) -> sqlite3.Row | None:
        with self._lock:
            return self._db.execute(sql, params).fetchone()

    def integrity_check(self) -> str:
        """SQLite's own integrity check: 'ok' or the first problems found."""
        rows = self.query("PRAGMA integrity_check")
        return "; ".join(r[0] for r in rows)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- events and aliases ---------------------------------------------------------------

    def add_event(self, kind: str, *, subject: str | None = None, ok: bool | None = None,
                  reason: str | None = None, actor: str = "daemon", data: dict | None = None,
                  db: sqlite3.Connection | None = None) -> int:
        """Record an event; pass ``db`` to make it part of an enclosing transaction."""
        sql = ("INSERT INTO events (ts, kind, subject, ok, reason, actor, data) VALUES (?, ?, ?, ?, ?, ?, ?)")
        params = (self.clock(), kind, subject, None if ok is None else int(ok), reason, actor,
                  json.dumps(data or {}, ensure_ascii=False, default=str))
        if db is not None:
            return db.execute(sql, params).lastrowid
        with self.transaction() as tx:
            return tx.execute(sql, params).lastrowid

    def events(self, limit: int = 20, kind: str | None = None) -> list[dict]:
        where, params = ("WHERE kind = ?", (kind, limit)) if kind else ("", (limit,))
        rows = self.query(f"SELECT * FROM events {where} ORDER BY id DESC LIMIT ?", params)
        return [_event_dict(r) for r in rows]

    def get_alias(self, name: str) -> str | None:
        row = self.query_one("SELECT version FROM aliases WHERE name = ?", (name,))
        return row["version"] if row else None

    def set_alias(self, name: str, version: str | None, *, reason: str, actor: str = "daemon",
                  db: sqlite3.Connection | None = None) -> None:
        """Point an alias at a version (None = base model) and record who and why, atomically."""
        def write(tx: sqlite3.Connection) -> None:
            old = tx.execute("SELECT version FROM aliases WHERE name = ?", (name,)).fetchone()
            tx.execute("INSERT INTO aliases (name, version, updated_at) VALUES (?, ?, ?) "
                       "ON CONFLICT(name) DO UPDATE SET version = excluded.version, updated_at = excluded.updated_at",
                       (name, version, self.clock()))
            self.add_event("alias", subject=name, ok=True, reason=reason, actor=actor,
                           data={"from": old["version"] if old else None, "to": version}, db=tx)
        if db is not None:
            write(db)
        else:
            with self.transaction() as tx:
                write(tx)

    # -- summary for `lorad status` -------------------------------------------------------

    def counts(self) -> dict[str, int]:
        """Row counts per table plus records not yet in any snapshot (pending)."""
        out = {}
        for table in ("files", "records", "snapshots", "runs", "adapters", "events"):
            out[table] = self.query_one(f"SELECT COUNT(*) FROM {table}")[0]
        from daemon.runs import pending_sql

        out["records_pending"] = self.query_one(*pending_sql("COUNT(*)"))[0]
        return out


def _event_dict(row: sqlite3.Row) -> dict:
    d = dict(row)
    d["data"] = json.loads(d["data"] or "{}")
    d["ok"] = None if d["ok"] is None else bool(d["ok"])
    return d


def _split_sql(script: str) -> list[str]:
    """Split a migration script into statements (no semicolons inside our DDL strings)."""
    lines = [line.split("--", 1)[0] for line in script.splitlines()]
    return [s.strip() for s in "\n".join(lines).split(";") if s.strip()]


PRIVATE_UMASK = 0o077  # everything lorad writes: owner only (records, adapters, reports hold the users' data)


def ensure_state_dir(state_dir: str | os.PathLike) -> Path:
    """Create the state folder, or make an existing one private: folders 0700, files 0600, whatever their
    modes were before (a copied or restored folder keeps 0755/0644), and set the process umask so that
    every file lorad writes from now on is private too. Symbolic links are left alone, never followed.
    """
    path = Path(state_dir)
    os.umask(PRIVATE_UMASK)
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    _make_private(path, 0o700)
    for root, dirs, files in os.walk(path):
        for name in dirs:
            _make_private(Path(root) / name, 0o700)
        for name in files:
            _make_private(Path(root) / name, 0o600)
    return path


def _make_private(path: Path, mode: int) -> None:
    try:
        st = path.lstat()
        if stat.S_ISLNK(st.st_mode) or stat.S_IMODE(st.st_mode) & 0o077 == 0:
            return
        os.chmod(path, stat.S_IMODE(st.st_mode) & mode)
    except FileNotFoundError:  # removed meanwhile (a job's temporary file)
        pass
    except PermissionError as e:
        raise PermissionError(f"cannot make {path} private ({e.strerror}): lorad's state must belong to the user "
                              f"that runs lorad; fix it with `chown -R $(id -un) {path.parent}`") from None


def open_store(state_dir: str | os.PathLike, **kwargs: Any) -> Store:
    """Open (creating and migrating) the store of a state folder."""
    if not kwargs.get("readonly"):
        ensure_state_dir(state_dir)
    return Store(Path(state_dir) / DB_NAME, **kwargs)


class NoStore(LookupError):
    """A command that reads lorad's state found none in the state folder (and created none)."""


def has_store(state_dir: str | os.PathLike) -> bool:
    """Whether the state folder holds a store (something was ingested, trained or promoted there)."""
    return (Path(state_dir) / DB_NAME).is_file()


def open_existing_store(state_dir: str | os.PathLike, **kwargs: Any) -> Store:
    """Open the store a state folder already has; ``NoStore`` if it has none. Creates nothing.

    For the commands that read or change what is there (eval, export, promote, rollback, unpark, a named
    adapter's lookup): a mistyped ``--state`` is told so instead of leaving an empty state folder behind.
    """
    if not has_store(state_dir):
        raise NoStore(f"no lorad state in {state_dir} (nothing was ingested, trained or promoted there; "
                      "is paths.state_dir right? --state or LORAD_PATHS__STATE_DIR sets it)")
    return open_store(state_dir, **kwargs)
