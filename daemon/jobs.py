"""Training jobs: freeze a run, execute it (in this process or a supervised subprocess), register the result.

A run is recorded before it starts (``runs`` row, status ``running``, with its pid) and after it
ends (``succeeded`` + adapter version, or ``failed`` + reason), each in one transaction. The
run folder ``runs/<id>/`` holds everything needed to run it again: ``job.json`` (config, parent)
and ``data.jsonl`` (the frozen records). So after a crash, ``resume_run`` simply runs the same
folder again and training continues from its last checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable

from daemon import registry
from daemon.config import Config
from daemon.snapshots import pending_payloads
from daemon.store import Store
from pipelines.train import EXIT_INTERRUPTED  # the module's top imports only the stdlib

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


def publish_step(metrics: Any, step: dict) -> None:
    """Set the training gauges from one metrics.jsonl record of the training subprocess."""
    metrics.training_step.set(step["step"])
    metrics.training_total_steps.set(step["total_steps"])
    metrics.training_loss.set(step["loss"])
    metrics.training_tokens_per_second.set(step["tokens_per_second"])
    for kind in ("allocated", "reserved"):   # present when the run trains on a GPU
        if f"gpu_peak_{kind}_bytes" in step:
            metrics.training_gpu_peak.labels(kind).set(step[f"gpu_peak_{kind}_bytes"])


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


# ----------------------------------------------------------------------------- evaluation


def read_payloads(paths: list[str]) -> tuple[list[dict], list[str]]:
    """Parse data files into normalised payloads; returns (payloads, problems).

    A record's ``category`` rides along in its payload, as in a snapshot's (train.category_weights).
    """
    from pipelines.ingest import FileRejected, iter_records

    payloads, problems = [], []
    for path in paths:
        try:
            for item in iter_records(path):
                if item.record is not None:
                    payload = item.record.payload
                    if item.record.category is not None:
                        payload = {**payload, "category": item.record.category}
                    payloads.append(payload)
                else:
                    problems.append(f"{path}:{item.line}: {item.error}")
        except FileRejected as e:
            problems.append(f"{path}: {e}")
    return payloads, problems


def adapter_path(store: Store, cfg: Config, which: str | None) -> tuple[str | None, Path | None]:
    """'base' / None -> (None, None); 'champion' -> the champion (or base); a version -> verified path."""
    if which in (None, "base"):
        return None, None
    if which == "champion":
        which = registry.champion(store)
        if which is None:
            return None, None
    row = registry.verify_adapter(store, which, base_model=cfg.model.base_model)
    return which, Path(row["path"])


def evaluate_candidate(store: Store, cfg: Config, candidate: str, incumbent: str = "champion", *,
                       holdout_file: str | None = None) -> dict:
    """Score candidate vs incumbent, decide with the pure policy, record the report and the decision."""
    from daemon.policy import should_promote
    from daemon.snapshots import snapshot_payloads
    from pipelines.evaluate import EvalError, evaluate, load_regression_set
    from pipelines.models import load_base_model

    cand_row = registry.verify_adapter(store, candidate, base_model=cfg.model.base_model)
    inc_version, inc_path = adapter_path(store, cfg, incumbent)
    if inc_version == candidate:
        raise EvalError(f"candidate {candidate} is the incumbent; compare it with another version or 'base'")
    if holdout_file:
        holdout, _ = read_payloads([holdout_file])
    elif cand_row["snapshot_id"]:
        holdout = [p for _, _, p in snapshot_payloads(store, cand_row["snapshot_id"], roles=("holdout",))]
    else:
        raise EvalError(f"{candidate} has no data snapshot (trained with `lorad train --data`); pass --holdout FILE")
    regression = {name: load_regression_set(name) for name in cfg.eval.regression_sets}
    m = cfg.model
    model, tokenizer = load_base_model(m.base_model, Path(cfg.paths.state_dir) / "cache", dtype=m.dtype,
                                       quantization=m.quantization, device=m.device, revision=m.revision or None,
                                       trust_remote_code=m.trust_remote_code)
    report = evaluate(model, tokenizer, candidate=Path(cand_row["path"]), incumbent=inc_path, holdout=holdout,
                      regression=regression, max_examples=cfg.eval.max_examples,
                      bootstrap_samples=cfg.eval.bootstrap_samples, latency_prompts=cfg.eval.latency_prompts,
                      max_seq_len=cfg.data.max_seq_len, seed=cfg.train.seed,
                      regression_base=cfg.promote.regression_reference == "base")
    decision = should_promote(report, cfg.promote, confidence=cfg.eval.confidence)
    summary = {k: v for k, v in report.items() if k != "per_example"}
    with store.transaction() as tx:
        tx.execute("UPDATE adapters SET eval_report = ? WHERE version = ?",
                   (json.dumps({**summary, "decision": decision.ok, "reason": decision.reason}), candidate))
        store.add_event("eval", subject=candidate, ok=decision.ok, reason=decision.reason,
                        data={"incumbent": inc_version or "base", "code": decision.code}, db=tx)
    h = report["holdout"]
    return {
        "decision": "promote" if decision.ok else "reject", "reason": decision.reason, "code": decision.code,
        "candidate": candidate, "incumbent": inc_version or "base",
        "metrics": {
            "candidate": {"holdout_loss": h["candidate_loss"], "holdout_perplexity": h["candidate_perplexity"],
                          **{f"{n}_loss": r["candidate_loss"] for n, r in report["regression"].items()},
                          "ttft_s": (report.get("latency") or {}).get("candidate_ttft_s")},
            "incumbent": {"holdout_loss": h["incumbent_loss"], "holdout_perplexity": h["incumbent_perplexity"],
                          **{f"{n}_loss": r["incumbent_loss"] for n, r in report["regression"].items()},
                          "ttft_s": (report.get("latency") or {}).get("incumbent_ttft_s")},
        },
        "tests": {"holdout": {k: h[k] for k in ("n", "p_value", "mean_diff", "ci95")},
                  "regression": report["regression"], "latency": report.get("latency")},
    }


# ----------------------------------------------------------------------------- the learning loop




def write_job_config(cfg: Config, folder: Path) -> Path:
    """The effective config as YAML (no secrets) for a step run as `lorad ...` in a subprocess."""
    import yaml

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(job_config(cfg), allow_unicode=True, sort_keys=False))
    return path


def write_jsonl(path: Path, payloads: Iterable[dict]) -> int:
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for p in payloads:
            f.write(json.dumps(p, ensure_ascii=False) + "\n")
            n += 1
    return n


def reference_payloads(store: Store, cfg: Config, seed: int = 0) -> tuple[str, list[dict]]:
    """What the champion learned (its snapshot's training records, reservoir-capped).

    With no champion yet, the base model's own knowledge is represented by the general regression
    sets: new domain data is then compared with general conversation.
    """
    import random

    from daemon import registry
    from daemon.snapshots import snapshot_payloads

    champ = registry.champion(store)
    payloads: list[dict] = []
    source = "base model (general regression sets)"
    if champ is not None:
        row = store.query_one("SELECT snapshot_id FROM adapters WHERE version = ?", (champ,))
        if row and row["snapshot_id"]:
            payloads = [p for _, _, p in snapshot_payloads(store, row["snapshot_id"], roles=("new", "replay"))]
            source = f"champion {champ} training data"
    if not payloads:
        from pipelines.evaluate import load_regression_set

        for name in cfg.eval.regression_sets:
            payloads.extend(load_regression_set(name))
    if len(payloads) > cfg.drift.reference_cap:
        payloads = random.Random(seed).sample(payloads, cfg.drift.reference_cap)
    return source, payloads


def _last_line(log_path: Path) -> str:
    """': <the last line of a log>' (a crashed step's exception, e.g. a full disk), or '' when there is none."""
    try:
        with open(log_path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 2048))
            lines = [ln.strip() for ln in f.read().decode(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return f": {lines[-1][:300]}" if lines else ""


def _die_with_parent() -> None:
    """preexec_fn: ask Linux to SIGTERM this child when the daemon dies, even by SIGKILL.

    The training process then checkpoints and exits, so a restarted daemon resumes the run
    instead of racing an orphan on the same run folder.
    """
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        pass  # not Linux: recover_runs still stops orphans at the next start


WARM = "warm"   # the trigger that caches the drift reference window's features while idle


class JobRunner:
    """One learning job at a time, in a thread: drift -> train -> eval -> promote, each step a subprocess.

    ``request(trigger)`` queues a cycle (duplicates coalesce); ``request(WARM)`` instead computes the
    drift reference window's features ahead of the next check (the daemon asks at start, and the
    runner itself after each promotion), so a check featurizes only the new records. At start it first resumes runs an
    earlier process left interrupted. ``promote(version, reason)`` makes a version the champion; the
    daemon passes one that preloads the adapter into the serving engine first and then flips the alias
    (``engine.promote_and_swap``); by default only the registry alias moves. ``on_promoted(version)``
    is called after a promotion.
    """

    def __init__(self, cfg: Config, store: Store, *, on_promoted: Callable[[str | None], Any] | None = None,
                 promote: Callable[[str, str], Any] | None = None,
                 clock: Callable[[], float] = time.time, python: str = sys.executable, metrics: Any = None):
        import threading

        from monitors.metrics import LoradMetrics

        self.cfg = cfg
        self.metrics = metrics if metrics is not None else LoradMetrics()  # a private registry when none is given
        self.store = store
        self.on_promoted = on_promoted
        self.promote = promote
        self.clock = clock
        self.python = python
        self._cond = threading.Condition()
        self._queue: list[str] = []
        self._stopping = False
        self._proc: subprocess.Popen | None = None
        self._thread: threading.Thread | None = None
        self.current: dict | None = None   # what runs now, for status
        self.last_drift: dict | None = None

    # -- control ----------------------------------------------------------------------------

    def request(self, trigger: str) -> bool:
        with self._cond:
            if self._stopping or trigger in self._queue:
                return False
            self._queue.append(trigger)
            self._cond.notify()
            return True

    def start(self) -> None:
        import threading

        self._thread = threading.Thread(target=self._loop, name="job-runner", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 60.0) -> None:
        """Ask the running step to checkpoint and stop (SIGTERM to its process group), then wait."""
        import signal

        with self._cond:
            self._stopping = True
            self._cond.notify_all()
            proc = self._proc
        if proc is not None and proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        if self._thread is not None:
            self._thread.join(timeout)
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)

    @property
    def busy(self) -> bool:
        return self.current is not None

    # -- the loop ---------------------------------------------------------------------------

    def _loop(self) -> None:
        try:
            self.resume_interrupted()
        except Exception:
            log.exception("resuming interrupted runs failed")
        while True:
            with self._cond:
                while not self._queue and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
                trigger = self._queue.pop(0)
            if trigger == WARM:
                self.warm_drift_reference()
                continue
            try:
                self.cycle(trigger)
            except Exception as e:  # a failed cycle is recorded and survived; the daemon keeps serving
                log.exception("learning cycle failed", extra={"trigger": trigger})
                self.store.add_event("cycle", subject=trigger, ok=False, reason=f"{type(e).__name__}: {e}")
            finally:
                self.current = None

    def _run_step(self, args: list[str], folder: Path, name: str) -> subprocess.CompletedProcess:
        """Run one `lorad` step in its own process group; capture stdout (JSON), log stderr to a file."""
        log_path = folder / f"{name}.log"
        with open(log_path, "ab") as err:
            proc = subprocess.Popen([self.python, "-m", "daemon.cli", *args], stdout=subprocess.PIPE, stderr=err,
                                    start_new_session=True, cwd=str(Path(__file__).resolve().parents[1]),
                                    preexec_fn=_die_with_parent)
            with self._cond:
                self._proc = proc
            out, _ = proc.communicate()
            with self._cond:
                self._proc = None
        return subprocess.CompletedProcess(proc.args, proc.returncode, out.decode(errors="replace"), "")

    def _stopping_now(self) -> bool:
        with self._cond:
            return self._stopping

    def _run_drift(self, folder: Path, reference: list[dict], args: list[str]) -> subprocess.CompletedProcess:
        """``lorad drift --reference <folder>/reference.jsonl ARGS --json`` with this runner's config."""
        write_jsonl(folder / "reference.jsonl", reference)
        cfg_path = write_job_config(self.cfg, folder)
        return self._run_step(["drift", "-c", str(cfg_path), "--reference", str(folder / "reference.jsonl"),
                               *args, "--json"], folder, "drift")

    def warm_drift_reference(self) -> dict | None:
        """Cache the features of the reference window the next drift check will use (subprocess).

        Best effort: a failure is logged and the next check computes them itself. Returns the step's
        report ({"status": "warmed", "reference_features": "computed" | "cached", ...}) or None.
        """
        folder = runs_dir(self.cfg) / "drift-warm"
        self.current = {"stage": "drift_warm", "trigger": WARM, "since": self.clock()}
        try:
            source, reference = reference_payloads(self.store, self.cfg)
            if len(reference) < self.cfg.drift.min_reference:
                return None
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "drift.log").unlink(missing_ok=True)   # one folder, rewritten each time
            res = self._run_drift(folder, reference, ["--warm"])
            if res.returncode != 0:
                log.warning("drift reference warm-up failed", extra={
                    "error": f"exit {res.returncode}{_last_line(folder / 'drift.log')}"})
                return None
            report = json.loads(res.stdout)
            log.info("drift reference features ready", extra={
                "reference_source": source, "n_reference": report.get("n_reference"),
                "reference_features": report.get("reference_features")})
            return report
        except Exception as e:   # never fatal: the check computes what is missing
            log.warning("drift reference warm-up failed", extra={"error": f"{type(e).__name__}: {e}"})
            return None
        finally:
            self.current = None

    def drift_check(self, folder: Path) -> dict | None:
        """Featurize + test pending records against the reference window (subprocess)."""
        current = pending_payloads(self.store, limit=self.cfg.drift.reference_cap)
        if len(current) < self.cfg.drift.min_current:
            report = {"drift": False, "status": "insufficient_data", "n_current": len(current),
                      "explanation": f"{len(current)} new records < drift.min_current {self.cfg.drift.min_current}"}
        else:
            source, reference = reference_payloads(self.store, self.cfg)
            write_jsonl(folder / "current.jsonl", current)
            res = self._run_drift(folder, reference, ["--current", str(folder / "current.jsonl")])
            if res.returncode != 0:
                raise JobError(f"drift check failed (exit {res.returncode}{_last_line(folder / 'drift.log')}); "
                               f"see {folder / 'drift.log'}")
            report = json.loads(res.stdout)
            report["reference_source"] = source
        self.last_drift = report
        m = self.metrics
        status = report.get("status", "ok")
        m.drift_checks.labels("insufficient_data" if status == "insufficient_data" else
                              ("drift" if report.get("drift") else "no_drift")).inc()
        if report.get("p_value") is not None:
            m.drift_p_value.set(report["p_value"])
        if report.get("effect") is not None:
            m.drift_effect.set(report["effect"])
        if report.get("drift"):
            m.drift_last_detected.set(self.clock())
        self.store.add_event("drift", subject=report.get("status", "ok"), ok=bool(report.get("drift")),
                             reason=report.get("explanation", ""),
                             data={k: report.get(k) for k in ("p_value", "effect", "n_reference", "n_current",
                                                              "reference_source", "drifted_features")})
        return report

    def cycle(self, trigger: str) -> dict:
        """One pass of the loop for a trigger; returns what happened (also recorded as events)."""
        from daemon.policy import should_train
        from daemon.snapshots import build_snapshot, snapshot_payloads
        from pipelines.data import NothingToSnapshot

        folder = runs_dir(self.cfg) / time.strftime("cycle-%Y%m%d-%H%M%S", time.gmtime(self.clock()))
        folder = folder.with_name(folder.name + "-" + secrets.token_hex(2))
        folder.mkdir(parents=True, exist_ok=True)
        self.current = {"stage": "drift", "trigger": trigger, "since": self.clock()}
        drift = self.drift_check(folder) if trigger == "drift" else self.last_drift
        pending = self.store.counts()["records_pending"]
        last = self.store.query_one("SELECT MAX(created_at) FROM runs WHERE kind = 'train'")[0]
        decision = should_train(trigger=trigger, drift=drift, pending=pending, last_run_at=last, now=self.clock(),
                                job_running=False, cfg=self.cfg.schedule)
        self.store.add_event("decide_train", subject=trigger, ok=decision.ok, reason=decision.reason,
                             data={"code": decision.code, "pending": pending})
        self.metrics.train_decisions.labels("start" if decision.ok else "skip", decision.code).inc()
        self.metrics.records_pending.set(pending)
        if not decision.ok:
            return {"trained": False, "reason": decision.reason}
        try:
            snap = build_snapshot(self.store, self.cfg.data, seed=self.cfg.train.seed)
        except NothingToSnapshot as e:
            return {"trained": False, "reason": str(e)}
        payloads = [p for _, _, p in snapshot_payloads(self.store, snap.id, roles=("new", "replay"))]
        run_id, run_dir = create_run(self.store, self.cfg, payloads, parent="champion", trigger=trigger,
                                     snapshot_id=snap.id, clock=self.clock)
        return self.train_eval_promote(run_id, run_dir)

    def train_eval_promote(self, run_id: str, run_dir: Path) -> dict:
        self.current = {"stage": "train", "run_id": run_id, "since": self.clock()}
        from pipelines.distributed import train_argv

        # python -m pipelines.train RUN_DIR, with --launch (torchrun, one process per GPU) when train.distributed is set
        cmd = train_argv(self.cfg.train, run_dir, python=self.python, extra=["--no-progress"])
        with open(run_dir / "train.log", "ab") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                    cwd=str(Path(__file__).resolve().parents[1]), preexec_fn=_die_with_parent)
        with self._cond:
            self._proc = proc
        mark_running(self.store, run_id, proc.pid, self.clock)
        m, started = self.metrics, self.clock()
        m.training_running.set(1)
        m.training_last_start.set(started)
        last = None
        while proc.poll() is None:
            try:
                proc.wait(timeout=1.0)
            except subprocess.TimeoutExpired:
                pass
            step = last_step(run_dir)
            if step is not None and step != last:
                last = step
                record_progress(self.store, run_id, step["step"], step["total_steps"])
                publish_step(m, step)
        with self._cond:
            self._proc = None
        m.training_running.set(0)
        m.training_duration.observe(self.clock() - started)
        outcome = ("interrupted" if proc.returncode == EXIT_INTERRUPTED or (self._stopping_now() and proc.returncode)
                   else "succeeded" if proc.returncode == 0 else "failed")
        m.training_runs.labels(outcome).inc()
        if proc.returncode == EXIT_INTERRUPTED or (self._stopping_now() and proc.returncode != 0):
            with self.store.transaction() as tx:
                tx.execute("UPDATE runs SET status = 'interrupted', reason = ? WHERE id = ?",
                           ("daemon stopping: checkpointed, resumes at next start", run_id))
                self.store.add_event("train", subject=run_id, ok=False, reason="interrupted by shutdown; will resume",
                                     db=tx)
            return {"trained": False, "reason": "interrupted"}
        if proc.returncode != 0:
            err = run_dir / "error.json"
            reason = (json.loads(err.read_text())["reason"] if err.exists()
                      else f"training process exited with code {proc.returncode}{_last_line(run_dir / 'train.log')}; "
                           f"see {run_dir / 'train.log'}")
            fail_run(self.store, run_id, reason, self.clock)
            return {"trained": False, "reason": reason}
        try:
            result = finish_run(self.store, self.cfg, run_id, run_dir, self.clock)
        except Exception as e:  # e.g. the disk filled up while copying the adapter: fail the run, keep serving
            reason = f"registering the trained adapter failed: {type(e).__name__}: {e}"
            fail_run(self.store, run_id, reason, self.clock)
            return {"trained": False, "reason": reason}
        version = result["version"]
        m.training_tokens.inc(result["tokens"])
        return self.judge(run_id, run_dir, version)

    def judge(self, run_id: str, run_dir: Path, version: str) -> dict:
        """Evaluate a registered candidate against the champion; promote it when the gate passes."""
        m = self.metrics
        self.current = {"stage": "eval", "run_id": run_id, "version": version, "since": self.clock()}
        cfg_path = write_job_config(self.cfg, run_dir)
        res = self._run_step(["eval", "-c", str(cfg_path), "--candidate", version, "--json"], run_dir, "eval")
        if res.returncode != 0:
            reason = (f"evaluation failed (exit {res.returncode}{_last_line(run_dir / 'eval.log')}); "
                      f"see {run_dir / 'eval.log'}")
            self.store.add_event("eval", subject=version, ok=False, reason=reason)
            return {"trained": True, "version": version, "promoted": False, "reason": reason}
        report = json.loads(res.stdout)
        for role in ("candidate", "incumbent"):
            for key, value in report["metrics"][role].items():
                if key.endswith("_loss") and value is not None:
                    m.eval_loss.labels(role, key[:-len("_loss")]).set(value)
        if report["decision"] != "promote":
            m.promotion_rejections.labels(report.get("code", "rejected")).inc()
            return {"trained": True, "version": version, "promoted": False, "reason": report["reason"]}
        if not self.cfg.promote.auto_promote:
            self.store.add_event("promote", subject=version, ok=False,
                                 reason="gate passed; waiting for manual promotion (promote.auto_promote = false)")
            return {"trained": True, "version": version, "promoted": False, "reason": "manual promotion required"}
        self.current = {"stage": "promote", "version": version, "since": self.clock()}
        try:
            if self.promote is not None:
                self.promote(version, report["reason"])
            else:
                registry.promote(self.store, version, reason=report["reason"], base_model=self.cfg.model.base_model)
        except Exception as e:  # the adapter failed to verify or load: the champion stays as it was
            reason = f"gate passed but promotion failed: {type(e).__name__}: {e}"
            log.error("promotion failed", extra={"version": version, "error": str(e)})
            self.store.add_event("promote", subject=version, ok=False, reason=reason)
            m.promotion_rejections.labels("load_failed").inc()
            return {"trained": True, "version": version, "promoted": False, "reason": reason}
        m.promotions.labels(report.get("code", "better")).inc()
        row = registry.get_adapter(self.store, version)
        m.set_champion(version, row["parent"], row["sha256"])
        if self.on_promoted is not None:
            self.on_promoted(version)
        self.request(WARM)   # the new champion's training data is the next drift check's reference
        return {"trained": True, "version": version, "promoted": True, "reason": report["reason"]}

    def resume_interrupted(self) -> list[str]:
        """Continue train runs an earlier process left unfinished (from their last checkpoint)."""
        resumed = []
        rows = self.store.query("SELECT id FROM runs WHERE kind = 'train' AND status IN ('queued', 'interrupted') "
                                "ORDER BY created_at")
        for row in rows:
            if self._stopping_now():
                break
            run_dir = runs_dir(self.cfg) / row["id"]
            if not (run_dir / "job.json").is_file():
                fail_run(self.store, row["id"], f"run folder {run_dir} is missing; cannot resume", self.clock)
                continue
            self.store.add_event("train", subject=row["id"], reason="resuming interrupted run from its checkpoint")
            try:
                self.train_eval_promote(row["id"], run_dir)
            finally:
                self.current = None
            resumed.append(row["id"])
        unjudged = self.unjudged_candidate()
        if unjudged is not None and not self._stopping_now():
            run_id, version = unjudged
            self.store.add_event("eval", subject=version, reason=f"judging candidate of run {run_id}: the daemon "
                                                                  f"stopped before its evaluation or promotion")
            try:
                self.judge(run_id, runs_dir(self.cfg) / run_id, version)
            finally:
                self.current = None
            resumed.append(run_id)
        return resumed

    def unjudged_candidate(self) -> tuple[str, str] | None:
        """The latest run's candidate when a stop cut its evaluation or promotion short, else None.

        Only while the champion is still the one it was trained from (and is to be compared with).
        """
        row = self.store.query_one("SELECT id, parent_version, result FROM runs WHERE kind = 'train' "
                                   "AND status = 'succeeded' ORDER BY created_at DESC LIMIT 1")
        if row is None or row["parent_version"] != registry.champion(self.store):
            return None
        version = json.loads(row["result"] or "{}").get("version")
        if not version or version == registry.champion(self.store):
            return None
        decided = self.store.query_one("SELECT 1 FROM events WHERE kind = 'promote' AND subject = ?", (version,))
        judged = self.store.query_one("SELECT ok FROM events WHERE kind = 'eval' AND subject = ? AND ok IS NOT NULL "
                                      "ORDER BY id DESC LIMIT 1", (version,))
        if decided is not None or (judged is not None and not judged["ok"]):
            return None
        return row["id"], version
