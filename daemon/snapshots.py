"""Snapshots in the state database: which records are pending, and each run's frozen set of records.

The choice itself is pure (``pipelines.data.select_snapshot``); this module reads its inputs and
writes the result, each in one transaction. A record is *pending* for a role while no live snapshot
holds it in that role; a snapshot whose every training run failed is not live: its records were never
learned and become pending again. ``pending_records`` is the one query that says so.
"""

from __future__ import annotations

import json
import sqlite3
from typing import TYPE_CHECKING, Iterator, Sequence

from daemon.config import DataConfig
from pipelines.data import ROLES, Snapshot, select_snapshot

if TYPE_CHECKING:  # pragma: no cover
    from daemon.store import Store

# Snapshots whose every training run failed give their records back: those records were never learned.
FAILED_SNAPSHOTS = ("SELECT snapshot_id FROM runs WHERE snapshot_id IS NOT NULL GROUP BY snapshot_id "
                    "HAVING SUM(status != 'failed') = 0")
_IN_LIVE_SNAPSHOT = ("EXISTS (SELECT 1 FROM snapshot_records s WHERE s.record_id = r.id AND s.role = ? "
                     f"AND s.snapshot_id NOT IN ({FAILED_SNAPSHOTS}))")


def pending_sql(columns: str, *, split: str = "train", role: str = "new", since: float | None = None,
                limit: int | None = None) -> tuple[str, tuple]:
    """SQL and parameters: ``columns`` (over ``records r``) of the ``split`` records no live snapshot holds
    as ``role``, by id. The default asks which train records are not learned yet; ``since`` keeps only
    records ingested at or after that time."""
    since_sql, since_args = ("AND r.ingested_at >= ? ", (since,)) if since is not None else ("", ())
    sql = (f"SELECT {columns} FROM records r WHERE r.split = ? {since_sql}AND NOT {_IN_LIVE_SNAPSHOT} "
           "ORDER BY r.id" + (f" LIMIT {int(limit)}" if limit else ""))
    return sql, (split, *since_args, role)


def pending_records(db: sqlite3.Connection, columns: str, **where) -> list:
    """The rows of ``pending_sql(columns, **where)``."""
    return db.execute(*pending_sql(columns, **where)).fetchall()


def learned_records(db: sqlite3.Connection, columns: str) -> list[sqlite3.Row | tuple]:
    """``columns`` of the train records a live snapshot holds as 'new' (learned: the replay candidates), by id."""
    return db.execute(f"SELECT {columns} FROM records r WHERE r.split = 'train' AND {_IN_LIVE_SNAPSHOT} "
                      "ORDER BY r.id", ("new",)).fetchall()


def pending_payloads(store: "Store", limit: int | None = None) -> list[dict]:
    """Train-split records not yet trained on (not 'new' in any live snapshot), oldest first."""
    return [json.loads(r[0]) for r in store.query(*pending_sql("r.payload", limit=limit))]


def _plan(db: sqlite3.Connection, cfg: DataConfig, *, seed: int, since: float | None,
          replay_fraction: float | None, category_cap_ratio: float | None) -> Snapshot:
    """Read the state ``select_snapshot`` chooses from, and choose (read-only)."""
    new_rows = [tuple(r) for r in pending_records(db, "r.id, r.category, r.n_chars", since=since)]
    holdout = [r[0] for r in pending_records(db, "r.id", split="holdout", role="holdout", since=since)]
    all_holdout = [] if holdout or not new_rows else [tuple(r) for r in db.execute(
        "SELECT id, category FROM records WHERE split = 'holdout' ORDER BY id")]
    learned = dict(tuple(r) for r in learned_records(db, "r.id, r.n_chars"))
    return select_snapshot(new_rows, holdout, all_holdout, learned, cfg, seed=seed, since=since,
                           replay_fraction=replay_fraction, category_cap_ratio=category_cap_ratio)


def plan_snapshot(store: "Store", cfg: DataConfig, *, seed: int, since: float | None = None,
                  replay_fraction: float | None = None, category_cap_ratio: float | None = None) -> Snapshot:
    """What ``build_snapshot`` would write now, without writing it."""
    with store.transaction() as tx:
        return _plan(tx, cfg, seed=seed, since=since, replay_fraction=replay_fraction,
                     category_cap_ratio=category_cap_ratio)


def write_snapshot(store: "Store", snapshot: Snapshot, *, db: sqlite3.Connection | None = None) -> Snapshot:
    """Store a planned snapshot; if one with the same id exists, return it unchanged (created=False)."""
    def write(tx: sqlite3.Connection) -> Snapshot:
        if tx.execute("SELECT 1 FROM snapshots WHERE id = ?", (snapshot.id,)).fetchone():
            return _load(tx, snapshot.id)
        tx.execute("INSERT INTO snapshots (id, created_at, n_new, n_replay, n_holdout, manifest) "
                   "VALUES (?, ?, ?, ?, ?, ?)",
                   (snapshot.id, store.clock(), len(snapshot.new), len(snapshot.replay), len(snapshot.holdout),
                    json.dumps(snapshot.manifest, ensure_ascii=False, sort_keys=True)))
        tx.executemany("INSERT INTO snapshot_records (snapshot_id, record_id, role) VALUES (?, ?, ?)",
                       [(snapshot.id, rid, role) for role in ROLES for rid in getattr(snapshot, role)])
        return Snapshot(snapshot.id, snapshot.new, snapshot.replay, snapshot.holdout, snapshot.manifest,
                        created=True)
    if db is not None:
        return write(db)
    with store.transaction() as tx:
        return write(tx)


def build_snapshot(store: "Store", cfg: DataConfig, *, seed: int, since: float | None = None,
                   replay_fraction: float | None = None, category_cap_ratio: float | None = None) -> Snapshot:
    """Choose and write the next training snapshot in ONE transaction.

    Args:
        seed: seeds the replay sample and the category cap; same state + same seed = same snapshot.
        since: only records ingested at or after this timestamp count as new / holdout.
        replay_fraction: share of replay records among the training records; default data.replay_fraction.
        category_cap_ratio: no category of new records may exceed this multiple of the median one
            (the surplus stays pending for a later snapshot); 0 = no cap; default data.category_cap_ratio.

    Raises:
        NothingToSnapshot: no pending train record.
    """
    with store.transaction() as tx:
        planned = _plan(tx, cfg, seed=seed, since=since, replay_fraction=replay_fraction,
                        category_cap_ratio=category_cap_ratio)
        return write_snapshot(store, planned, db=tx)


def _load(db: sqlite3.Connection, sid: str) -> Snapshot:
    row = db.execute("SELECT manifest FROM snapshots WHERE id = ?", (sid,)).fetchone()
    if row is None:
        raise KeyError(f"no snapshot {sid!r}")
    ids: dict[str, list[int]] = {role: [] for role in ROLES}
    for rid, role in db.execute("SELECT record_id, role FROM snapshot_records WHERE snapshot_id = ? "
                                "ORDER BY record_id", (sid,)):
        ids[role].append(rid)
    return Snapshot(sid, tuple(ids["new"]), tuple(ids["replay"]), tuple(ids["holdout"]), json.loads(row[0]))


def load_snapshot(store: "Store", snapshot_id: str) -> Snapshot:
    """Read a stored snapshot back. Raises KeyError if there is none with that id."""
    with store.transaction() as tx:
        return _load(tx, snapshot_id)


def snapshot_payloads(store: "Store", snapshot_id: str, roles: Sequence[str] = ("new", "replay")
                      ) -> Iterator[tuple[int, str, dict]]:
    """(record_id, role, payload) of a snapshot's records with the given roles, by record id.

    A record's category, when it has one, is added to its payload as ``category``.
    """
    marks = ",".join("?" * len(roles))
    rows = store.query(f"SELECT r.id, s.role, r.payload, r.category FROM snapshot_records s JOIN records r "
                       f"ON r.id = s.record_id WHERE s.snapshot_id = ? AND s.role IN ({marks}) ORDER BY r.id",
                       (snapshot_id, *roles))
    for row in rows:
        payload = json.loads(row[2])
        if row[3] is not None:  # rides along into the run's data.jsonl, for train.category_weights
            payload["category"] = row[3]
        yield row[0], row[1], payload
