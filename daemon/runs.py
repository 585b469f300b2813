"""Training runs: freeze a run, execute it in this process, register the result; the ``runs`` rows.

A run is recorded before it starts (``runs`` row, status ``running``, with its pid) and after it
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
import time
from pathlib import Path
from typing import Any, Callable, Iterable

from daemon import registry
from daemon.config import Config
from daemon.store import Store

log = logging.getLogger("lorad.jobs")


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

    if cfg.train.distributed != "none":   # several GPUs: the job runs under torchrun (pipelines/distributed.py)
        from pipelines.distributed import run_launched

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
