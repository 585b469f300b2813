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
import json
import logging
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable

from daemon.config import Config
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


def recover_runs(store: Store) -> list[str]:
    """Mark runs left 'running' by a process that no longer exists as interrupted; return their ids."""
    interrupted = []
    for row in store.query("SELECT id, pid FROM runs WHERE status = 'running'"):
        if row["pid"] and _pid_alive(row["pid"]):
            continue
        with store.transaction() as tx:
            tx.execute("UPDATE runs SET status = 'interrupted', reason = ? WHERE id = ? AND status = 'running'",
                       ("process ended without finishing (daemon restart)", row["id"]))
            store.add_event("run", subject=row["id"], ok=False, reason="interrupted: found running at startup",
                            db=tx)
        interrupted.append(row["id"])
    return interrupted


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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
    out["runs"] = [dict(r) for r in store.query(
        "SELECT id, kind, status, trigger, step, total_steps, started_at, reason FROM runs "
        "WHERE status IN ('queued', 'running', 'interrupted') ORDER BY created_at")]
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

    # -- lifecycle ------------------------------------------------------------------------

    def startup(self) -> None:
        from monitors.metrics import LoradMetrics

        ensure_state_dir(self.state_dir)
        Path(self.cfg.paths.inbox).mkdir(parents=True, exist_ok=True)
        self.lock.acquire({"pid": os.getpid(), "url": self.url, "started_at": self.started_at})
        self.store = open_store(self.state_dir, clock=self.clock)
        self.metrics = LoradMetrics(self.registry)
        self.metrics.build_info.info({"version": _version(), "base_model": self.cfg.model.base_model})
        self.metrics.start_time.set(self.started_at)
        for run_id in recover_runs(self.store):
            log.warning("run interrupted by an earlier stop", extra={"run_id": run_id})
        self.store.add_event("daemon", subject="start", ok=True, reason="daemon started",
                             data={"pid": os.getpid(), "url": self.url})
        threading.Thread(target=self._load_model, name="model-loader", daemon=True).start()
        self.metrics.up.set(1)
        log.info("lorad started", extra={"state_dir": str(self.state_dir), "url": self.url})

    def _load_model(self) -> None:
        t0 = time.perf_counter()
        try:
            loader = self.model_loader
            if loader is None:
                from pipelines.models import load_base_model as loader
            log.info("loading base model", extra={"base_model": self.cfg.model.base_model})
            m = self.cfg.model
            self.model, self.tokenizer = loader(m.base_model, self.state_dir / "cache", dtype=m.dtype,
                                                quantization=m.quantization, device=m.device,
                                                revision=m.revision or None, trust_remote_code=m.trust_remote_code)
        except Exception as e:  # the daemon keeps running and reports the failure on /readyz and status
            self.model_error = f"{type(e).__name__}: {e}"
            log.error("base model failed to load", extra={"error": self.model_error})
            return
        seconds = time.perf_counter() - t0
        self.metrics.model_load_seconds.set(seconds)
        self.metrics.model_ready.set(1)
        self.ready.set()
        log.info("base model ready", extra={"seconds": round(seconds, 2)})

    def serve_forever(self) -> None:
        """Run the HTTP server in this thread until a signal asks it to stop."""
        import uvicorn

        from daemon.server import create_app

        s = self.cfg.serve
        config = uvicorn.Config(create_app(self), host=s.host, port=s.port, log_config=None,
                                timeout_graceful_shutdown=s.drain_timeout_seconds, access_log=False)
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
        if self.metrics is not None:
            self.metrics.up.set(0)
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
                "model_ready": self.ready.is_set(), "model_error": self.model_error}
        return status_snapshot(self.cfg, self.store, daemon_info=info)


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("lorad")
    except Exception:
        return "unknown"
