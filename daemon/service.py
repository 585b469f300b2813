"""The lorad daemon: startup -> main loop -> shutdown(timeout).

Startup takes the single-instance lock on the state folder, opens the store, marks runs
left ``running`` by a dead process as interrupted, starts the HTTP server at once (so
``/healthz`` answers while the model loads) and loads the base model in the background
(``/readyz`` turns ready when it is loaded). The first SIGTERM/SIGINT drains in-flight
requests up to ``serve.drain_timeout_seconds``; a second forces the exit (uvicorn's
own handling, which restores the previous handlers afterwards).
"""

from __future__ import annotations

import errno
import gc
import json
import logging
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable

from daemon.config import Config
from daemon.runs import recover_runs, refused_records
from daemon.store import Store, ensure_state_dir, open_store

log = logging.getLogger("lorad.daemon")

LOCK_NAME = "lorad.lock"


class AlreadyRunning(RuntimeError):
    """Another lorad process holds the state folder."""


class StateLock:
    """An exclusive ``flock`` on ``<state>/lorad.lock``; the kernel frees it when the process dies."""

    def __init__(self, state_dir: str | os.PathLike):
        self.path = Path(state_dir) / LOCK_NAME
        self._fd: int | None = None

    def acquire(self, info: dict) -> None:
        import fcntl

        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EAGAIN, errno.EACCES):
                holder = read_lock_info(self.path.parent) or {}
                raise AlreadyRunning(f"another lorad (pid {holder.get('pid', '?')}) is running on state folder "
                                     f"{self.path.parent}; stop it first or use another --state") from None
            raise
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(info).encode())
        os.fsync(fd)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            os.close(self._fd)
            self._fd = None


def read_lock_info(state_dir: str | os.PathLike) -> dict | None:
    """Return the running daemon's lock info (pid, url, ...) or None when no daemon holds the lock."""
    import fcntl

    path = Path(state_dir) / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            held = True
        else:
            fcntl.flock(fd, fcntl.LOCK_UN)
            held = False
        if not held:
            return None
        raw = os.read(fd, 65536)
        try:
            return json.loads(raw.decode() or "{}")
        except ValueError:
            return {}
    finally:
        os.close(fd)


def status_snapshot(cfg: Config, store: Store | None, *, daemon_info: dict | None = None,
                    events: int = 10) -> dict:
    """Everything `lorad status` shows, as plain JSON-able values."""
    out: dict[str, Any] = {
        "state_dir": str(Path(cfg.paths.state_dir).resolve()),
        "inbox": str(Path(cfg.paths.inbox).resolve()),
        "base_model": cfg.model.base_model,
        "daemon": {"running": daemon_info is not None, **(daemon_info or {})},
    }
    if store is None:
        out.update({"initialized": False, "champion": None, "counts": {}, "runs": [], "events": []})
        return out
    champion = store.get_alias("champion")
    adapter = store.query_one("SELECT * FROM adapters WHERE version = ?", (champion,)) if champion else None
    out["initialized"] = True
    out["schema_version"] = store.schema_version
    out["champion"] = {
        "version": champion,
        "parent": adapter["parent"] if adapter else None,
        "sha256": adapter["sha256"] if adapter else None,
        "snapshot_id": adapter["snapshot_id"] if adapter else None,
        "created_at": adapter["created_at"] if adapter else None,
    } if champion else None
    out["counts"] = store.counts()
    out["refused_records"] = refused_records(store)   # records that wait after a refusal, and parked ones
    now = time.time()
    runs = []
    for r in store.query("SELECT id, kind, status, trigger, step, total_steps, started_at, reason FROM runs "
                         "WHERE status IN ('queued', 'running', 'interrupted') ORDER BY created_at"):
        run = dict(r)
        if run["status"] == "running" and run["started_at"] and run["step"] and run["total_steps"]:
            per_step = (now - run["started_at"]) / run["step"]
            run["eta_seconds"] = round(per_step * (run["total_steps"] - run["step"]), 1)
        runs.append(run)
    out["runs"] = runs
    last_runs = store.query("SELECT id, status, trigger, reason, finished_at FROM runs WHERE kind = 'train' "
                            "AND status IN ('succeeded', 'failed') ORDER BY created_at DESC LIMIT 1")
    out["last_run"] = dict(last_runs[0]) if last_runs else None
    drift = store.events(limit=1, kind="drift")
    out["last_drift"] = drift[0] if drift else None
    out["events"] = store.events(limit=events)
    return out


class Daemon:
    """The long-running service; every collaborator can be passed in for tests."""

    def __init__(self, cfg: Config, *, clock: Callable[[], float] = time.time,
                 registry: Any = None, model_loader: Callable[..., Any] | None = None):
        self.cfg = cfg
        self.clock = clock
        self.state_dir = Path(cfg.paths.state_dir)
        self.lock = StateLock(self.state_dir)
        self.store: Store | None = None
        self.registry = registry
        self.metrics = None
        self.model_loader = model_loader
        self.model = None
        self.tokenizer = None
        self.model_error: str | None = None
        self.ready = threading.Event()
        self.started_at = clock()
        self._server = None
        self.serve_only = False
        self.inbox = None
        self.scheduler = None
        self.runner = None
        self.engine = None
        self._job_computing = False   # a job process runs: a CPU engine decodes on one thread (Engine.share_cpu)
        self._ingest_lock = threading.Lock()
        self._ingest_store: Store | None = None
        self.live = None   # daemon.watch.LiveStats: what the server delivered, per version
        self.watch = None  # daemon.watch.RollbackWatch: rolls a new champion back when live signals say so
        self.fleet = None  # daemon.fleet.Fleet: the replicas of fleet.replicas follow every champion change

    # -- lifecycle ------------------------------------------------------------------------

    def startup(self) -> None:
        from monitors.metrics import LoradMetrics

        ensure_state_dir(self.state_dir)
        Path(self.cfg.paths.inbox).mkdir(parents=True, exist_ok=True)
        self.lock.acquire({"pid": os.getpid(), "url": self.url, "started_at": self.started_at})
        self.store = open_store(self.state_dir, clock=self.clock)
        _refuse_corrupt(self.store)
        self.metrics = LoradMetrics(self.registry)
        self.metrics.build_info.info({"version": _version(), "base_model": self.cfg.model.base_model})
        self.metrics.start_time.set(self.started_at)
        for run_id in recover_runs(self.store):
            log.warning("run interrupted by an earlier stop", extra={"run_id": run_id})
        from daemon.registry import reconcile

        self._init_metrics()
        for leftover in reconcile(self.store, self.state_dir):
            log.warning("removed half-registered adapter folder", extra={"folder": leftover})
        self.store.add_event("daemon", subject="start", ok=True, reason="daemon started",
                             data={"pid": os.getpid(), "url": self.url, "serve_only": self.serve_only})
        from daemon.watch import LiveStats, RollbackWatch

        self.live = LiveStats()
        self.watch = RollbackWatch(self.live, self.cfg.promote, self._auto_rollback, clock=self.clock,
                                   min_requests=self.cfg.promote.rollback_min_requests, metrics=self.metrics,
                                   on_event=self.store.add_event).start()
        if self.cfg.fleet.replicas:
            from daemon.fleet import Fleet

            self.fleet = Fleet(self.cfg, self.store, metrics=self.metrics, clock=self.clock).start()
        threading.Thread(target=self._load_model, name="model-loader", daemon=True).start()
        if not self.serve_only:
            self._start_learning_loop()
        self.metrics.up.set(1)
        log.info("lorad started", extra={"state_dir": str(self.state_dir), "url": self.url})

    def _init_metrics(self) -> None:
        """Gauges that reflect stored state, so a restarted daemon reports the truth from its first scrape."""
        from daemon import registry

        metrics = self.metrics
        metrics.drift_alpha.set(self.cfg.drift.alpha)
        metrics.drift_effect_floor.set(self.cfg.drift.effect_size_floor)
        metrics.records_pending.set(self.store.counts()["records_pending"])
        champ = registry.champion(self.store)
        if champ is not None:
            row = registry.get_adapter(self.store, champ)
            metrics.set_champion(champ, row["parent"], row["sha256"])
        last_drift = self.store.query_one("SELECT MAX(ts) FROM events WHERE kind = 'drift' AND ok = 1")[0]
        metrics.drift_last_detected.set(last_drift or 0)
        last_run = self.store.query_one("SELECT MAX(started_at) FROM runs WHERE kind = 'train'")[0]
        metrics.training_last_start.set(last_run or 0)

    def _load_model(self) -> None:
        t0 = time.perf_counter()
        try:
            from pipelines.models import load_for

            log.info("loading base model", extra={"base_model": self.cfg.model.base_model})
            # "auto" dtype/quantization/micro-batch: chosen for the GPU found (or CPU), unless a loader is given
            base = load_for("serve", self.cfg, loader=self.model_loader)
            if base.plan is not None:
                log.info("hardware plan", extra=base.plan.to_dict())
                self.metrics.hardware_plan.info({k: str(v) for k, v in base.plan.to_dict().items() if k != "reason"})
            self.model, self.tokenizer = base.model, base.tokenizer
        except Exception as e:  # the daemon keeps running and reports the failure on /readyz and status
            self.model_error = f"{type(e).__name__}: {e}"
            log.error("base model failed to load", extra={"error": self.model_error})
            return
        try:
            from daemon.engine import build_engine

            build_engine(self)  # loads the champion adapter; on failure the engine exists but is not ready
            if self.engine is not None:
                self.engine.share_cpu(self._job_computing)   # a job (a resumed run) may have started first
        except Exception as e:  # keep serving health/metrics; /readyz says why; /admin/reload retries
            self.model_error = f"champion adapter failed to load: {type(e).__name__}: {e}"
            log.error("champion adapter failed to load", extra={"error": self.model_error})
            return
        seconds = time.perf_counter() - t0
        self.metrics.model_load_seconds.set(seconds)
        self.metrics.model_ready.set(1)
        # torch, transformers and the model leave millions of long-lived objects; without this every full
        # garbage collection walks them all while holding the GIL, a ~170 ms stall of the event loop and
        # the engine (seen in bench/attack.py); frozen, they are never scanned again.
        gc.collect()
        gc.freeze()
        self.ready.set()
        log.info("base model ready", extra={"seconds": round(seconds, 2)})

    # -- the learning loop: inbox -> ingest -> drift -> train -> eval -> promote -> swap ---------

    def _start_learning_loop(self) -> None:
        from daemon.inbox import InboxWatcher
        from daemon.jobs import WARM, JobRunner
        from daemon.scheduler import Scheduler

        sc = self.cfg.schedule
        self.runner = JobRunner(self.cfg, self.store, promote=self._promote, clock=self.clock,
                                metrics=self.metrics, on_busy=self._job_busy)
        self.runner.start()
        if self.store.counts()["records_pending"] >= sc.min_new_records:
            # Ingested before a stop that came before their drift check: check them now, not at the next tick.
            self.runner.request("drift")
        else:   # idle: have the drift reference's features ready for the first check, once serving is up (on a
            # CPU the featurizing would share the cores with the model load and skew the engine's startup probe)
            threading.Thread(target=lambda: self.ready.wait() and self.runner.request(WARM),
                             name="drift-warm-after-ready", daemon=True).start()
        self.scheduler = Scheduler(timezone_name=sc.timezone, drift_minutes=sc.drift_check_minutes,
                                   monthly_cron=sc.monthly_refresh_cron, misfire_grace_seconds=sc.misfire_grace_seconds,
                                   on_drift_check=lambda: self.runner.request("drift"),
                                   on_monthly_refresh=self._monthly_refresh)
        self.scheduler.start()
        self._catch_up_monthly()
        self.inbox = InboxWatcher(self.cfg.paths.inbox, self.ingest_inbox_file, settle_seconds=sc.inbox_settle_seconds,
                                  on_refused=lambda path, reason: self.metrics.inbox_files.labels("rejected").inc())
        self.inbox.start()

    def _job_busy(self, busy: bool) -> None:
        """A job process started or ended: serving on a CPU shares the cores with it (``Engine.share_cpu``)."""
        self._job_computing = busy
        if self.engine is not None:
            self.engine.share_cpu(busy)

    def _monthly_refresh(self) -> None:
        self.store.add_event("schedule", subject="monthly_refresh", ok=True, reason="monthly refresh fired")
        self.runner.request("monthly")

    def _catch_up_monthly(self) -> None:
        """A monthly refresh missed while the daemon was down runs once now (if within the grace time)."""
        from daemon.scheduler import missed_fire_time, utc

        sc = self.cfg.schedule
        last = self.store.query_one("SELECT MAX(ts) FROM events WHERE kind = 'schedule' AND subject = 'monthly_refresh'")[0]
        first = self.store.query_one("SELECT MIN(ts) FROM events")[0]
        missed = missed_fire_time(sc.monthly_refresh_cron, sc.timezone, utc(last) if last else None, utc(self.clock()),
                                  sc.misfire_grace_seconds, installed=utc(first) if first else None)
        if missed is not None:
            log.info("running the monthly refresh missed during downtime", extra={"fire_time": missed.isoformat()})
            self._monthly_refresh()

    def ingest_inbox_file(self, path: Path, settled: os.stat_result | None = None) -> None:
        """Ingest one complete inbox file, then move it to .done/ (or .rejected/) with its report.

        The file is opened once (no links, never blocking on a FIFO) and hashed and read only through
        that descriptor; ``settled`` is the watcher's lstat, so a file swapped in after it settled is not read.
        """
        import shutil

        from daemon.inbox import DONE, REJECTED, REPORTS, set_aside, staged_name, unique_path
        from pipelines.ingest import FileRefused, ingest_file, open_regular_file

        inbox = Path(self.cfg.paths.inbox).resolve()
        rel = path.relative_to(inbox)
        with self._ingest_lock:
            try:
                opened = open_regular_file(path, root=inbox)
            except FileNotFoundError:
                return  # vanished: the watcher offers it again if it comes back
            except (FileRefused, OSError) as e:  # swapped for a link or a FIFO after it settled, or unreadable
                set_aside(inbox, path, e.reason if isinstance(e, FileRefused) else f"cannot read the file: {e}")
                self.metrics.inbox_files.labels("rejected").inc()
                return
            with opened:
                if settled is not None and not opened.is_settled_as(settled):
                    return self._offer_again(path)  # replaced or written since it settled: let it settle again
                sha = opened.sha256()
                done = self.store.query_one("SELECT status FROM files WHERE path = ? AND sha256 = ? AND "
                                            "source = 'inbox' ORDER BY id DESC LIMIT 1", (str(path), sha))
                if done is None:
                    staging = inbox / DONE / REPORTS
                    staging.mkdir(parents=True, exist_ok=True)
                    report = staging / f"{staged_name(inbox, path)}.rejects.jsonl"
                    # Ingest has its own connection: its one long transaction per file must not hold the lock that
                    # the server's status reads and the job runner share (WAL lets them read meanwhile).
                    if self._ingest_store is None:
                        self._ingest_store = open_store(self.state_dir, clock=self.clock)
                    result = ingest_file(path, self._ingest_store, self.cfg.data, source="inbox", report_path=report,
                                         limits=self.cfg.ingest, opened=opened)
                    if result.changed:
                        return self._offer_again(path)  # its writer is not done: nothing was kept
                    status = "rejected" if result.file_error else "done"
                    m = self.metrics
                    m.inbox_files.labels(status).inc()
                    m.ingest_records.labels("accepted").inc(result.accepted)
                    m.ingest_records.labels("duplicate").inc(result.duplicates)
                    m.ingest_records.labels("rejected").inc(result.rejected)
                    m.records_pending.set(self.store.counts()["records_pending"])
                    log.info("ingested inbox file", extra={"file": str(rel), **result.counts()})
                else:
                    status, report = done["status"], None  # ingested before a crash; only the move was missing
                if opened.changed():  # written after it was read: the new lines are read with it next time
                    return self._offer_again(path)
            dest = unique_path(inbox / (REJECTED if status == "rejected" else DONE) / rel)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(path), dest)
            if report is not None and report.exists():
                os.replace(report, dest.with_name(dest.name + ".rejects.jsonl"))
            with self.store.transaction() as tx:
                tx.execute("UPDATE files SET moved_to = ? WHERE id = (SELECT MAX(id) FROM files WHERE path = ? "
                           "AND sha256 = ?)", (str(dest), str(path), sha))
        if self.runner is not None and status == "done":
            self.runner.request("drift")

    def _offer_again(self, path: Path) -> None:
        """Hand a file back to the watcher to settle again (it changed while it was being read)."""
        log.info("inbox file changed while it was read; reading it again once it settles", extra={"file": str(path)})
        if self.inbox is not None:
            self.inbox.offer(path)

    def _promote(self, version: str, reason: str) -> dict:
        """Make a candidate the champion and serve it: preload first, so an adapter that fails to load
        changes nothing (the registry keeps the old champion). Before the engine exists, only the alias moves;
        the engine serves the registry's champion when it starts."""
        from daemon import registry

        base = self.cfg.model.base_model
        if self.engine is None:
            apply = lambda: registry.promote(self.store, version, reason=reason, base_model=base)  # noqa: E731
        else:
            from daemon.engine import promote_and_swap

            apply = lambda: promote_and_swap(self.engine, self.store, version, reason=reason,  # noqa: E731
                                             base_model=base)
        return self.fleet.promote(version, apply) if self.fleet is not None else apply()

    def _auto_rollback(self, reason: str) -> dict:
        from daemon.engine import rollback_and_swap

        apply = lambda: rollback_and_swap(self.engine, self.store, reason=reason, actor="auto-rollback")  # noqa: E731
        return self.fleet.rollback(apply) if self.fleet is not None else apply()

    def _champion_changed(self, event: str, old: str | None, new: str | None) -> None:
        """Engine listener: a promotion starts the post-promotion watch; a rollback ends it."""
        if self.watch is None:
            return
        if event == "promoted":
            self.watch.promoted(new, old)
        else:
            self.watch.cancel()

    def serve_forever(self) -> None:
        """Run the HTTP server in this thread until a signal asks it to stop."""
        import uvicorn

        from daemon.server import create_app, uvicorn_config

        s = self.cfg.serve
        config = uvicorn_config(create_app(self), s, log_config=None, timeout_graceful_shutdown=s.drain_timeout_seconds,
                                access_log=False)
        self._server = uvicorn.Server(config)
        # uvicorn drains on the first SIGTERM/SIGINT, forces on the second, and afterwards re-raises the
        # signal to the handler that was installed before it. Installing a recorder here turns that re-raise
        # into a clean exit 0 instead of death by the default SIGTERM action.
        previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                previous[sig] = signal.signal(sig, self._record_signal)
        try:
            self._server.run()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _record_signal(self, signum: int, frame: Any) -> None:
        log.info("stop signal handled", extra={"signal": signal.Signals(signum).name})

    def request_stop(self) -> None:
        """Ask the main loop to stop gracefully (same as one SIGTERM)."""
        if self._server is not None:
            self._server.should_exit = True

    def shutdown(self) -> None:
        if self.inbox is not None:
            self.inbox.stop()
        if self.scheduler is not None:
            self.scheduler.shutdown()
        if self.watch is not None:
            self.watch.stop()
        if self.fleet is not None:
            self.fleet.stop()
        if self.runner is not None:
            self.runner.stop(timeout=self.cfg.serve.drain_timeout_seconds + 60)
        if self.engine is not None:
            self.engine.stop(timeout=self.cfg.serve.drain_timeout_seconds)
        if self.metrics is not None:
            self.metrics.up.set(0)
        if self._ingest_store is not None:
            self._ingest_store.close()
        if self.store is not None:
            self.store.add_event("daemon", subject="stop", ok=True, reason="daemon stopped")
            self.store.close()
            self.store = None
        self.lock.release()
        log.info("lorad stopped")

    def run(self) -> int:
        self.startup()
        try:
            self.serve_forever()
        finally:
            self.shutdown()
        return 0

    # -- views ----------------------------------------------------------------------------

    @property
    def url(self) -> str:
        host = self.cfg.serve.host
        return f"http://{'[' + host + ']' if ':' in host else host}:{self.cfg.serve.port}"

    def status(self) -> dict:
        info = {"pid": os.getpid(), "url": self.url, "started_at": self.started_at,
                "model_ready": self.ready.is_set(), "model_error": self.model_error, "serve_only": self.serve_only}
        out = status_snapshot(self.cfg, self.store, daemon_info=info)
        out["schedule"] = self.scheduler.jobs() if self.scheduler is not None else []
        out["job"] = self.runner.current if self.runner is not None else None
        out["inbox_pending"] = self.inbox.pending if self.inbox is not None else 0
        if self.fleet is not None:
            out["fleet"] = self.fleet.snapshot()
        return out


def _refuse_corrupt(store: Store) -> None:
    """SQLite's quick check at startup: a damaged database is refused with a reason, never served from."""
    import sqlite3

    from daemon.store import StoreError

    try:
        problem = "; ".join(r[0] for r in store.query("PRAGMA quick_check"))
    except sqlite3.DatabaseError as e:
        problem = str(e)
    if problem != "ok":
        raise StoreError(f"state database {store.path} is corrupt ({problem[:300]}); lorad will not run on it. "
                         f"Stop, move it aside and restore a backup (`sqlite3 lorad.db .recover` may save what "
                         f"is readable)")


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("lorad")
    except Exception:
        return "unknown"
