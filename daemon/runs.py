"""Snapshots and runs in the state database: the records a run trains on, and the run itself.

Snapshots. The choice of a snapshot's records is pure (``pipelines.data.select_snapshot``); this module
reads its inputs and writes the result, each in one transaction. A record is *pending* for a role while no
live snapshot holds it in that role. A snapshot is not live when its every training run failed, or when the
gate refused its every candidate (and none was promoted by hand): its records were never learned and become
pending again, to join the next run. A candidate whose evaluation failed, or whose promotion failed after the
gate passed, counts as refused. A train record refused ``promote.max_refusals`` times is *parked*: a ``park``
event names it with the reasons, and it is pending no more until ``lorad unpark`` gives it back.
``pending_sql`` is the one query that says all this.

Runs. A run is recorded before it starts (``runs`` row, status ``running``, with its pid) and after it
ends (``succeeded`` + adapter version, or ``failed`` + reason), each in one transaction. The
run folder ``runs/<id>/`` holds everything needed to run it again: ``job.json`` (config, parent)
and ``data.jsonl`` (the frozen records). So after a crash, the job runner simply runs the same
folder again and training continues from its last checkpoint (daemon/jobs.py supervises that).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import signal
import sqlite3
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Sequence

from daemon import registry
from daemon.config import Config, DataConfig
from pipelines.data import ROLES, Snapshot, select_snapshot

if TYPE_CHECKING:  # pragma: no cover
    from daemon.store import Store

log = logging.getLogger("lorad.jobs")


# ----------------------------------------------------------------------------- snapshots

# Snapshots whose every training run failed give their records back: those records were never learned.
FAILED_SNAPSHOTS = ("SELECT snapshot_id FROM runs WHERE snapshot_id IS NOT NULL GROUP BY snapshot_id "
                    "HAVING SUM(status != 'failed') = 0")
# Snapshots whose every candidate the gate refused, none of them promoted since (by hand): not learned either.
REFUSED_SNAPSHOTS = ("SELECT a.snapshot_id FROM adapters a WHERE a.snapshot_id IS NOT NULL GROUP BY a.snapshot_id "
                     "HAVING SUM(json_extract(a.eval_report, '$.decision') = 0 AND NOT EXISTS (SELECT 1 FROM events e "
                     "WHERE e.kind = 'promote' AND e.ok = 1 AND e.subject = a.version)) = COUNT(*)")
_IN_LIVE_SNAPSHOT = ("EXISTS (SELECT 1 FROM snapshot_records s WHERE s.record_id = r.id AND s.role = ? "
                     f"AND s.snapshot_id NOT IN ({FAILED_SNAPSHOTS}) AND s.snapshot_id NOT IN ({REFUSED_SNAPSHOTS}))")
# Records a 'park' event names that no later 'unpark' event (``lorad unpark``) gave back.
PARKED_RECORDS = ("SELECT j.value FROM events e, json_each(e.data, '$.record_ids') j WHERE e.kind = 'park' "
                  "AND NOT EXISTS (SELECT 1 FROM events u, json_each(u.data, '$.record_ids') k "
                  "WHERE u.kind = 'unpark' AND k.value = j.value AND u.id > e.id)")
# When record ``s.record_id`` was last given back by ``lorad unpark`` (0: never): refusals before it no longer count.
_LAST_UNPARK = ("COALESCE((SELECT MAX(u.ts) FROM events u, json_each(u.data, '$.record_ids') k "
                "WHERE u.kind = 'unpark' AND k.value = s.record_id), 0)")


def pending_sql(columns: str, *, split: str = "train", role: str = "new", since: float | None = None,
                limit: int | None = None) -> tuple[str, tuple]:
    """SQL and parameters: ``columns`` (over ``records r``) of the ``split`` records no live snapshot holds
    as ``role`` and that are not parked, by id. The default asks which train records are not learned yet;
    ``since`` keeps only records ingested at or after that time."""
    since_sql, since_args = ("AND r.ingested_at >= ? ", (since,)) if since is not None else ("", ())
    sql = (f"SELECT {columns} FROM records r WHERE r.split = ? {since_sql}AND NOT {_IN_LIVE_SNAPSHOT} "
           f"AND r.id NOT IN ({PARKED_RECORDS}) ORDER BY r.id" + (f" LIMIT {int(limit)}" if limit else ""))
    return sql, (split, *since_args, role)


def pending_records(db: sqlite3.Connection, columns: str, **where) -> list:
    """The rows of ``pending_sql(columns, **where)``."""
    return db.execute(*pending_sql(columns, **where)).fetchall()


def learned_records(db: sqlite3.Connection, columns: str) -> list[sqlite3.Row | tuple]:
    """``columns`` of the train records a live snapshot holds as 'new' (learned: the replay candidates), by id."""
    return db.execute(f"SELECT {columns} FROM records r WHERE r.split = 'train' AND {_IN_LIVE_SNAPSHOT} "
                      "ORDER BY r.id", ("new",)).fetchall()


def pending_payloads(store: Store, limit: int | None = None) -> list[dict]:
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


def plan_snapshot(store: Store, cfg: DataConfig, *, seed: int, since: float | None = None,
                  replay_fraction: float | None = None, category_cap_ratio: float | None = None) -> Snapshot:
    """What ``build_snapshot`` would write now, without writing it."""
    with store.transaction() as tx:
        return _plan(tx, cfg, seed=seed, since=since, replay_fraction=replay_fraction,
                     category_cap_ratio=category_cap_ratio)


def write_snapshot(store: Store, snapshot: Snapshot, *, db: sqlite3.Connection | None = None) -> Snapshot:
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


def build_snapshot(store: Store, cfg: DataConfig, *, seed: int, since: float | None = None,
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


def load_snapshot(store: Store, snapshot_id: str) -> Snapshot:
    """Read a stored snapshot back. Raises KeyError if there is none with that id."""
    with store.transaction() as tx:
        return _load(tx, snapshot_id)


def snapshot_payloads(store: Store, snapshot_id: str, roles: Sequence[str] = ("new", "replay")
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


def hold_refused(store: Store, version: str, reason: str, *, max_refusals: int) -> dict:
    """After the gate refused ``version``: its snapshot's new records stay pending for the next run, and those
    now refused ``max_refusals`` times are parked; both are recorded as events ('records', 'park').

    Returns:
        {"waiting": [record ids], "parked": [record ids], "reasons": the refusal reasons of the parked records}.
    """
    with store.transaction() as tx:
        row = tx.execute("SELECT snapshot_id FROM adapters WHERE version = ?", (version,)).fetchone()
        if row is None or row[0] is None:
            return {"waiting": [], "parked": [], "reasons": []}
        # Refusals per record = refused candidates (never promoted) trained on it as new since it was last
        # unparked. Candidates, not snapshots: a rerun on the same records rebuilds the same snapshot id.
        counts = tx.execute(
            "SELECT s.record_id, COUNT(DISTINCT a.version) FROM snapshot_records s JOIN snapshot_records o "
            "ON o.record_id = s.record_id AND o.role = 'new' JOIN adapters a ON a.snapshot_id = o.snapshot_id "
            f"AND a.snapshot_id IN ({REFUSED_SNAPSHOTS}) AND json_extract(a.eval_report, '$.decision') = 0 "
            f"AND a.created_at > {_LAST_UNPARK} "
            f"WHERE s.snapshot_id = ? AND s.role = 'new' AND s.record_id NOT IN ({PARKED_RECORDS}) "
            "GROUP BY s.record_id ORDER BY s.record_id", (row[0],)).fetchall()
        parked = [rid for rid, n in counts if n >= max_refusals]
        waiting = [rid for rid, n in counts if n < max_refusals]
        reasons = [r[0] for r in tx.execute(
            "SELECT DISTINCT json_extract(a.eval_report, '$.reason') FROM adapters a WHERE a.snapshot_id IN "
            f"(SELECT snapshot_id FROM snapshot_records WHERE role = 'new' AND record_id IN "
            f"({','.join(map(str, parked)) or 'NULL'})) AND a.snapshot_id IN ({REFUSED_SNAPSHOTS}) "
            "ORDER BY a.created_at")] if parked else []
        if waiting:
            store.add_event("records", subject=version, ok=False, db=tx,
                            reason=f"{len(waiting)} new records stay pending: the gate refused {version} ({reason}); "
                                   f"they join the next run",
                            data={"record_ids": waiting, "snapshot_id": row[0], "refusal": reason})
        if parked:
            store.add_event("park", subject=version, ok=False, db=tx,
                            reason=f"{len(parked)} records parked after {max_refusals} refused candidates "
                                   f"(promote.max_refusals); last: {reason}",
                            data={"record_ids": parked, "snapshot_id": row[0], "reasons": reasons})
    return {"waiting": waiting, "parked": parked, "reasons": reasons}


def hold_unjudged(store: Store, version: str, reason: str, *, max_refusals: int) -> dict:
    """The candidate ``version`` could not be judged or served (its evaluation failed, or the gate passed and loading
    it failed): it is recorded as not promotable (``decision`` false, ``failed`` true, beside any report it had), so
    its new records stay pending exactly as a refused candidate's do, and count toward ``max_refusals``."""
    with store.transaction() as tx:
        row = tx.execute("SELECT eval_report FROM adapters WHERE version = ?", (version,)).fetchone()
        if row is None:
            return {"waiting": [], "parked": [], "reasons": []}
        report = json.loads(row[0]) if row[0] else {}
        report.update(decision=False, reason=reason, failed=True)
        tx.execute("UPDATE adapters SET eval_report = ? WHERE version = ?", (json.dumps(report), version))
    return hold_refused(store, version, reason, max_refusals=max_refusals)


def unpark_records(store: Store, record_ids: Sequence[int] | None = None, *, reason: str) -> list[int]:
    """Make parked records pending again (all, or ``record_ids``): an ``unpark`` event names them, and their past
    refusals no longer count toward parking. Returns the record ids made pending."""
    with store.transaction() as tx:
        parked = [int(r[0]) for r in tx.execute(f"SELECT DISTINCT value FROM ({PARKED_RECORDS}) ORDER BY value")]
        chosen = parked if record_ids is None else sorted(set(parked) & {int(r) for r in record_ids})
        if chosen:
            store.add_event("unpark", ok=True, db=tx, reason=f"{len(chosen)} parked records pending again: {reason}",
                            data={"record_ids": chosen})
    return chosen


def refused_records(store: Store) -> dict:
    """Which records wait after a refusal and which are parked, for `lorad status`.

    Returns:
        {"waiting": [{"version", "records", "reason"}] (refused candidates whose new records are pending
        again), "parked": [{"version", "records", "reason", "ts"}] (records: those still parked),
        "parked_record_ids" (the first 1,000, for ``lorad unpark``), "n_waiting", "n_parked"}.
    """
    pending = {r[0] for r in store.query(*pending_sql("r.id"))}
    waiting = []
    for a in store.query("SELECT a.version, a.snapshot_id, json_extract(a.eval_report, '$.reason') AS reason "
                         f"FROM adapters a WHERE a.snapshot_id IN ({REFUSED_SNAPSHOTS}) ORDER BY a.created_at"):
        held = {r[0] for r in store.query("SELECT record_id FROM snapshot_records WHERE snapshot_id = ? "
                                          "AND role = 'new'", (a["snapshot_id"],))} & pending
        if held:
            waiting.append({"version": a["version"], "records": len(held), "reason": a["reason"]})
    still = {r[0] for r in store.query(f"SELECT DISTINCT value FROM ({PARKED_RECORDS})")}
    parked = [{"version": e["subject"], "records": len(set(e["data"].get("record_ids") or []) & still),
               "reason": e["reason"], "ts": e["ts"]} for e in store.events(limit=1000, kind="park")]
    parked = [p for p in parked if p["records"]]
    n_waiting = len(pending & {r[0] for r in store.query(
        f"SELECT record_id FROM snapshot_records WHERE role = 'new' AND snapshot_id IN ({REFUSED_SNAPSHOTS})")})
    return {"waiting": waiting, "parked": parked, "n_waiting": n_waiting, "parked_record_ids": sorted(still)[:1000],
            "n_parked": store.query_one(f"SELECT COUNT(DISTINCT value) FROM ({PARKED_RECORDS})")[0]}


# ----------------------------------------------------------------------------- runs


class JobError(RuntimeError):
    """A run failed; the message is the reason recorded on the run."""


def new_run_id(clock: Callable[[], float] = time.time) -> str:
    return time.strftime("run-%Y%m%d-%H%M%S", time.gmtime(clock())) + "-" + secrets.token_hex(3)


def runs_dir(cfg: Config) -> Path:
    return Path(cfg.paths.state_dir) / "runs"


def job_config(cfg: Config) -> dict:
    """The config a job needs, without secrets (the job folder must never hold the admin token)."""
    d = cfg.to_dict(mask_secrets=False)
    d["serve"]["admin_token"] = ""
    return d


def resolve_parent(store: Store, cfg: Config, parent: str | None) -> tuple[str | None, Path | None]:
    """'champion' (default) -> the current champion or none; 'none' -> from scratch; else a verified version."""
    if parent in (None, "champion"):
        parent = registry.champion(store)
        if parent is None:
            return None, None
    elif parent == "none":
        return None, None
    row = registry.verify_adapter(store, parent, base_model=cfg.model.base_model)
    return parent, Path(row["path"])


def create_run(store: Store, cfg: Config, payloads: Iterable[dict], *, parent: str | None, trigger: str,
               snapshot_id: str | None = None, max_steps: int | None = None,
               clock: Callable[[], float] = time.time) -> tuple[str, Path]:
    """Freeze data + config into runs/<id>/ and record the run as queued."""
    from pipelines.train import write_job

    parent_version, parent_path = resolve_parent(store, cfg, parent)
    run_id = new_run_id(clock)
    run_dir = runs_dir(cfg) / run_id
    write_job(run_dir, payloads=payloads, config=job_config(cfg),
              parent_adapter=str(parent_path) if parent_path else None, max_steps=max_steps)
    with store.transaction() as tx:
        tx.execute("INSERT INTO runs (id, kind, status, snapshot_id, parent_version, trigger, config, created_at) "
                   "VALUES (?, 'train', 'queued', ?, ?, ?, ?, ?)",
                   (run_id, snapshot_id, parent_version, trigger, json.dumps({"max_steps": max_steps}), clock()))
        store.add_event("train", subject=run_id, reason=f"queued ({trigger}), parent {parent_version or 'none'}",
                        data={"parent": parent_version, "snapshot_id": snapshot_id}, db=tx)
    return run_id, run_dir


def mark_running(store: Store, run_id: str, pid: int, clock: Callable[[], float] = time.time) -> None:
    with store.transaction() as tx:
        tx.execute("UPDATE runs SET status = 'running', pid = ?, started_at = COALESCE(started_at, ?) WHERE id = ?",
                   (pid, clock(), run_id))


def record_progress(store: Store, run_id: str, step: int, total_steps: int) -> None:
    with store.transaction() as tx:
        tx.execute("UPDATE runs SET step = ?, total_steps = ? WHERE id = ?", (step, total_steps, run_id))


def fail_run(store: Store, run_id: str, reason: str, clock: Callable[[], float] = time.time) -> None:
    with store.transaction() as tx:
        tx.execute("UPDATE runs SET status = 'failed', reason = ?, finished_at = ? WHERE id = ?",
                   (reason, clock(), run_id))
        store.add_event("train", subject=run_id, ok=False, reason=reason, db=tx)
    log.error("training run failed", extra={"run_id": run_id, "reason": reason})


def finish_run(store: Store, cfg: Config, run_id: str, run_dir: Path,
               clock: Callable[[], float] = time.time) -> dict:
    """Register the run's adapter as a new immutable version and mark the run succeeded."""
    result = json.loads((run_dir / "result.json").read_text())
    row = store.query_one("SELECT parent_version, snapshot_id FROM runs WHERE id = ?", (run_id,))
    job = json.loads((run_dir / "job.json").read_text())
    metrics = {k: result[k] for k in ("loss_first", "loss_last", "tokens", "tokens_per_second", "steps",
                                      "total_steps", "seconds", "status")}
    version = registry.register_adapter(
        store, Path(cfg.paths.state_dir), Path(result["adapter_dir"]), base_model=cfg.model.base_model,
        parent=row["parent_version"], snapshot_id=row["snapshot_id"], run_id=run_id, metrics=metrics,
        train_config=job["config"]["train"], clock=clock)
    with store.transaction() as tx:
        tx.execute("UPDATE runs SET status = 'succeeded', finished_at = ?, result = ?, step = ?, total_steps = ? "
                   "WHERE id = ?", (clock(), json.dumps({**metrics, "version": version}), result["steps"],
                                    result["total_steps"], run_id))
        store.add_event("train", subject=run_id, ok=True,
                        reason=f"trained {version}: loss {result['loss_first']:.3f} -> {result['loss_last']:.3f}",
                        data={**metrics, "version": version}, db=tx)
    return {"version": version, "path": str(Path(cfg.paths.state_dir) / "adapters" / version), **metrics}


def interrupt_run(store: Store, run_id: str) -> None:
    """A stop checkpointed the run: it resumes at the next start."""
    with store.transaction() as tx:
        tx.execute("UPDATE runs SET status = 'interrupted', reason = ? WHERE id = ?",
                   ("daemon stopping: checkpointed, resumes at next start", run_id))
        store.add_event("train", subject=run_id, ok=False, reason="interrupted by shutdown; will resume", db=tx)


def resumable_runs(store: Store) -> list[str]:
    """Train runs an earlier process queued or left interrupted, oldest first."""
    return [r["id"] for r in store.query("SELECT id FROM runs WHERE kind = 'train' "
                                         "AND status IN ('queued', 'interrupted') ORDER BY created_at")]


def last_train_created(store: Store) -> float | None:
    """When the latest train run was created (None: never)."""
    return store.query_one("SELECT MAX(created_at) FROM runs WHERE kind = 'train'")[0]


def latest_succeeded_run(store: Store) -> Any:
    """The latest succeeded train run's row (id, parent_version, result), or None."""
    return store.query_one("SELECT id, parent_version, result FROM runs WHERE kind = 'train' "
                           "AND status = 'succeeded' ORDER BY created_at DESC LIMIT 1")


def run_in_process(store: Store, cfg: Config, run_id: str, run_dir: Path, *, progress: bool = True) -> dict:
    """Execute a queued run here (the CLI path): progress bar on the terminal, result registered."""
    from pipelines.train import TrainingError, run_job

    if cfg.train.distributed != "none":   # several GPUs: the job runs under torchrun (pipelines/train/distributed/)
        from pipelines.train.distributed import run_launched

        def run_job(run_dir, **kwargs):  # noqa: F811 -- same call, launched processes instead of this one
            return run_launched(cfg.train, run_dir, **kwargs)
    mark_running(store, run_id, os.getpid())
    try:
        run_job(run_dir, progress=progress,
                on_step=lambda r: record_progress(store, run_id, r["step"], r["total_steps"]))
    except TrainingError as e:
        fail_run(store, run_id, str(e))
        raise JobError(str(e)) from e
    except Exception as e:  # survive and record anything else, with its type, then re-raise for the CLI
        fail_run(store, run_id, f"{type(e).__name__}: {e}")
        raise
    return finish_run(store, cfg, run_id, run_dir)


def last_step(run_dir: Path) -> dict | None:
    """The last line of a run's metrics.jsonl (step, total_steps, loss, tokens/s), read from the file's end."""
    path = run_dir / "metrics.jsonl"
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 4096))
            lines = f.read().decode(errors="replace").strip().splitlines()
        last = json.loads(lines[-1]) if lines else None
    except (OSError, ValueError):
        return None
    return last


def recover_runs(store: Store) -> list[str]:
    """Mark runs left 'running' by a process that no longer exists as interrupted; return their ids."""
    interrupted = []
    for row in store.query("SELECT id, pid FROM runs WHERE status = 'running'"):
        if row["pid"] and _pid_alive(row["pid"]):
            if not _is_run_process(row["pid"], row["id"]):
                continue  # a live process of another lorad (or the pid was reused): leave it alone
            _stop_orphan(row["pid"])
        with store.transaction() as tx:
            tx.execute("UPDATE runs SET status = 'interrupted', reason = ? WHERE id = ? AND status = 'running'",
                       ("process ended without finishing (daemon restart)", row["id"]))
            store.add_event("run", subject=row["id"], ok=False, reason="interrupted: found running at startup",
                            db=tx)
        interrupted.append(row["id"])
    return interrupted


def _is_run_process(pid: int, run_id: str) -> bool:
    """True when ``pid`` is a training process of this run (its command line names the run folder)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return False
    return "pipelines.train" in cmdline and run_id in cmdline


def _stop_orphan(pid: int, timeout: float = 60.0) -> None:
    """A training process left behind by a killed daemon: SIGTERM (it checkpoints), then SIGKILL."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and _pid_alive(pid):
        time.sleep(0.2)
    if _pid_alive(pid):
        os.kill(pid, signal.SIGKILL)


def _pid_alive(pid: int) -> bool:
    """True while ``pid`` runs; a zombie (exited, not yet reaped: its cmdline reads empty) counts as dead."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # /proc/<pid>/stat: "pid (comm) state ...", comm may hold spaces and parentheses
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state not in ("Z", "X")
