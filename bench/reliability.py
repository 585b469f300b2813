"""Reliability: crash trials, resource faults, fuzzing and load; writes bench/results/reliability.json.

    .venv/bin/python bench/reliability.py [--trials 54] [--fuzz-examples 150]
                                          [--load-seconds 20] [--only crash,faults,fuzz,load] [--out PATH]

Every part runs the real thing on this machine: ``lorad run`` / ``lorad serve`` processes on 127.0.0.1
around a tiny random Llama (built from a config, saved as safetensors) and real training, drift and
evaluation subprocesses.

  crash   until --trials kills landed inside a non-idle phase: drop a data file into the inbox of a running
          daemon (lines whose outcome is known in advance: new, duplicate within the file, duplicate of an
          earlier file, rejected), wait for the target phase of the learning cycle (ingest, drift, train,
          eval, promote, swap; round robin), SIGKILL the daemon at a random instant inside it (the phase at
          the kill is asked from /status just before the signal; a kill that found the daemon idle is
          recorded and not counted), restart it, wait until it is idle, and check
          the invariants: every line accounted exactly once with the expected outcome, every file moved
          out of the inbox, no run left unfinished (each resumed to success or failed with a reason), the
          champion alias on a complete adapter whose sha256 matches and that the server serves, no
          half-registered adapter folder, SQLite integrity_check and foreign_key_check clean.
  faults  disk full (RLIMIT_FSIZE) during a checkpoint and during adapter registration, corrupted
          checkpoint / adapter / database page, out of memory in training; each must fail cleanly with a
          reason while the champion and the server are untouched (see tests/test_reliability_faults.py,
          which runs the same scenarios in CI: this part runs them through pytest and counts them).
  fuzz    hypothesis over every ingest parser and schemathesis over the HTTP API (OpenAPI document in
          tests/test_fuzz_api.py), through pytest with larger example counts (LORAD_FUZZ_EXAMPLES).
  load    wrk against POST /v1/chat/completions of a real ``lorad serve`` for --load-seconds while the
          champion is swapped through /admin/promote twice a second: status codes counted by a Lua script
          (429 = intended backpressure), latency percentiles from wrk.

The machine is usually shared (2 cores, several jobs): the load average is recorded with the results.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import random
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
from bench import _common  # noqa: E402

PHASES = ("ingest", "drift", "train", "eval", "promote", "swap")
TOKEN = "reliability-admin-token"
WORDS = ("the law court contract judge party shall must not be by with for what who where when how why yes no "
         "hello world model data answer question").split()


# ----------------------------------------------------------------------------- small helpers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(method: str, url: str, body: dict | None = None, token: str | None = None,
         timeout: float = 10.0) -> tuple[int, dict | str]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            raw = r.read()
            code = r.status
    except urllib.error.HTTPError as e:
        raw, code = e.read(), e.code
    try:
        return code, json.loads(raw)
    except ValueError:
        return code, raw.decode(errors="replace")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def build_tiny_model(directory: Path, seed: int = 0) -> Path:
    """A tiny random Llama (2 layers, hidden 64) with a word-level tokenizer and a chat template."""
    import torch
    from transformers import LlamaForCausalLM

    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import build_tiny_tokenizer, tiny_llama_config

    tokenizer = build_tiny_tokenizer()
    torch.manual_seed(seed)
    LlamaForCausalLM(tiny_llama_config(vocab_size=len(tokenizer))).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def daemon_config(work: Path, model_dir: Path, port: int, **over) -> dict:
    """A config for a fast learning cycle on the tiny model: every batch drifts, trains 8 steps, is judged."""
    regression = work / "regression.jsonl"
    if not regression.exists():
        rng = random.Random(99)
        with open(regression, "w") as f:
            for i in range(30):
                f.write(json.dumps({"query": " ".join(rng.choice(WORDS) for _ in range(5)) + f" r{i}",
                                    "response": " ".join(rng.choice(WORDS) for _ in range(8))}) + "\n")
    cfg = {
        "paths": {"state_dir": str(work / "state"), "inbox": str(work / "inbox")},
        "model": {"base_model": str(model_dir)},
        "data": {"max_seq_len": 128, "max_prompt_tokens": 64, "max_response_tokens": 64, "holdout_fraction": 0.2,
                 "near_dup_threshold": 1.0},
        # alpha 0.9 and no effect floor: (nearly) every batch counts as drift, so every trial runs a full cycle.
        "drift": {"min_reference": 20, "min_current": 20, "reference_cap": 100, "permutations": 50, "alpha": 0.9,
                  "effect_size_floor": 0.0, "max_tokens": 32},
        "train": {"lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "learning_rate": 3e-2, "max_steps": 8,
                  "micro_batch_size": 4, "grad_accum_steps": 1, "checkpoint_every_steps": 2, "warmup_ratio": 0.0},
        "eval": {"max_examples": 20, "bootstrap_samples": 100, "latency_prompts": 0, "confidence": 0.6,
                 "regression_sets": [str(regression)]},
        "promote": {"regression_tolerance": 0.9, "min_improvement": 0.0},
        "serve": {"host": "127.0.0.1", "port": port, "admin_token": TOKEN, "max_new_tokens": 16,
                  "max_prompt_tokens": 64, "drain_timeout_seconds": 2.0},
        "schedule": {"min_new_records": 20, "cooldown_minutes": 0, "inbox_settle_seconds": 0.2},
        "metrics": {"log_format": "json"},
    }
    for section, values in over.items():
        cfg.setdefault(section, {}).update(values)
    return cfg


# ----------------------------------------------------------------------------- data with known outcomes


class DataMaker:
    """Writes inbox files whose every line's outcome (accepted / duplicate / rejected) is known in advance."""

    def __init__(self, seed: int):
        self.rng = random.Random(seed)
        self.seen: list[str] = []   # lines accepted so far (their exact JSON): re-sending one is a duplicate
        self.n = 0

    def line(self) -> str:
        self.n += 1
        q = " ".join(self.rng.choice(WORDS) for _ in range(self.rng.randint(3, 7)))
        a = " ".join(self.rng.choice(WORDS[:8]) for _ in range(self.rng.randint(5, 10)))
        return json.dumps({"query": f"{q} q{self.n}", "response": a})

    def write(self, path: Path, n_new: int) -> dict:
        """Write the file atomically (temp name + rename, as a careful producer would) and return the expectation."""
        lines, expect = [], {"accepted": 0, "duplicates": 0, "rejected": 0}
        fresh = [self.line() for _ in range(n_new)]
        lines += fresh
        expect["accepted"] += n_new
        for line in self.rng.sample(fresh, min(5, len(fresh))):       # repeated inside the file
            lines.append(line)
            expect["duplicates"] += 1
        for line in self.rng.sample(self.seen, min(5, len(self.seen))):  # sent before, in an earlier file
            lines.append(line)
            expect["duplicates"] += 1
        bad = ['{"query": "no response here"}', "{not json", '{"query": "", "response": "empty prompt"}']
        lines += bad
        expect["rejected"] += len(bad)
        self.rng.shuffle(lines)
        # Duplicates count from the second occurrence: the first copy of a line repeated inside the file
        # is the accepted one, whichever position the shuffle gives it.
        self.seen += fresh
        tmp = path.with_name(path.name + ".part")
        tmp.write_text("\n".join(lines) + "\n")
        os.replace(tmp, path)
        expect["records_total"] = len(lines)
        expect["sha256"] = sha256_file(path)
        return expect


# ----------------------------------------------------------------------------- the daemon under test


class DaemonUnderTest:
    """``lorad run`` as a subprocess; its JSON log goes to a file; SIGKILL or SIGTERM it."""

    def __init__(self, work: Path, config_path: Path, port: int):
        self.work, self.config_path, self.port = work, config_path, port
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None
        self.log_path = work / "daemon.log"
        self.starts = 0
        self.signalled_at: float | None = None

    def start(self) -> None:
        self.starts += 1
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "daemon.cli", "run", "-c", str(self.config_path)],
                                     cwd=ROOT, stdout=log, stderr=log, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        log.close()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.signalled_at = time.monotonic()
            self.proc.wait(30)

    def stop(self, timeout: float = 60) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def status(self) -> dict | None:
        try:
            code, body = http("GET", self.url + "/status", timeout=5)
        except OSError:
            return None
        return body if code == 200 and isinstance(body, dict) else None

    def ready(self) -> dict | None:
        try:
            code, body = http("GET", self.url + "/readyz", timeout=5)
        except OSError:
            return None
        return body if code == 200 and isinstance(body, dict) else None

    def wait_healthy(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"daemon exited with {self.proc.returncode}; see {self.log_path}")
            try:
                if http("GET", self.url + "/healthz", timeout=5)[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise TimeoutError(f"daemon not healthy after {timeout} s; see {self.log_path}")

    def wait_ready(self, timeout: float = 300) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"daemon exited with {self.proc.returncode}; see {self.log_path}")
            r = self.ready()
            if r is not None:
                return r
            time.sleep(0.1)
        raise TimeoutError(f"daemon not ready after {timeout} s; see {self.log_path}")


class StageWatcher:
    """Polls /status every few milliseconds and remembers when each learning-cycle stage was first seen."""

    def __init__(self, daemon: DaemonUnderTest, interval: float = 0.01):
        self.daemon, self.interval = daemon, interval
        self.stage: str | None = None
        self.handed_over: float | None = None   # when the inbox went from pending to none: ingest starts
        self.first_seen: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            s = self.daemon.status()
            if s is None:  # a slow answer under load: keep the last stage seen
                time.sleep(self.interval)
                continue
            stage = (s.get("job") or {}).get("stage")
            self.stage = stage
            pending = bool(s.get("inbox_pending"))
            if pending:
                self._pending_seen = True
            elif getattr(self, "_pending_seen", False) and self.handed_over is None:
                self.handed_over = time.monotonic()
            if stage and stage not in self.first_seen:
                self.first_seen[stage] = time.monotonic()
            time.sleep(self.interval)

    def __enter__(self) -> "StageWatcher":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)

    def wait_for(self, stage: str, timeout: float) -> bool:
        """Until ``stage`` was seen; False when the cycle went idle past it (e.g. a rejected candidate)."""
        deadline = time.monotonic() + timeout
        idle_polls = 0
        while time.monotonic() < deadline:
            if stage in self.first_seen:
                return True
            if not self.daemon.alive():
                return False
            idle_polls = idle_polls + 1 if self.stage is None else 0
            # Idle about 3 s after a job ran, or 15 s with none at all: the cycle will not reach the stage.
            if idle_polls > (300 if self.first_seen else 1500):
                return False
            time.sleep(0.01)
        return False


# ----------------------------------------------------------------------------- invariants


def unfinished_work(state: Path, inbox: Path) -> list[str]:
    """What still has to happen before the daemon is idle: files in the inbox, runs not finished."""
    out = []
    for p in inbox.rglob("*"):
        rel = p.relative_to(inbox)
        if p.is_file() and not any(part.startswith(".") for part in rel.parts) and not p.name.endswith(".part"):
            out.append(f"inbox file {rel}")
    db = state / "lorad.db"
    if db.exists():
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
        try:
            for r in con.execute("SELECT id, status FROM runs WHERE status IN ('queued', 'running', 'interrupted')"):
                out.append(f"run {r[0]} {r[1]}")
        finally:
            con.close()
    return out


def wait_idle(daemon: DaemonUnderTest, state: Path, inbox: Path, timeout: float = 900) -> None:
    """Until the inbox is empty, no run is unfinished and the job runner has been idle for two polls."""
    deadline = time.monotonic() + timeout
    quiet = 0
    while time.monotonic() < deadline:
        if not daemon.alive():
            raise RuntimeError(f"daemon exited with {daemon.proc.returncode}; see {daemon.log_path}")
        s = daemon.status()
        busy = s is None or s.get("job") is not None or s.get("inbox_pending") or unfinished_work(state, inbox)
        quiet = 0 if busy else quiet + 1
        if quiet >= 3:
            return
        time.sleep(0.5)
    raise TimeoutError(f"daemon not idle after {timeout} s: {unfinished_work(state, inbox)}; "
                       f"job {(daemon.status() or {}).get('job')}")


def check_invariants(state: Path, inbox: Path, files: dict[str, dict], *, served: dict | None = None) -> list[str]:
    """Every invariant the crash rule promises; returns the violations (empty = all hold).

    Args:
        files: name -> expectation from ``DataMaker.write`` for every file dropped so far.
        served: the daemon's /readyz body (its ``champion``), when it runs.
    """
    from daemon import registry
    from daemon.store import Store

    problems: list[str] = []
    db_path = state / "lorad.db"
    con = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=60)
    con.row_factory = sqlite3.Row
    try:
        integrity = "; ".join(r[0] for r in con.execute("PRAGMA integrity_check"))
        if integrity != "ok":
            problems.append(f"sqlite integrity_check: {integrity}")
        fk = con.execute("PRAGMA foreign_key_check").fetchall()
        if fk:
            problems.append(f"sqlite foreign_key_check: {len(fk)} rows, first {tuple(fk[0])}")

        # Every line accounted exactly once, with the outcome it must have.
        total_accepted = 0
        for name, exp in files.items():
            rows = con.execute("SELECT * FROM files WHERE sha256 = ?", (exp["sha256"],)).fetchall()
            if len(rows) != 1:
                problems.append(f"file {name}: {len(rows)} ingest rows (expected exactly 1)")
                continue
            row = rows[0]
            got = {k: row[k] for k in ("records_total", "accepted", "duplicates", "rejected")}
            want = {k: exp[k] for k in got}
            if row["status"] != "done" or got != want:
                problems.append(f"file {name}: status {row['status']} counts {got}, expected done {want}")
            stored = con.execute("SELECT COUNT(*) FROM records WHERE file_id = ?", (row["id"],)).fetchone()[0]
            outcomes = con.execute("SELECT COUNT(*) FROM rejects WHERE file_id = ?", (row["id"],)).fetchone()[0]
            if stored != row["accepted"] or outcomes != row["duplicates"] + row["rejected"]:
                problems.append(f"file {name}: {stored} stored records / {outcomes} reject rows disagree with its "
                                f"counts {got}")
            total_accepted += exp["accepted"]
            if (inbox / name).exists():
                problems.append(f"file {name}: still in the inbox")
            if not list((inbox / ".done").glob(f"{Path(name).stem}*{Path(name).suffix}")):
                problems.append(f"file {name}: not in .done/")
        n_records = con.execute("SELECT COUNT(*) FROM records").fetchone()[0]
        if n_records != total_accepted:
            problems.append(f"{n_records} records stored, {total_accepted} lines accepted")

        # No run lost: each finished, failures with a reason; every success registered an adapter.
        for r in con.execute("SELECT id, status, reason, result FROM runs"):
            if r["status"] not in ("succeeded", "failed"):
                problems.append(f"run {r['id']}: left {r['status']}")
            elif r["status"] == "failed" and not (r["reason"] or "").strip():
                problems.append(f"run {r['id']}: failed without a reason")
            elif r["status"] == "succeeded":
                version = json.loads(r["result"] or "{}").get("version")
                if con.execute("SELECT 1 FROM adapters WHERE version = ? AND run_id = ?",
                               (version, r["id"])).fetchone() is None:
                    problems.append(f"run {r['id']}: succeeded but its adapter {version} is not registered")
                # Its candidate was judged: an evaluation decision, and a promotion outcome when the gate passed.
                judged = con.execute("SELECT ok FROM events WHERE kind = 'eval' AND subject = ? AND ok IS NOT NULL "
                                     "ORDER BY id DESC LIMIT 1", (version,)).fetchone()
                promoted = con.execute("SELECT 1 FROM events WHERE kind = 'promote' AND subject = ?",
                                       (version,)).fetchone()
                if judged is None and promoted is None:
                    problems.append(f"run {r['id']}: candidate {version} was never evaluated")
                elif judged is not None and judged["ok"] and promoted is None:
                    problems.append(f"run {r['id']}: candidate {version} passed the gate but was never promoted")

        # Champion: a complete adapter whose hashes match (and the one being served).
        champ = con.execute("SELECT version FROM aliases WHERE name = 'champion'").fetchone()
        champ = champ["version"] if champ else None
        known = {r["version"] for r in con.execute("SELECT version FROM adapters")}
    finally:
        con.close()
    if champ is not None:
        store = Store(db_path, readonly=True)
        try:
            registry.verify_adapter(store, champ)
            row = registry.get_adapter(store, champ)
            if sha256_file(Path(row["path"]) / "adapter_model.safetensors") != row["sha256"]:
                problems.append(f"champion {champ}: weights sha256 differs from the registry")
        except registry.AdapterError as e:
            problems.append(f"champion {champ}: {e}")
        finally:
            store.close()
    if served is not None and served.get("champion") != (champ or "base"):
        problems.append(f"server serves {served.get('champion')!r} but the champion alias is {champ!r}")
    adapters = state / "adapters"
    if adapters.is_dir():
        for p in adapters.iterdir():
            if p.name not in known:
                problems.append(f"adapters/{p.name}: folder without a registry row")
    return problems


# ----------------------------------------------------------------------------- crash trials


def safety_violations(state: Path, inbox: Path, files: dict[str, dict], served: dict | None) -> list[str]:
    """What must hold right after any restart, whatever instant the kill hit.

    A file is ingested once or not yet (never twice, never partly); stored records match the files that
    committed; no run is 'running' without a live process; failures have reasons; the champion is a
    complete, verified adapter and the one served; no half-registered adapter folder; SQLite is intact.
    """
    committed = {name: exp for name, exp in files.items() if _file_rows(state, exp["sha256"]) > 0}
    problems = [p for p in check_invariants(state, inbox, committed, served=served)
                if "still in the inbox" not in p and "not in .done/" not in p and "left queued" not in p
                and "left interrupted" not in p and "left running" not in p and "never evaluated" not in p
                and "never promoted" not in p]
    con = sqlite3.connect(f"file:{state / 'lorad.db'}?mode=ro", uri=True, timeout=60)
    try:
        for run_id, pid in con.execute("SELECT id, pid FROM runs WHERE status = 'running'"):
            if not pid or not Path(f"/proc/{pid}").exists():
                problems.append(f"run {run_id}: 'running' but its process {pid} is gone")
    finally:
        con.close()
    return problems


def _file_rows(state: Path, sha: str) -> int:
    con = sqlite3.connect(f"file:{state / 'lorad.db'}?mode=ro", uri=True, timeout=60)
    try:
        return con.execute("SELECT COUNT(*) FROM files WHERE sha256 = ?", (sha,)).fetchone()[0]
    finally:
        con.close()


def crash_trials(n: int, work: Path, *, seed: int = 0, lines_per_file: int = 400, phases: tuple = PHASES,
                 max_attempts: int | None = None, log=print) -> dict:
    """SIGKILL a real daemon at random instants of its learning cycle until ``n`` kills landed inside a
    non-idle phase (at most ``max_attempts`` kills, default 3n); check invariants after each.

    Trials come in chains: a data file is dropped, then the daemon is killed once in each phase of
    ``phases`` in turn (each restart resumes the interrupted cycle, so the next phase comes next). After
    every restart the safety invariants are checked (``safety_violations``); at the end of each chain,
    once the daemon is idle, the complete ones (``check_invariants``: everything accounted and finished).

    The phase at each kill is asked from /status just before the signal and the inbox just after
    (``classify_kill``); a kill that found the daemon idle is recorded but not counted, and its chain ends
    (the cycle is over), so the next chain places the kills again.

    Returns:
        ``{"trials": [...], "violations": [...], "kills_in_cycle": counted, "kills_total": all,
        "phases_at_kill": {phase: count}, "chains": k}``.
    """
    max_attempts = 3 * n if max_attempts is None else max_attempts
    work.mkdir(parents=True, exist_ok=True)
    model_dir = work / "tiny-model"
    if not (model_dir / "config.json").exists():
        build_tiny_model(model_dir)
    port = free_port()
    cfg_path = work / "config.yaml"
    import yaml

    cfg_path.write_text(yaml.safe_dump(daemon_config(work, model_dir, port)))
    state, inbox = work / "state", work / "inbox"
    inbox.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    maker = DataMaker(seed)
    files: dict[str, dict] = {}
    daemon = DaemonUnderTest(work, cfg_path, port)
    durations = {p: 3.0 for p in PHASES}     # learnt from earlier trials: how long each stage lasts
    durations.update(ingest=0.1, promote=0.3, swap=0.3)
    trials, all_violations, chains = [], [], 0
    daemon.start()
    try:
        daemon.wait_ready()
        counted = attempts = 0
        while counted < n and attempts < max_attempts:
            chains += 1
            name = f"batch-{chains:03d}.jsonl"
            for target in phases:
                if counted >= n or attempts >= max_attempts:
                    break
                with StageWatcher(daemon) as watch:
                    if target == phases[0]:
                        files[name] = maker.write(inbox / name, lines_per_file)
                    kill_after, reached = _pick_kill_instant(target, watch, rng, durations)
                    at_kill = _kill_and_classify(daemon, inbox / name)
                    learn_stage_durations(durations, watch.first_seen)
                t0 = time.monotonic()
                daemon.start()
                # Checked as soon as the restarted daemon answers /healthz (its recovery at startup is done then,
                # while the model still loads): the next kill may come before it is ready to serve.
                daemon.wait_healthy()
                restart_s = time.monotonic() - t0
                violations = safety_violations(state, inbox, files, None)
                in_cycle = at_kill["phase"] not in ("idle", "unknown")
                counted += in_cycle
                attempts += 1
                trials.append({"trial": attempts - 1, "chain": chains, "target_phase": target,
                               "phase_reached": reached, **at_kill, "counted": in_cycle,
                               "kill_after_s": round(kill_after, 3), "restart_s": round(restart_s, 1),
                               "violations": violations})
                all_violations += [f"trial {attempts - 1}: {v}" for v in violations]
                log(f"crash kill {attempts} ({counted}/{n} in the cycle): target {target}, killed in "
                    f"{at_kill['phase']} +{kill_after:.2f}s, ready again in {restart_s:.1f}s, violations "
                    f"{len(violations)}" + (f": {violations}" if violations else ""))
                if not in_cycle:
                    break   # the cycle is over: later phases of this chain would hit an idle daemon too
            t0 = time.monotonic()
            daemon.wait_ready()
            wait_idle(daemon, state, inbox)
            final = check_invariants(state, inbox, files, served=daemon.ready())
            trials[-1]["chain_end_violations"] = final
            trials[-1]["chain_settle_s"] = round(time.monotonic() - t0, 1)
            all_violations += [f"chain {chains} end: {v}" for v in final]
            log(f"chain {chains} settled in {time.monotonic() - t0:.1f}s, violations {len(final)}"
                + (f": {final}" if final else ""))
    finally:
        daemon.stop()
    counts: dict[str, int] = {}
    for t in trials:
        counts[t["phase"]] = counts.get(t["phase"], 0) + 1
    return {"trials": trials, "violations": all_violations, "kills_in_cycle": counted, "kills_total": len(trials),
            "phases_at_kill": counts, "chains": chains, "files": len(files),
            "lines": sum(f["records_total"] for f in files.values()), "lines_per_file": lines_per_file}


def classify_kill(status: dict | None, file_in_inbox: bool) -> str:
    """The learning-cycle phase a kill landed in, from /status asked just before it and the inbox just after.

    A job stage (drift_warm, drift, train, eval, promote) wins; otherwise a data file still in the inbox
    that the watcher has handed on (nothing pending) is being ingested; a file still settling
    (``inbox_settle``) or no work at all (``idle``) is not inside the cycle's work. ``unknown``: /status did
    not answer (a daemon too busy to answer is not idle, but we cannot say in which phase it was).
    """
    if status is None:
        return "unknown"
    stage = (status.get("job") or {}).get("stage")
    if stage:
        return stage
    if file_in_inbox:
        return "inbox_settle" if status.get("inbox_pending") else "ingest"
    return "idle"


def _kill_and_classify(daemon: DaemonUnderTest, data_file: Path) -> dict:
    """SIGKILL the daemon right after asking its phase; returns the phase and how old that answer was."""
    status = daemon.status()
    asked = time.monotonic()
    daemon.kill()
    stale_ms = ((daemon.signalled_at or asked) - asked) * 1000   # the answer to the signal, not to the reaping
    in_inbox = data_file.exists()
    phase = classify_kill(status, in_inbox)
    if phase == "inbox_settle":
        phase = "idle"   # waiting for a file to settle is not work a kill can interrupt
    # A job (e.g. drift_warm) and the ingest of the file can run at once: the job names the phase, the
    # flag says the ingest was cut too.
    return {"phase": phase, "status_to_kill_ms": round(stale_ms, 1),
            "file_in_inbox": in_inbox, "inbox_pending": (status or {}).get("inbox_pending")}


def learn_stage_durations(durations: dict[str, float], first_seen: dict[str, float]) -> None:
    """Crude stage lengths for the next trials: from each stage's first sighting to the next stage's.

    The job runner may report stages no table here names (``drift_warm``): the first sighting is their estimate.
    """
    for stage, t in first_seen.items():
        nxt = [u for u in first_seen.values() if u > t]
        if nxt:
            seen = min(nxt) - t
            durations[stage] = 0.5 * durations[stage] + 0.5 * seen if stage in durations else seen


def _pick_kill_instant(target: str, watch: StageWatcher, rng: random.Random, durations: dict) -> tuple[float, bool]:
    """Sleep until a random instant of the target phase; returns (seconds after the phase began, reached)."""
    if target == "ingest":
        # Ingest of a few hundred lines takes a fraction of a second once the inbox watcher hands the file on
        # (its pending count drops to 0), and the drift job follows at once: kill soon after the hand-over.
        deadline = time.monotonic() + 30
        while watch.handed_over is None and time.monotonic() < deadline:
            time.sleep(0.005)
        delay = rng.uniform(0.0, durations["ingest"])
        time.sleep(delay)
        return delay, watch.handed_over is not None
    stage = {"swap": "promote"}.get(target, target)
    reached = watch.wait_for(stage, timeout=300)
    if not reached:
        return 0.0, False
    if target == "promote":
        delay = rng.uniform(0.0, 0.5 * durations["promote"])    # the registry flip and the preload start
    elif target == "swap":
        delay = rng.uniform(0.5 * durations["promote"], durations["promote"])  # pointer flip, drain
    else:
        delay = rng.uniform(0.0, durations.get(stage, 3.0))
    time.sleep(delay)
    return delay, True


# ----------------------------------------------------------------------------- load


WRK_SCRIPT = r"""
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"model": "lorad", "messages": [{"role": "user", "content": "what is the law of the court"}], "max_tokens": 8}'
local threads = {}
function setup(thread) table.insert(threads, thread) end
function init(args) n2xx = 0; n429 = 0; nother = 0; other_code = 0 end
function response(status, headers, body)
  if status >= 200 and status < 300 then n2xx = n2xx + 1
  elseif status == 429 then n429 = n429 + 1
  else nother = nother + 1; other_code = status end
end
function done(summary, latency, requests)
  local a, b, c, code = 0, 0, 0, 0
  for _, t in ipairs(threads) do
    a = a + t:get("n2xx"); b = b + t:get("n429"); c = c + t:get("nother")
    if t:get("other_code") ~= 0 then code = t:get("other_code") end
  end
  local e = summary.errors
  io.write(string.format('LORAD_WRK {"requests": %d, "duration_us": %d, "status_2xx": %d, "status_429": %d, ' ..
    '"status_other": %d, "other_code": %d, "socket_errors": {"connect": %d, "read": %d, "write": %d, ' ..
    '"timeout": %d}, "latency_ms": {"mean": %.2f, "p50": %.2f, "p90": %.2f, "p99": %.2f, "max": %.2f}}\n',
    summary.requests, summary.duration, a, b, c, code, e.connect, e.read, e.write, e.timeout,
    latency.mean / 1000, latency:percentile(50) / 1000, latency:percentile(90) / 1000,
    latency:percentile(99) / 1000, latency.max / 1000))
end
"""


def load_test(work: Path, seconds: int = 20, connections: int = 8, swap_interval: float = 0.5,
              log=print) -> dict:
    """wrk against a real ``lorad serve`` while the champion is promoted back and forth through /admin."""
    sys.path.insert(0, str(ROOT / "tests"))
    from test_fuzz_api import TOKEN as API_TOKEN, start_serve

    wrk = shutil.which("wrk")
    if wrk is None:
        raise RuntimeError("wrk is not installed: `make system-deps` (Debian package wrk) installs it")
    work.mkdir(parents=True, exist_ok=True)
    # A queue longer than the connections: every request is admitted, so any non-2xx is unintended.
    proc, url, world = start_serve(work, max_queue=2 * connections, n_adapters=3)
    script = work / "chat.lua"
    script.write_text(WRK_SCRIPT)
    swaps = {"ok": 0, "failed": 0, "errors": []}
    stop = threading.Event()

    def swapper() -> None:
        versions = world["versions"]
        i = 0
        while not stop.is_set():
            i += 1
            code, body = http("POST", url + "/admin/promote", {"version": versions[i % len(versions)],
                                                               "reason": "load test"}, token=API_TOKEN, timeout=60)
            if code == 200:
                swaps["ok"] += 1
            else:
                swaps["failed"] += 1
                swaps["errors"].append(f"{code}: {str(body)[:200]}")
            stop.wait(swap_interval)

    t = threading.Thread(target=swapper, daemon=True)
    try:
        t.start()
        res = subprocess.run([wrk, "-t2", f"-c{connections}", f"-d{seconds}s", "--timeout", "60s", "--latency",
                              "-s", str(script), url + "/v1/chat/completions"],
                             capture_output=True, text=True, timeout=seconds + 120)
        stop.set()
        t.join(90)
        line = next((ln for ln in res.stdout.splitlines() if ln.startswith("LORAD_WRK ")), None)
        if line is None:
            raise RuntimeError(f"wrk printed no result: {res.stdout[-2000:]} {res.stderr[-2000:]}")
        out = json.loads(line[len("LORAD_WRK "):])
        alive = proc.poll() is None
        code, _ = http("GET", url + "/healthz")
    finally:
        stop.set()
        if proc.poll() is None:
            proc.terminate()
            proc.wait(60)
    unintended = out["status_other"] + sum(out["socket_errors"].values())
    result = {"tool": "wrk " + (subprocess.run([wrk, "-v"], capture_output=True, text=True).stdout.split()[:2] or
                                ["?"])[-1], "endpoint": "POST /v1/chat/completions", "seconds": seconds,
              "connections": connections, "max_queue": 2 * connections, "max_tokens": 8,
              **out, "requests_per_second": round(out["requests"] / max(1e-9, out["duration_us"] / 1e6), 2),
              "unintended_errors": unintended, "swaps_ok": swaps["ok"], "swaps_failed": swaps["failed"],
              "swap_errors": swaps["errors"][:5], "server_alive_after": alive and code == 200,
              "model": "tiny random Llama (2 layers, hidden 64) with 3 LoRA adapters, CPU"}
    log(f"load: {out['requests']} requests in {seconds}s, 2xx {out['status_2xx']}, 429 {out['status_429']}, "
        f"unintended {unintended}, p50 {out['latency_ms']['p50']} ms, p99 {out['latency_ms']['p99']} ms, "
        f"{swaps['ok']} swaps ({swaps['failed']} failed)")
    return result


# ----------------------------------------------------------------------------- faults and fuzzing (through pytest)


def run_pytest(files: list[str], env: dict | None = None, timeout: float = 3600) -> dict:
    """Run test files with pytest; returns per-test outcomes from its JUnit XML report."""
    import xml.etree.ElementTree as ET

    with tempfile.TemporaryDirectory() as d:
        xml = Path(d) / "junit.xml"
        res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}",
                              *files], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                             env={**os.environ, **(env or {})})
        tests = []
        for case in ET.parse(xml).getroot().iter("testcase"):
            outcome = "passed"
            for tag in ("failure", "error", "skipped"):
                el = case.find(tag)
                if el is not None:
                    outcome = {"failure": "failed", "error": "failed"}.get(tag, tag)
                    detail = (el.get("message") or "")[:300]
                    break
            else:
                detail = ""
            tests.append({"test": case.get("name"), "outcome": outcome, "seconds": round(float(case.get("time", 0)), 1),
                          **({"detail": detail} if detail else {})})
    return {"exit_code": res.returncode, "tests": tests, "tail": res.stdout[-1500:] if res.returncode else ""}


def fault_suite(log=print) -> dict:
    """Every resource-fault scenario of tests/test_reliability_faults.py (real faults; see that file)."""
    out = run_pytest(["tests/test_reliability_faults.py"])
    injected = len([t for t in out["tests"] if t["outcome"] != "skipped"])
    survived = len([t for t in out["tests"] if t["outcome"] == "passed"])
    log(f"faults: {survived}/{injected} injected faults survived")
    return {"faults_injected": injected, "faults_survived": survived, **out}


def fuzz_suite(examples: int, log=print) -> dict:
    """Hypothesis over the ingest parsers and schemathesis over the HTTP API with ``examples`` per property."""
    with tempfile.TemporaryDirectory() as d:
        report = Path(d) / "fuzz.jsonl"
        out = run_pytest(["tests/test_fuzz_ingest.py", "tests/test_fuzz_api.py"],
                         env={"LORAD_FUZZ_EXAMPLES": str(examples), "LORAD_FUZZ_REPORT": str(report)})
        counts = [json.loads(line) for line in report.read_text().splitlines()] if report.exists() else []
    failures = len([t for t in out["tests"] if t["outcome"] == "failed"])
    by_suite = {c["suite"]: c for c in counts}
    result = {"examples_per_property": examples, "ingest_cases": by_suite.get("ingest", {}).get("cases", 0),
              "api_cases": by_suite.get("api", {}).get("cases", 0), "failures": failures,
              "api_rss_mb": {k: by_suite.get("api", {}).get(k) for k in ("rss_start_mb", "rss_end_mb")}, **out}
    result["cases"] = result["ingest_cases"] + result["api_cases"]
    log(f"fuzz: {result['ingest_cases']} ingest files, {result['api_cases']} API requests, {failures} failures")
    return result


# ----------------------------------------------------------------------------- main


def machine_info() -> dict:
    cpu = _common.cpu_name()
    return {"platform": platform.platform(), "python": platform.python_version(), "cpu": cpu,
            "cores": os.cpu_count(), "loadavg": [round(x, 2) for x in os.getloadavg()]}


def git_commit() -> dict:
    """The commit measured and whether any tracked file differed from it (the benchmark's own code included)."""
    changed = _common.changed_files()
    return {"commit": _common.commit(), "dirty": None if changed is None else bool(changed),
            "dirty_files": changed or []}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trials", type=int, default=54,
                    help="crash kills that must land inside a non-idle phase (idle hits are recorded, not counted)")
    ap.add_argument("--lines-per-file", type=int, default=400)
    ap.add_argument("--fuzz-examples", type=int, default=150, help="examples per fuzzed property / API operation")
    ap.add_argument("--load-seconds", type=int, default=20)
    ap.add_argument("--only", default="crash,faults,fuzz,load")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", type=Path, default=None, help="working folder (default: a temporary one)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "reliability.json")
    args = ap.parse_args(argv)
    parts = set(args.only.split(","))
    work = args.work or Path(tempfile.mkdtemp(prefix="lorad-reliability-"))
    out: dict = {}
    if args.out.exists():  # parts not run this time keep their last results
        out = json.loads(args.out.read_text())
    out.update({"benchmark": "reliability", "machine": machine_info(), "git": git_commit(),
                "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    if "crash" in parts:
        t0 = time.monotonic()
        res = crash_trials(args.trials, work / "crash", seed=args.seed, lines_per_file=args.lines_per_file)
        out["crash_trials"] = res["kills_in_cycle"]   # kills that landed inside a non-idle phase
        out["invariant_violations"] = len(res["violations"])
        out["crash"] = {**res, "seconds": round(time.monotonic() - t0, 1)}
    if "faults" in parts:
        out["faults"] = fault_suite()
    if "fuzz" in parts:
        out["fuzz"] = fuzz_suite(args.fuzz_examples)
    if "load" in parts:
        out["load"] = load_test(work / "load", seconds=args.load_seconds)
    out.setdefault("crash_trials", 0)
    out.setdefault("invariant_violations", None)
    out["machine"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    # The two keys the acceptance names come first, then one line per part.
    summary = {"crash_trials": out.pop("crash_trials"), "invariant_violations": out.pop("invariant_violations")}
    if "faults" in out:
        summary.update(faults_injected=out["faults"]["faults_injected"], faults_survived=out["faults"]["faults_survived"])
    if "fuzz" in out:
        summary.update(fuzz_cases=out["fuzz"]["cases"], fuzz_failures=out["fuzz"]["failures"])
    if "load" in out:
        summary.update(load_requests=out["load"]["requests"], load_status_429=out["load"]["status_429"],
                       load_errors_unintended=out["load"]["unintended_errors"],
                       load_latency_ms=out["load"]["latency_ms"])
    for key in summary:
        out.pop(key, None)
    ordered = {**summary, **out}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(ordered, indent=2, ensure_ascii=False) + "\n")
    os.replace(tmp, args.out)
    print(json.dumps({k: v for k, v in ordered.items() if not isinstance(v, (dict, list))}, indent=2))
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if not ordered["invariant_violations"] else 1


if __name__ == "__main__":
    sys.exit(main())
