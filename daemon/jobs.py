"""The job runner: one learning job at a time, each step a supervised subprocess.

drift check (daemon/drift_check.py) -> snapshot and run (daemon/runs.py records both;
``python -m pipelines.train`` trains) -> eval (daemon/evaluation.py) -> promote. Each step runs in a
subprocess of its own process group: the daemon survives its crash, and a stop asks it to checkpoint
first. After a restart, interrupted runs resume from their run folder.
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
from daemon.drift_check import reference_payloads
from daemon.runs import (JobError, create_run, fail_run, finish_run, hold_refused, hold_unjudged, interrupt_run,
                         job_config, last_step, last_train_created, latest_succeeded_run, mark_running,
                         pending_payloads, record_progress, resumable_runs, runs_dir)
from daemon.store import Store
from pipelines.train import EXIT_INTERRUPTED  # the package imports torch only inside functions
from pipelines.train.distributed.launcher import die_with_parent, job_env

log = logging.getLogger("lorad.jobs")


def publish_step(metrics: Any, step: dict) -> None:
    """Set the training gauges from one metrics.jsonl record of the training subprocess."""
    metrics.training_step.set(step["step"])
    metrics.training_total_steps.set(step["total_steps"])
    metrics.training_loss.set(step["loss"])
    metrics.training_tokens_per_second.set(step["tokens_per_second"])
    for kind in ("allocated", "reserved"):   # present when the run trains on a GPU
        if f"gpu_peak_{kind}_bytes" in step:
            metrics.training_gpu_peak.labels(kind).set(step[f"gpu_peak_{kind}_bytes"])


def publish_eval(metrics: Any, report: dict) -> None:
    """Set the evaluation gauges from `lorad eval --json`: losses per set, answer scores per metric and set."""
    for role in ("candidate", "incumbent"):
        for key, value in report["metrics"][role].items():
            if key.endswith("_loss") and value is not None:
                metrics.eval_loss.labels(role, key[:-len("_loss")]).set(value)
    for set_name, scores in (report.get("scores") or {}).items():
        for metric, cmp in scores["metrics"].items():
            for role in ("candidate", "incumbent"):
                if cmp.get(role) is not None:
                    metrics.eval_score.labels(metric, role, set_name).set(cmp[role])


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

def _last_line(log_path: Path) -> str:
    """': <the last line of a log>' (a crashed step's exception, e.g. a full disk), or '' when there is none."""
    try:
        with open(log_path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 2048))
            lines = [ln.strip() for ln in f.read().decode(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return f": {lines[-1][:300]}" if lines else ""


def job_preexec(nice: int) -> Callable[[], None]:
    """preexec_fn of a job process: ``die_with_parent``, then ``nice`` steps lower CPU priority (inherited by
    the job's own children). Serving shares the CPU with the job; at equal priority a job computing on every
    core preempts the engine's OpenMP workers mid-operation, and on a 2-core CPU a decode pass of bf16 products
    took up to 20x longer (a barrier waits a whole time slice for the preempted worker)."""
    def preexec() -> None:
        die_with_parent()
        if nice:
            os.nice(nice)
    return preexec


WARM = "warm"   # the trigger that caches the drift reference window's features while idle


class JobRunner:
    """One learning job at a time, in a thread: drift -> train -> eval -> promote, each step a subprocess.

    ``request(trigger)`` queues a cycle (duplicates coalesce); ``request(WARM)`` instead computes the
    drift reference window's features ahead of the next check (the daemon asks at start, and the
    runner itself after each promotion), so a check featurizes only the new records. At start it first resumes runs an
    earlier process left interrupted. ``promote(version, reason)`` makes a version the champion; the
    daemon passes one that preloads the adapter into the serving engine first and then flips the alias
    (``engine.promote_and_swap``); by default only the registry alias moves. ``on_promoted(version)``
    is called after a promotion. ``on_busy(True)`` is called when a job process starts and ``on_busy(False)`` when
    it is gone (the daemon lets its CPU engine yield the cores meanwhile: ``Engine.share_cpu``).
    """

    def __init__(self, cfg: Config, store: Store, *, on_promoted: Callable[[str | None], Any] | None = None,
                 promote: Callable[[str, str], Any] | None = None,
                 clock: Callable[[], float] = time.time, python: str = sys.executable, metrics: Any = None,
                 on_busy: Callable[[bool], Any] | None = None):
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
        self.on_busy = on_busy

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
        finally:
            self._set_proc(None)
        while True:
            with self._cond:
                while not self._queue and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
                trigger = self._queue.pop(0)
            try:
                if trigger == WARM:
                    self.warm_drift_reference()   # best effort: logs its own failures
                else:
                    self.cycle(trigger)
            except Exception as e:  # a failed cycle is recorded and survived; the daemon keeps serving
                log.exception("learning cycle failed", extra={"trigger": trigger})
                self.store.add_event("cycle", subject=trigger, ok=False, reason=f"{type(e).__name__}: {e}")
            finally:
                self.current = None
                self._set_proc(None)   # whatever happened, no job process computes now

    def _set_proc(self, proc: subprocess.Popen | None) -> None:
        """The job process now running (None: none), and ``on_busy`` told when that changes."""
        with self._cond:
            changed = (self._proc is None) != (proc is None)
            self._proc = proc
        if changed and self.on_busy is not None:
            try:
                self.on_busy(proc is not None)
            except Exception:  # noqa: BLE001 - a hint to the engine; never fails a job
                log.exception("on_busy failed")

    def _run_step(self, args: list[str], folder: Path, name: str) -> subprocess.CompletedProcess:
        """Run one `lorad` step in its own process group; capture stdout (JSON), log stderr to a file."""
        log_path = folder / f"{name}.log"
        with open(log_path, "ab") as err:
            proc = subprocess.Popen([self.python, "-m", "daemon.cli", *args], stdout=subprocess.PIPE, stderr=err,
                                    start_new_session=True, env=job_env(),
                                    preexec_fn=job_preexec(self.cfg.schedule.job_nice))
            self._set_proc(proc)
            out, _ = proc.communicate()
            self._set_proc(None)
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
        from daemon.runs import build_snapshot, snapshot_payloads
        from pipelines.data import NothingToSnapshot

        folder = runs_dir(self.cfg) / time.strftime("cycle-%Y%m%d-%H%M%S", time.gmtime(self.clock()))
        folder = folder.with_name(folder.name + "-" + secrets.token_hex(2))
        folder.mkdir(parents=True, exist_ok=True)
        self.current = {"stage": "drift", "trigger": trigger, "since": self.clock()}
        drift = self.drift_check(folder) if trigger == "drift" else self.last_drift
        pending = self.store.counts()["records_pending"]
        decision = should_train(trigger=trigger, drift=drift, pending=pending, last_run_at=last_train_created(self.store),
                                now=self.clock(),
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
        from pipelines.train.distributed import train_argv

        # python -m pipelines.train RUN_DIR, with --launch (torchrun, one process per GPU) when train.distributed is set
        cmd = train_argv(self.cfg.train, run_dir, python=self.python, extra=["--no-progress"])
        with open(run_dir / "train.log", "ab") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                    env=job_env(), preexec_fn=job_preexec(self.cfg.schedule.job_nice))
        self._set_proc(proc)
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
        self._set_proc(None)
        m.training_running.set(0)
        m.training_duration.observe(self.clock() - started)
        outcome = ("interrupted" if proc.returncode == EXIT_INTERRUPTED or (self._stopping_now() and proc.returncode)
                   else "succeeded" if proc.returncode == 0 else "failed")
        m.training_runs.labels(outcome).inc()
        if proc.returncode == EXIT_INTERRUPTED or (self._stopping_now() and proc.returncode != 0):
            interrupt_run(self.store, run_id)
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
            held = hold_unjudged(self.store, version, reason, max_refusals=self.cfg.promote.max_refusals)
            return {"trained": True, "version": version, "promoted": False, "reason": reason,
                    "records_waiting": len(held["waiting"]), "records_parked": len(held["parked"])}
        report = json.loads(res.stdout)
        publish_eval(m, report)
        if report["decision"] != "promote":
            m.promotion_rejections.labels(report.get("code", "rejected")).inc()
            held = hold_refused(self.store, version, report["reason"], max_refusals=self.cfg.promote.max_refusals)
            m.records_pending.set(self.store.counts()["records_pending"])
            m.records_parked.inc(len(held["parked"]))
            return {"trained": True, "version": version, "promoted": False, "reason": report["reason"],
                    "records_waiting": len(held["waiting"]), "records_parked": len(held["parked"])}
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
            held = hold_unjudged(self.store, version, reason, max_refusals=self.cfg.promote.max_refusals)
            return {"trained": True, "version": version, "promoted": False, "reason": reason,
                    "records_waiting": len(held["waiting"]), "records_parked": len(held["parked"])}
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
        for run_id in resumable_runs(self.store):
            if self._stopping_now():
                break
            run_dir = runs_dir(self.cfg) / run_id
            if not (run_dir / "job.json").is_file():
                fail_run(self.store, run_id, f"run folder {run_dir} is missing; cannot resume", self.clock)
                continue
            self.store.add_event("train", subject=run_id, reason="resuming interrupted run from its checkpoint")
            try:
                self.train_eval_promote(run_id, run_dir)
            finally:
                self.current = None
            resumed.append(run_id)
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
        row = latest_succeeded_run(self.store)
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
