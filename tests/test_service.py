"""The daemon process: `lorad run` answers /healthz and `lorad status --json`, one instance per
state folder, SIGTERM drains and exits 0, runs left running by a dead process are recovered."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from daemon.config import build_config
from daemon.runs import recover_runs
from daemon.service import StateLock, read_lock_info, status_snapshot
from daemon.store import open_store

ROOT = Path(__file__).resolve().parents[1]
LORAD = [sys.executable, "-m", "daemon.cli"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def wait_for(predicate, timeout: float = 60.0, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except OSError:
            pass
        time.sleep(interval)
    raise AssertionError("condition not met in time")


def start_daemon(state: Path, port: int, env_extra: dict | None = None) -> subprocess.Popen:
    env = {**os.environ, "LORAD_METRICS__LOG_FORMAT": "json", **(env_extra or {})}
    return subprocess.Popen(LORAD + ["run", "--state", str(state), "--inbox", str(state / "inbox"),
                                     "--port", str(port)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def lorad(*args: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(LORAD + list(args), cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, **(env_extra or {})}, timeout=60)


def test_help_imports_nothing_heavy():
    code = ("import sys; from daemon.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print(sorted({'torch','transformers','fastapi','numpy','yaml'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip().endswith("[]")
    assert "usage: lorad" in out.stdout


def test_config_check_exit_codes(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lora_r: -1\nserve:\n  port: 0\n  bogus: 1\n")
    res = lorad("config", "check", "-c", str(bad))
    assert res.returncode == 2
    for needle in ("train.lora_r", "serve.port", "serve.bogus: unknown key", "3 problem(s)"):
        assert needle in res.stderr
    good = tmp_path / "good.yaml"
    good.write_text("train:\n  lora_r: 8\n")
    assert lorad("config", "check", "-c", str(good)).returncode == 0
    shown = lorad("config", "show", "-c", str(good), "--json", env_extra={"LORAD_SERVE__PORT": "9001"})
    cfg = json.loads(shown.stdout)
    assert cfg["train"]["lora_r"] == 8 and cfg["serve"]["port"] == 9001


def test_status_without_state(tmp_path):
    res = lorad("status", "--json", "--state", str(tmp_path / "none"))
    assert res.returncode == 0, res.stderr
    snap = json.loads(res.stdout)
    assert snap["initialized"] is False and snap["daemon"]["running"] is False
    assert not (tmp_path / "none").exists(), "status must not create state"


def test_state_lock_is_exclusive_and_released_by_the_kernel(tmp_path):
    lock = StateLock(tmp_path)
    lock.acquire({"pid": os.getpid(), "url": "http://x"})
    assert read_lock_info(tmp_path)["pid"] == os.getpid()
    code = f"from daemon.service import StateLock; StateLock({str(tmp_path)!r}).acquire({{'pid': 1}})"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert res.returncode != 0 and "AlreadyRunning" in res.stderr and str(os.getpid()) in res.stderr
    lock.release()
    assert read_lock_info(tmp_path) is None
    # A holder killed with SIGKILL frees the lock: no stale-lock cleanup is ever needed.
    code = (f"import os, signal; from daemon.service import StateLock; "
            f"StateLock({str(tmp_path)!r}).acquire({{'pid': os.getpid()}}); os.kill(os.getpid(), signal.SIGKILL)")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT)
    assert read_lock_info(tmp_path) is None
    StateLock(tmp_path).acquire({"pid": os.getpid()})


def test_recover_runs_marks_orphans_interrupted(tmp_path):
    s = open_store(tmp_path)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    with s.transaction() as tx:
        tx.execute("INSERT INTO runs (id, kind, status, pid, created_at) VALUES ('r-dead', 'train', 'running', ?, 0)",
                   (dead.pid,))
        tx.execute("INSERT INTO runs (id, kind, status, pid, created_at) VALUES ('r-live', 'train', 'running', ?, 0)",
                   (os.getpid(),))
    assert recover_runs(s) == ["r-dead"]
    rows = {r["id"]: r["status"] for r in s.query("SELECT id, status FROM runs")}
    assert rows == {"r-dead": "interrupted", "r-live": "running"}
    snap = status_snapshot(build_config({"paths": {"state_dir": str(tmp_path)}}), s)
    assert {r["id"] for r in snap["runs"]} == {"r-dead", "r-live"}
    assert snap["events"][0]["subject"] == "r-dead"


@pytest.mark.integration
def test_run_serves_health_status_and_stops_cleanly(tmp_path):
    state = tmp_path / "state"
    port = free_port()
    # A base model that cannot load: the daemon must stay up, live, and say why it is not ready.
    proc = start_daemon(state, port, {"LORAD_MODEL__BASE_MODEL": str(tmp_path / "no-such-model")})
    try:
        base = f"http://127.0.0.1:{port}"
        wait_for(lambda: get(base + "/healthz")[0] == 200)
        status, body = wait_for(lambda: (lambda r: r if json.loads(r[1])["status"] == "failed" else None)(
            get(base + "/readyz")))
        assert status == 503 and "no-such-model" in json.loads(body)["error"]

        snap = json.loads(lorad("status", "--json", "--state", str(state)).stdout)
        assert snap["daemon"]["running"] and snap["daemon"]["pid"] == proc.pid
        assert snap["initialized"] and snap["champion"] is None
        assert snap["events"][0]["kind"] == "daemon"

        code, metrics = get(base + "/metrics")
        assert code == 200 and b"lorad_daemon_up 1.0" in metrics

        second = lorad("run", "--state", str(state), "--port", str(free_port()))
        assert second.returncode == 3 and "another lorad" in second.stderr

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    out, err = proc.communicate()
    logs = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    assert any(entry["msg"] == "lorad stopped" for entry in logs), err[-2000:]
    snap = json.loads(lorad("status", "--json", "--state", str(state)).stdout)
    assert snap["daemon"]["running"] is False
    assert [e["subject"] for e in snap["events"][:2]] == ["stop", "start"]


def test_the_drift_warm_up_waits_until_serving_is_ready(tmp_path, monkeypatch):
    """An idle daemon queues the drift reference's warm-up only once the model serves: on a CPU the featurizing
    would share the cores with the model load and skew the engine's startup probe (bf16 or float32 weights)."""
    import threading

    from daemon.jobs import WARM, JobRunner
    from daemon.service import Daemon

    requested = []
    monkeypatch.setattr(JobRunner, "request", lambda self, trigger: requested.append(trigger) or True)
    gate = threading.Event()

    def loader(*args, **kwargs):
        gate.wait(30)
        raise RuntimeError("this test loads no model")

    cfg = build_config({"paths": {"state_dir": str(tmp_path / "state"), "inbox": str(tmp_path / "inbox")},
                        "serve": {"port": free_port()}})
    d = Daemon(cfg, model_loader=loader)
    d.startup()
    try:
        time.sleep(0.5)
        assert requested == [], "nothing is queued while the model loads"
        gate.set()
        d.ready.set()   # what _load_model does once the engine is up
        deadline = time.monotonic() + 10
        while requested != [WARM] and time.monotonic() < deadline:
            time.sleep(0.02)
        assert requested == [WARM]
    finally:
        gate.set()
        d.shutdown()
