"""Hostile input against a live ``lorad run``: every attack class of issue 28; writes bench/results/attack.json.

    .venv/bin/python bench/attack.py [--fuzz-examples 100] [--only NAME,NAME] [--out PATH]

One daemon (tiny random Llama with two registered adapters, state in a temporary folder, 127.0.0.1 only)
is attacked the way an anonymous API client and someone who can write into the inbox would, while an
innocent client sends ordinary requests and a prober times /healthz every 20 ms. Each attack is a bounded
loop and says whether it held:

  rollback_anonymous  promote v2, then anonymous votes, malformed requests and hang-ups: the champion stays
  engine_nan          tiny temperature / top_p next to innocent requests in the same batch: no 500, no one else fails
  stop_strings        four 240k-character stop strings, three times: 400, /healthz stays fast
  big_prompt          a ~900 KB prompt: refused, tokenized off the event loop
  malformed           lone surrogates, wrong types, deep nesting, non-object bodies: 4xx each, never 500
  hangup              non-streaming requests whose clients leave: their rows freed within 1 s
  slow_client         a head that never ends is closed; a body that never ends gets 408
  status_leak         /status without the admin token shows no paths, PIDs or file contents
  inbox_symlink       a file swapped for a link to a file outside the inbox while it settles, and a plain link
  inbox_fifo          a FIFO in the inbox: nothing blocks, the next file is ingested
  parquet_bomb        a few-hundred-byte zstd Parquet file that decodes to 2 GB: daemon RSS growth < 1 GiB
  records_lost        a file of known records dropped at the start: every record stored once at the end
  permissions         the state folder, database and adapters private although they were 0755/0644 before start
  fuzz                schemathesis over the HTTP API (tests/test_fuzz_api.py), >= 1,000 cases

The machine is usually shared (2 cores, several jobs): the load average is recorded with the results.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sqlite3
import stat
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "tests"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))
from bench import _common  # noqa: E402
from bench.reliability import DaemonUnderTest, daemon_config, free_port, http, machine_info, run_pytest  # noqa: E402

TOKEN = "attack-admin-token-0123456789"
RELAY = "attack-feedback-relay-0123456789"  # the trusted front end's token; attackers do not have it
HEALTHZ_TARGET_MS = 100.0
RSS_TARGET_MIB = 1024.0
HANGUP_TARGET_S = 1.0


class Observers:
    """An innocent client and a /healthz prober running during every attack; they count what went wrong."""

    def __init__(self, url: str):
        self.url = url
        self.stop = threading.Event()
        self.healthz_ms: list[float] = []
        self.innocent_ok = 0
        self.innocent_failed: list[str] = []
        self.threads = [threading.Thread(target=f, daemon=True) for f in (self._probe, self._innocent)]

    def __enter__(self) -> "Observers":
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(60)

    def _probe(self) -> None:
        while not self.stop.is_set():
            t0 = time.perf_counter()
            try:
                code = http("GET", self.url + "/healthz", timeout=30)[0]
            except OSError:
                code = 0
            self.healthz_ms.append((time.perf_counter() - t0) * 1000 if code == 200 else float("inf"))
            time.sleep(0.02)

    def _innocent(self) -> None:
        body = {"model": "lorad", "prompt": "what is the law of contract", "max_tokens": 8, "temperature": 0.7}
        while not self.stop.is_set():
            try:
                code, answer = http("POST", self.url + "/v1/completions", body, timeout=60)
            except OSError as e:
                code, answer = 0, str(e)
            if code == 200:
                self.innocent_ok += 1
            else:
                self.innocent_failed.append(f"{code}: {str(answer)[:200]}")
            time.sleep(0.2)


class Attacks:
    """Each method is one attack class; it returns (passed, detail) and records 5xx answers it saw."""

    def __init__(self, daemon: DaemonUnderTest, work: Path, world: dict):
        self.daemon, self.url, self.work, self.world = daemon, daemon.url, work, world
        self.inbox = work / "inbox"
        self.state = Path(world["state"])
        self.unhandled_500: list[str] = []
        self.outside_reads: list[str] = []
        self.forced_rollbacks = 0
        self.rss_growth_mib: list[float] = []
        self.hangup_free_s: float | None = None
        self.marker = f"lorad-records-{uuid.uuid4().hex[:8]}"

    # -- helpers -----------------------------------------------------------------------------------------

    def post(self, path: str, body=None, *, raw: bytes | None = None, token: str | None = None,
             timeout: float = 60) -> tuple[int, object]:
        if raw is None:
            code, answer = http("POST", self.url + path, body, token=token, timeout=timeout)
        else:
            req = urllib.request.Request(self.url + path, data=raw, method="POST",
                                         headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=timeout) as r:
                    code, answer = r.status, r.read()[:300]
            except urllib.error.HTTPError as e:
                code, answer = e.code, e.read()[:300]
        if code >= 500 and code != 503:
            self.unhandled_500.append(f"POST {path} -> {code}: {str(answer)[:200]}")
        return code, answer

    def champion(self) -> str | None:
        return (self.daemon.ready() or {}).get("champion")

    def rss_mib(self) -> float:
        for line in Path(f"/proc/{self.daemon.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError("no VmRSS")

    def db(self) -> sqlite3.Connection:
        return sqlite3.connect(f"file:{self.state / 'lorad.db'}?mode=ro", uri=True, timeout=30)

    def wait_inbox_empty(self, timeout: float = 120) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not [p for p in self.inbox.iterdir() if not p.name.startswith(".")]:
                return True
            time.sleep(0.2)
        return False

    def raw_socket(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.daemon.port), timeout=15)

    # -- the API port -----------------------------------------------------------------------------------------

    def promote_watched(self) -> None:
        """Setup, before the timed attacks: v1 then v2 become champion, so v2 is under the post-promotion watch."""
        for version in self.world["versions"]:
            code, answer = self.post("/admin/promote", {"version": version, "reason": "attack setup"}, token=TOKEN)
            if code != 200:
                raise RuntimeError(f"setup: promoting {version} answered {code}: {answer}")

    def rollback_anonymous(self) -> tuple[bool, str]:
        v2 = self.world["versions"][-1]
        for _ in range(25):
            self.post("/v1/feedback", {"rating": -1})
            self.post("/v1/feedback", {"rating": -1, "user": "me"}, token="guessed-token")
            self.post("/v1/completions", {"prompt": "hi", "max_tokens": -1})
            self.post("/v1/completions", raw=b'{"prompt": "\\ud800"}')
            try:
                http("POST", self.url + "/v1/completions", {"prompt": "hello", "max_tokens": 16}, timeout=0.01)
            except OSError:
                pass  # hung up
        time.sleep(3)
        champion = self.champion()
        if champion != v2:
            self.forced_rollbacks += 1
        return champion == v2, f"champion after the attack: {champion} (promoted {v2})"

    def engine_nan(self) -> tuple[bool, str]:
        champion = self.champion()
        codes: dict[str, list[int]] = {"attack": [], "innocent": []}

        def send(kind: str, body: dict) -> None:
            codes[kind].append(self.post("/v1/completions", body)[0])

        threads = []
        for i in range(8):
            threads.append(threading.Thread(target=send, args=("attack", {
                "prompt": "hello world", "max_tokens": 16, ("temperature" if i % 2 else "top_p"): 1e-30})))
            threads.append(threading.Thread(target=send, args=("innocent", {
                "prompt": "the court shall", "max_tokens": 16, "temperature": 0.8})))
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        time.sleep(2)
        rolled = self.champion() != champion
        self.forced_rollbacks += rolled
        ok = all(c in (200, 400) for c in codes["attack"]) and all(c == 200 for c in codes["innocent"]) and not rolled
        return ok, f"attack codes {sorted(codes['attack'])}, innocent codes {sorted(codes['innocent'])}, " \
                   f"champion {'rolled back' if rolled else 'kept'}"

    def stop_strings(self) -> tuple[bool, str]:
        body = {"prompt": "hello world", "max_tokens": 16, "stop": ["a" * 240_000] * 4}
        codes = [self.post("/v1/completions", body, timeout=120)[0] for _ in range(3)]
        return codes == [400] * 3, f"answers {codes}"

    def big_prompt(self) -> tuple[bool, str]:
        code, answer = self.post("/v1/completions", {"prompt": "the law " * 110_000, "max_tokens": 4}, timeout=120)
        return 400 <= code < 500, f"{code}: {str(answer)[:160]}"

    def malformed(self) -> tuple[bool, str]:
        bodies = [b'{"prompt": "hello \\ud800"}', b'{"messages": [{"role": "user", "content": "\\udfff"}]}',
                  b'{"prompt": "hi", "stream": true, "stream_options": "yes"}',
                  b'{"prompt": "hi", "stream": true, "stream_options": [1]}', b"[" * 200_000, b'"text"', b"null",
                  b"[1, 2]", b"\xff\xfe", b'{"prompt": {"a": 1}}', b'{"prompt": "hi", "max_tokens": 1e309}',
                  b'{"prompt": "hi", "stop": [1, 2]}', b'{"prompt": "hi", "model": ["x"]}', b"{" * 5000]
        codes = [self.post(path, raw=raw)[0] for raw in bodies for path in ("/v1/completions", "/v1/chat/completions")]
        bad = [c for c in codes if not 400 <= c < 500]
        return not bad, f"{len(codes)} requests, answers outside 4xx: {bad}"

    def hangup(self) -> tuple[bool, str]:
        def engine() -> dict:
            code, doc = http("GET", self.url + "/status", token=TOKEN, timeout=30)
            return doc.get("engine") or {} if code == 200 and isinstance(doc, dict) else {}

        def fire_and_forget() -> None:
            try:
                http("POST", self.url + "/v1/completions", {"prompt": "the law", "max_tokens": 100,
                                                            "temperature": 1.0}, timeout=0.3)
            except OSError:
                pass

        threads = [threading.Thread(target=fire_and_forget) for _ in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        gone = time.monotonic()  # every client has hung up by now
        while time.monotonic() - gone < 30:
            e = engine()
            if e and e.get("waiting", 1) == 0 and e.get("running", 1) == 0:
                break
            time.sleep(0.02)
        self.hangup_free_s = round(time.monotonic() - gone, 3)
        return self.hangup_free_s < HANGUP_TARGET_S, f"rows freed {self.hangup_free_s} s after the last hang-up"

    def slow_client(self) -> tuple[bool, str]:
        with self.raw_socket() as sock:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
            t0 = time.monotonic()
            try:
                closed = sock.recv(1024) == b""
            except socket.timeout:
                closed = False
            head_s = time.monotonic() - t0
        with self.raw_socket() as sock:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"pro")
            answer = b""
            try:
                while chunk := sock.recv(4096):
                    answer += chunk
                    if b"\r\n\r\n" in answer:
                        break
            except socket.timeout:
                pass
        ok = closed and answer.startswith(b"HTTP/1.1 408")
        return ok, f"unfinished head closed: {closed} after {head_s:.1f} s; unfinished body: {answer[:40]!r}"

    def status_leak(self) -> tuple[bool, str]:
        code, doc = http("GET", self.url + "/status", timeout=30)
        text = json.dumps(doc)
        leaks = [s for s in (str(self.state), str(self.inbox), str(self.work), f'"pid": {self.daemon.proc.pid}')
                 if s in text]
        return code == 200 and not leaks, f"{code}; leaked: {leaks}"

    # -- the inbox ----------------------------------------------------------------------------------------

    def inbox_symlink(self) -> tuple[bool, str]:
        secret = self.work / "outside" / "secret.jsonl"
        secret.parent.mkdir(exist_ok=True)
        mark = f"outside-secret-{uuid.uuid4().hex[:8]}"
        secret.write_text("".join(json.dumps({"query": f"{mark} question {i}", "response": f"{mark} answer"}) + "\n"
                                  for i in range(30)))
        os.symlink(secret, self.inbox / "plain-link.jsonl")
        swapped = self.inbox / "swapped.csv"
        swapped.write_text("query,response\nhello,world\n")
        time.sleep(0.05)  # inside the settle time: the file is seen, then replaced by a link
        tmp = self.inbox / ".swap-link"
        os.symlink(secret, tmp)
        os.replace(tmp, swapped)
        self.wait_inbox_empty(60)
        time.sleep(2)
        with self.db() as db:
            rows = db.execute("SELECT COUNT(*) FROM records WHERE payload LIKE ?", (f"%{mark}%",)).fetchone()[0]
            rejects = db.execute("SELECT COUNT(*) FROM rejects WHERE reason LIKE ?", (f"%{mark}%",)).fetchone()[0]
        reports = [p for p in self.inbox.rglob("*") if p.is_file() and not p.is_symlink()
                   and mark in p.read_text(errors="replace")]
        status = mark in json.dumps(http("GET", self.url + "/status", token=TOKEN, timeout=30)[1])
        found = [f"{rows} records", f"{rejects} rejects", f"{len(reports)} reports", f"status: {status}"]
        leaked = rows or rejects or reports or status
        if leaked:
            self.outside_reads.append("inbox_symlink: " + ", ".join(found))
        return not leaked, "content of the file outside the inbox found in: " + ", ".join(found)

    def inbox_fifo(self) -> tuple[bool, str]:
        os.mkfifo(self.inbox / "pipe.jsonl")
        time.sleep(1)
        mark = f"after-fifo-{uuid.uuid4().hex[:8]}"
        (self.inbox / "after-fifo.jsonl").write_text(
            "".join(json.dumps({"query": f"{mark} q{i}", "response": "an answer"}) + "\n" for i in range(5)))
        deadline = time.monotonic() + 60
        stored = 0
        while time.monotonic() < deadline and stored < 5:
            with self.db() as db:
                stored = db.execute("SELECT COUNT(*) FROM records WHERE payload LIKE ?", (f"%{mark}%",)).fetchone()[0]
            time.sleep(0.3)
        return stored == 5, f"{stored}/5 records of the file dropped after the FIFO ingested within 60 s"

    def parquet_bomb(self) -> tuple[bool, str]:
        import pyarrow as pa
        import pyarrow.parquet as pq

        # One 2 MB string, dictionary-encoded 1,024 times: a few hundred bytes on disk, 2 GB decoded.
        column = pa.DictionaryArray.from_arrays(pa.array([0] * 1024, pa.int32()), pa.array(["x" * (2 << 20)]))
        table = pa.table({"query": column, "response": column})
        tmp = self.work / "bomb.parquet"
        pq.write_table(table, tmp, compression="zstd")
        size = tmp.stat().st_size
        before = self.rss_mib()
        peak = before
        os.replace(tmp, self.inbox / "bomb.parquet")
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and (self.inbox / "bomb.parquet").exists():
            peak = max(peak, self.rss_mib())
            time.sleep(0.05)
        for _ in range(20):
            peak = max(peak, self.rss_mib())
            time.sleep(0.05)
        growth = round(peak - before, 1)
        self.rss_growth_mib.append(growth)
        return growth < RSS_TARGET_MIB, f"{size} bytes on disk; daemon RSS +{growth} MiB while it was handled"

    def drop_known_records(self, n: int = 50) -> None:
        """Called before the attacks: records that must all be stored once when the attacks are over."""
        (self.inbox / "known.jsonl").write_text("".join(
            json.dumps({"query": f"{self.marker} question {i} about a contract",
                        "response": f"the court answers {i}"}) + "\n" for i in range(n)))

    def records_lost(self, n: int = 50) -> tuple[bool, str]:
        deadline = time.monotonic() + 60
        while (self.inbox / "known.jsonl").exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        with self.db() as db:
            stored = db.execute("SELECT COUNT(*) FROM records WHERE payload LIKE ?",
                                (f"%{self.marker}%",)).fetchone()[0]
        self.records_missing = n - stored
        return stored == n, f"{stored}/{n} known records stored"

    def permissions(self) -> tuple[bool, str]:
        loose = []
        for path in [self.state, *self.state.rglob("*")]:
            st = os.lstat(path)
            if not stat.S_ISLNK(st.st_mode) and stat.S_IMODE(st.st_mode) & 0o077:
                loose.append(f"{path.relative_to(self.state.parent)} {oct(stat.S_IMODE(st.st_mode))}")
        return not loose, f"{len(loose)} group/world-accessible paths: {loose[:5]}"


def fuzz(examples: int) -> dict:
    """schemathesis over the HTTP API through tests/test_fuzz_api.py (its own `lorad serve`), counted."""
    with tempfile.TemporaryDirectory() as d:
        report = Path(d) / "fuzz.jsonl"
        out = run_pytest(["tests/test_fuzz_api.py"], env={"LORAD_FUZZ_EXAMPLES": str(examples),
                                                          "LORAD_FUZZ_REPORT": str(report)})
        counts = [json.loads(line) for line in report.read_text().splitlines()] if report.exists() else []
    failed = [t for t in out["tests"] if t["outcome"] == "failed"]
    cases = sum(c.get("cases", 0) for c in counts)
    return {"cases": cases, "failed": len(failed), "passed": not failed and out["exit_code"] == 0,
            "detail": f"{cases} generated requests, {len(failed)} failing tests", "tail": out["tail"]}


ORDER = ("permissions", "status_leak", "rollback_anonymous", "malformed", "stop_strings", "big_prompt", "hangup",
         "slow_client", "engine_nan", "inbox_symlink", "inbox_fifo", "parquet_bomb", "records_lost")


def start(work: Path) -> tuple[DaemonUnderTest, dict]:
    """A tiny world (model + two registered adapters) whose state folder starts world-readable, and its daemon."""
    import yaml

    from test_engine import make_world

    world = make_world(work / "world", n_adapters=2)
    world["store"].close()
    state = Path(world["state"])
    for path in [state, *state.rglob("*")]:  # as a restored backup might be: lorad must make it private
        os.chmod(path, 0o755 if path.is_dir() else 0o644)
    port = free_port()
    cfg = daemon_config(work, world["model_dir"], port,
                        paths={"state_dir": str(state)},
                        serve={"feedback_token": RELAY, "header_timeout_seconds": 2.0, "body_timeout_seconds": 2.0,
                               "max_body_bytes": 1_000_000, "max_prompt_tokens": 64, "max_new_tokens": 100,
                               "max_batch_size": 4},
                        schedule={"train_on_drift": False, "min_new_records": 100_000},
                        promote={"rollback_window_seconds": 3600, "rollback_min_requests": 20})
    (work / "inbox").mkdir(exist_ok=True)
    config_path = work / "config.yaml"
    config_path.write_text(yaml.safe_dump(cfg))
    daemon = DaemonUnderTest(work, config_path, port)
    os.environ["LORAD_SERVE__ADMIN_TOKEN"] = TOKEN
    daemon.start()
    daemon.wait_ready(300)
    return daemon, world


def run_attacks(names: list[str], work: Path, log=print) -> tuple[list[dict], Attacks, Observers]:
    daemon, world = start(work)
    attacks = Attacks(daemon, work, world)
    results = []
    try:
        if "records_lost" in names:
            attacks.drop_known_records()
        attacks.promote_watched()
        with Observers(daemon.url) as observers:
            for name in names:
                t0, first_probe = time.monotonic(), len(observers.healthz_ms)
                try:
                    passed, detail = getattr(attacks, name)()
                except Exception as e:  # an attack that cannot even run is a failed attack, with its reason
                    passed, detail = False, f"{type(e).__name__}: {e}"
                probes = observers.healthz_ms[first_probe:]
                results.append({"attack": name, "passed": bool(passed), "detail": detail,
                                "seconds": round(time.monotonic() - t0, 1),
                                "healthz_max_ms": round(max(probes), 1) if probes else None})
                log(f"{name:20s} {'held' if passed else 'FAILED'}: {detail}")
                if not daemon.alive():
                    results.append({"attack": "daemon_alive", "passed": False, "detail": "the daemon died"})
                    break
    finally:
        code, metrics = http("GET", daemon.url + "/metrics", timeout=30) if daemon.alive() else (0, "")
        attacks.metrics_500 = sum(float(line.rsplit(" ", 1)[1]) for line in str(metrics).splitlines()
                                  if line.startswith("lorad_serve_requests_total{") and 'code="500"' in line)
        daemon.stop()
    return results, attacks, observers


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fuzz-examples", type=int, default=100, help="examples per API operation (12 operations)")
    ap.add_argument("--only", default="", help=f"comma-separated attacks among {', '.join(ORDER)}, fuzz")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "attack.json"))
    args = ap.parse_args(argv)
    names = [n for n in (args.only.split(",") if args.only else [*ORDER, "fuzz"]) if n]
    unknown = set(names) - set(ORDER) - {"fuzz"}
    if unknown:
        ap.error(f"unknown attacks: {', '.join(sorted(unknown))}")
    with tempfile.TemporaryDirectory(prefix="lorad-attack-") as d:
        results, attacks, observers = run_attacks([n for n in ORDER if n in names], Path(d))
    fuzz_result = fuzz(args.fuzz_examples) if "fuzz" in names else None
    if fuzz_result is not None:
        results.append({"attack": "fuzz", "passed": fuzz_result["passed"], "detail": fuzz_result["detail"]})
        print(f"{'fuzz':20s} {'held' if fuzz_result['passed'] else 'FAILED'}: {fuzz_result['detail']}")
    finite = [ms for ms in observers.healthz_ms if ms != float("inf")]
    dirty_files = _common.changed_files("daemon", "pipelines", "bench/attack.py") or []
    out = {
        "attacks": results,
        "passed": sum(r["passed"] for r in results),
        "total": len(results),
        "unhandled_500": len(attacks.unhandled_500) + int(getattr(attacks, "metrics_500", 0) or 0),
        "unhandled_500_seen": attacks.unhandled_500[:20],
        "innocent_failed": len(observers.innocent_failed),
        "innocent_ok": observers.innocent_ok,
        "innocent_failures_seen": observers.innocent_failed[:10],
        "outside_reads": len(attacks.outside_reads),
        "records_lost": getattr(attacks, "records_missing", None),
        "forced_rollbacks": attacks.forced_rollbacks,
        "healthz_max_ms": round(max(finite), 1) if finite else None,
        "healthz_failed": len(observers.healthz_ms) - len(finite),
        "max_rss_growth_mib": max(attacks.rss_growth_mib) if attacks.rss_growth_mib else None,
        "hangup_free_s": attacks.hangup_free_s,
        "fuzz_cases": fuzz_result["cases"] if fuzz_result else 0,
        "targets": {"healthz_max_ms": HEALTHZ_TARGET_MS, "max_rss_growth_mib": RSS_TARGET_MIB,
                    "hangup_free_s": HANGUP_TARGET_S, "fuzz_cases": 1000},
        "machine": machine_info(),
        "commit": _common.commit(),
        "dirty": bool(dirty_files),
        "dirty_files": dirty_files,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"{out['passed']}/{out['total']} attacks held; results in {args.out}")
    return 0 if out["passed"] == out["total"] else 1


if __name__ == "__main__":
    sys.exit(main())
