"""A serving fleet under promotions and rollbacks; writes bench/results/fleet.json.

    .venv/bin/python bench/fleet.py [--replicas 3] [--clients 16] [--promotions 50] [--rollbacks 10]
                                    [--adapters 6] [--max-tokens 12] [--interval 0.3] [--out PATH]

Real processes on 127.0.0.1, a tiny random Llama on the CPU (this is a correctness benchmark, not a speed
one): ``--replicas`` `lorad serve` replicas and the daemon (`lorad run`, the control plane: fleet.replicas,
fleet.adapter_url; the replicas fetch each adapter from it over HTTP and check its sha256), ``--adapters``
registered adapter versions (lora_B perturbed per seed, so each answers differently), and a round-robin front:
a small asyncio proxy in its own process that gives each connection (one request) to the next replica whose
/readyz answers 200 (health-checked every 0.2 s); a replica that refuses the connection or closes it before
the first response byte is skipped and the request replayed on the next one (nginx's proxy_next_upstream).

  references  each (version, prompt) generated alone on replica 0 by name (greedy, serve.batch_invariant on,
              so a batched answer must equal it bit for bit)
  quiet       the clients for --quiet seconds with no change: the baseline request rate and failures
  churn       ``--clients`` clients stream greedy completions (model "lorad", one connection per request, so
              the front spreads them) while the champion changes --promotions + --rollbacks times through the
              daemon's POST /admin/promote (a random other version) and /admin/rollback (every 6th change).
              Each change is timed from the request until every replica reports the new champion
              (GET /admin/champion): the convergence time. Halfway, one replica is SIGKILLed during a
              promotion and restarted on its state folder; it must rejoin on the current champion (the
              daemon's reconcile loop). A response is "mixed" when its text is not its version's reference
              (x-lorad-adapter names the version, as in bench/serve_swap.py) but equals another version's.

Failed requests are split into those in flight on the killed replica when it died (a SIGKILL cuts their
streams; no front can save a half-sent response) and all others. ``multinode_loss_max_rel_diff`` is copied
from bench/results/multinode.json (the multi-node training benchmark) when that file exists, else null.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench import _common  # noqa: E402

TOKEN = "bench-fleet-admin-token-0123456789"
PROMPTS = ["the law court is", "hello world", "what is the contract of the party", "who shall be",
           "a judge must not", "question answer model", "where is the court", "the party shall"]


# ----------------------------------------------------------------------------- world


def build_world(work: Path, n_adapters: int) -> tuple[Path, Path, list[str]]:
    """A tiny random Llama folder and a daemon state folder with ``n_adapters`` registered versions."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    from daemon import registry
    from daemon.store import open_store

    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import build_tiny_tokenizer, tiny_llama_config

    tokenizer = build_tiny_tokenizer()
    model_dir = work / "tiny-model"
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config(vocab_size=len(tokenizer))).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    state = work / "daemon"
    versions = []
    with open_store(state) as store:
        for i in range(n_adapters):
            peft_model = get_peft_model(LlamaForCausalLM.from_pretrained(model_dir),
                                        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
            gen = torch.Generator().manual_seed(100 + i)
            with torch.no_grad():
                for name, param in peft_model.named_parameters():
                    if "lora_B" in name:
                        param.copy_(torch.randn(param.shape, generator=gen) * 0.5)
            peft_model.save_pretrained(work / f"adapter-{i}")
            versions.append(registry.register_adapter(store, state, work / f"adapter-{i}", base_model=str(model_dir)))
    return model_dir, state, versions


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Proc:
    """One lorad process (``serve`` or ``run``) on its own port and state folder; restartable (tests/test_fleet.py
    runs its fleet with it too)."""

    def __init__(self, name: str, command: str, state: Path, env: dict):
        self.name, self.command, self.state, self.env = name, command, state, env
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = state.parent / f"{name}.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Proc":
        self.state.mkdir(parents=True, exist_ok=True)
        argv = [sys.executable, "-m", "daemon.cli", self.command, "--state", str(self.state), "--port", str(self.port)]
        if self.command == "run":
            argv += ["--inbox", str(self.state.parent / "inbox")]
        self.proc = subprocess.Popen(argv, cwd=ROOT, env={**os.environ, **self.env}, stdout=subprocess.DEVNULL,
                                     stderr=open(self.log, "ab"))
        return self

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def http_json(method: str, url: str, body: dict | None = None, timeout: float = 120.0) -> tuple[int, dict | str]:
    import httpx

    try:
        r = httpx.request(method, url, json=body, timeout=timeout, headers={"Authorization": f"Bearer {TOKEN}"})
    except httpx.HTTPError as e:
        return 0, f"{type(e).__name__}: {e}"
    try:
        return r.status_code, r.json()
    except ValueError:
        return r.status_code, r.text


def ready(p: Proc) -> bool:
    return http_json("GET", p.url + "/readyz", timeout=5)[0] == 200


def champion_of(p: Proc) -> str | None:
    status, doc = http_json("GET", p.url + "/admin/champion", timeout=5)
    return doc["champion"] if status == 200 else None


def wait_until(predicate, timeout: float, what: str, logs: list[Path] = ()):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    tails = "\n".join(f"--- {p}\n{p.read_text(errors='replace')[-1500:]}" for p in logs if p.exists())
    raise SystemExit(f"timed out waiting for {what}\n{tails}")


# ----------------------------------------------------------------------------- the front


class Front:
    """A round-robin proxy on 127.0.0.1 in its own process: each connection (one request) goes to the next replica
    whose /readyz answered 200 at the last health check (every 0.2 s); a replica that refuses the connection or
    closes it before answering is skipped and the request goes to the next one."""

    def __init__(self, backends: list[Proc]):
        import multiprocessing

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = multiprocessing.get_context("spawn").Process(
            target=_front_process, args=(self.port, [p.port for p in backends]), daemon=True)
        self.process.start()

    def close(self) -> None:
        self.process.terminate()
        self.process.join(10)


def _front_process(port: int, backends: list[int]) -> None:
    healthy = {b: False for b in backends}
    turn = [0]

    def health() -> None:
        import urllib.request

        while True:
            for b in backends:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{b}/readyz", timeout=2) as r:
                        healthy[b] = r.status == 200
                except OSError:
                    healthy[b] = False
            time.sleep(0.2)

    async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        try:
            while data := await src.read(65536):
                dst.write(data)
                await dst.drain()
        except OSError:
            pass
        finally:
            dst.close()

    async def read_request(reader: asyncio.StreamReader) -> bytes:
        """One whole HTTP/1.1 request (head + Content-Length body): the clients send one per connection."""
        head = await reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n"):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value.strip())
        return head + (await reader.readexactly(length) if length else b"")

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await read_request(reader)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError, OSError):
            writer.close()
            return
        # As nginx's proxy_next_upstream (error, non_idempotent): a replica that refuses the connection or closes
        # it before the first response byte gets the request again on the next one. Once a byte has gone to
        # the client, a broken stream stays broken.
        for _ in range(len(backends)):
            b = backends[turn[0] % len(backends)]
            turn[0] += 1
            if not healthy[b]:
                continue
            try:
                up_reader, up_writer = await asyncio.open_connection("127.0.0.1", b)
                up_writer.write(request)
                await up_writer.drain()
                first = await up_reader.read(65536)
            except OSError:
                first = b""
            if not first:
                healthy[b] = False  # it died since the last health check
                continue
            writer.write(first)
            await writer.drain()
            await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
            return
        writer.close()

    async def main() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", port, backlog=1024)
        await server.serve_forever()

    threading.Thread(target=health, daemon=True).start()
    asyncio.run(main())


# ----------------------------------------------------------------------------- clients


def stream_completion(base_url: str, prompt: str, max_tokens: int, model: str = "lorad") -> dict:
    """POST /v1/completions with stream=true on a fresh connection; model, text, error, start and end times."""
    import httpx

    out = {"model": None, "text": "", "error": None, "prompt": prompt, "t0": time.monotonic()}
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    try:
        with httpx.Client(base_url=base_url, timeout=120, limits=httpx.Limits(max_keepalive_connections=0)) as http:
            with http.stream("POST", "/v1/completions", json=body) as r:
                if r.status_code != 200:
                    r.read()
                    out["error"] = f"HTTP {r.status_code}: {r.text[:200]}"
                else:
                    out["model"] = r.headers.get("x-lorad-adapter")
                    done = False
                    for line in r.iter_lines():
                        if line == "data: [DONE]":
                            done = True
                        elif line.startswith("data: "):
                            chunk = json.loads(line[6:])
                            if "error" in chunk:
                                out["error"] = f"stream error: {chunk['error']}"
                                break
                            if chunk.get("model") != out["model"]:
                                out["error"] = f"chunk model {chunk.get('model')} != header {out['model']}"
                            for choice in chunk.get("choices", []):
                                out["text"] += choice.get("text") or ""
                    if not done and out["error"] is None:
                        out["error"] = "stream ended without [DONE]"
    except Exception as e:  # counted, not fatal
        out["error"] = f"{type(e).__name__}: {e}"
    out["t1"] = time.monotonic()
    return out


class Clients:
    """``n`` client threads spread over ``processes`` processes (so this process's measuring is not starved)."""

    def __init__(self, url: str, n: int, max_tokens: int, processes: int = 2):
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        self._stop = ctx.Event()
        self._queue = ctx.Queue()
        ids = [list(range(n))[i::processes] for i in range(processes)]
        self._procs = [ctx.Process(target=_client_process, args=(url, part, max_tokens, self._stop, self._queue),
                                   daemon=True) for part in ids if part]
        for p in self._procs:
            p.start()

    def stop(self) -> list[dict]:
        self._stop.set()
        results = []
        for _ in self._procs:
            results += self._queue.get(timeout=300)
        for p in self._procs:
            p.join(30)
        return results


def _client_process(url: str, ids: list[int], max_tokens: int, stop: Any, queue: Any) -> None:
    results: list[dict] = []

    def run(i: int) -> None:
        k = i
        while not stop.is_set():
            results.append(stream_completion(url, PROMPTS[k % len(PROMPTS)], max_tokens))
            k += 1

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in ids]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    queue.put(results)


# ----------------------------------------------------------------------------- phases


def references(replica: Proc, daemon: Proc, versions: list[str], max_tokens: int) -> dict:
    """(version, prompt) -> greedy text, each generated alone on one replica (versions loaded one at a time)."""
    refs = {}
    for version in ["base", *versions]:
        if version != "base":
            status, doc = http_json("POST", replica.url + "/v1/load_lora_adapter",
                                    {"lora_name": version, "lora_path": f"{daemon.url}/fleet/adapters/{version}"})
            assert status == 200, doc
        for prompt in PROMPTS:
            r = stream_completion(replica.url, prompt, max_tokens, model=version)
            assert r["error"] is None and r["model"] == version, r
            refs[(version, prompt)] = r["text"]
        if version != "base":
            assert http_json("POST", replica.url + "/v1/unload_lora_adapter", {"lora_name": version})[0] == 200
    return refs


def change(daemon: Proc, replicas: list[Proc], kind: str, versions: list[str], rng: random.Random,
           kill: Proc | None = None, kill_delay: float = 0.0) -> dict:
    """One promotion (to a random other version) or rollback through the daemon, timed until every replica
    reports the new champion. With ``kill``, that replica is SIGKILLed ``kill_delay`` s after the request."""
    current = http_json("GET", daemon.url + "/readyz")[1].get("champion")
    if kind == "rollback":
        path, body = "/admin/rollback", {"reason": "bench rollback"}
    else:
        path, body = "/admin/promote", {"version": rng.choice([v for v in versions if v != current]),
                                        "reason": "bench promotion"}
    answer: dict = {}
    t0 = time.monotonic()
    def send() -> None:
        answer["status"], answer["doc"] = http_json("POST", daemon.url + path, body)

    worker = threading.Thread(target=send)
    worker.start()
    killed_at = None
    if kill is not None:
        time.sleep(kill_delay)
        killed_at = time.monotonic()
        kill.kill()
    killed_done = time.monotonic() if kill is not None else None  # kill() returns once the process is gone
    worker.join(300)
    out = {"kind": kind, "from": current, "status": answer.get("status"), "killed_at": killed_at,
           "killed_done": killed_done, "response_s": round(time.monotonic() - t0, 4)}
    if answer.get("status") != 200:
        out["error"] = str(answer.get("doc"))[:400]
        return out
    target = answer["doc"]["to"]
    fleet = answer["doc"].get("fleet") or {}
    out.update({"to": target, "unsynced": fleet.get("unsynced"),
                **{k: fleet.get(k) for k in ("load_s", "apply_s", "flip_s")}})
    live = [r for r in replicas if r is not kill]

    def serving_since(r: Proc) -> float | None:
        """When ``r`` first reported the new champion (polled until 30 s after the request)."""
        while time.monotonic() < t0 + 30:
            if champion_of(r) == target:
                return time.monotonic()
            time.sleep(0.01)
        return None

    with ThreadPoolExecutor(len(live)) as pool:
        seen = list(pool.map(serving_since, live))
    out["converged"] = all(t is not None for t in seen)
    out["request_to_all_serving_s"] = round(max(t for t in seen if t is not None) - t0, 4) if any(seen) else None
    # The promotion is the daemon's own champion flip (the end of apply); every replica flips after it.
    out["convergence_s"] = fleet.get("flip_s")
    return out


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))]


def analyse(results: list[dict], refs: dict, versions: list[str], kill_window: tuple[float, float] | None) -> dict:
    failed = [r for r in results if r["error"]]
    # in flight on the killed replica: running at any instant between the SIGKILL and the process being gone
    at_kill = [r for r in failed if kill_window and r["t0"] <= kill_window[1] and r["t1"] >= kill_window[0]]
    ok = [r for r in results if not r["error"]]
    mismatched = [r for r in ok if r["text"] != refs.get((r["model"], r["prompt"]))]
    mixed = [r for r in mismatched
             if any(r["text"] == refs[(m, r["prompt"])] for m in ["base", *versions] if m != r["model"])]
    by_version: dict = {}
    for r in ok:
        by_version[r["model"]] = by_version.get(r["model"], 0) + 1
    return {"requests": len(results), "failed_requests": len(failed),
            "failed_in_flight_on_killed_replica": len(at_kill),
            "failed_otherwise": len(failed) - len(at_kill),
            "failures": sorted({r["error"][:160] for r in failed})[:10],
            "not_equal_to_their_version_reference": len(mismatched), "mixed_version_responses": len(mixed),
            "responses_by_version": by_version}


def multinode_rel_diff() -> float | None:
    path = ROOT / "bench" / "results" / "multinode.json"
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    for key in ("multinode_loss_max_rel_diff", "loss_max_rel_diff", "max_rel_diff"):
        if isinstance(doc.get(key), (int, float)):
            return doc[key]
    return None


# ----------------------------------------------------------------------------- main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--replicas", type=int, default=3)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--promotions", type=int, default=50)
    ap.add_argument("--rollbacks", type=int, default=10)
    ap.add_argument("--adapters", type=int, default=6)
    ap.add_argument("--max-tokens", type=int, default=12)
    ap.add_argument("--interval", type=float, default=0.3, help="seconds of traffic between two changes")
    ap.add_argument("--quiet", type=float, default=5.0, help="seconds of the no-change baseline phase")
    ap.add_argument("--kill-delay", type=float, default=0.02, help="seconds after the promotion request to SIGKILL")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "fleet.json")
    args = ap.parse_args()

    git = {"commit": _common.commit(), "dirty": _common.dirty()}  # the code the processes start from
    load_before = [round(x, 2) for x in os.getloadavg()]
    t_start = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="lorad-fleet-bench-"))
    print(f"world in {work}", file=sys.stderr)
    model_dir, state, versions = build_world(work, args.adapters)
    base = {"LORAD_MODEL__BASE_MODEL": str(model_dir), "LORAD_SERVE__ADMIN_TOKEN": TOKEN,
            "LORAD_METRICS__LOG_FORMAT": "json", "LORAD_SERVE__BATCH_INVARIANT": "true",
            "LORAD_SERVE__MAX_BATCH_SIZE": "8", "LORAD_SERVE__KV_CACHE_TOKENS": "8192",
            "LORAD_SERVE__MAX_PROMPT_TOKENS": "64", "LORAD_SERVE__MAX_NEW_TOKENS": "32",
            "OMP_NUM_THREADS": "1"}  # four model processes on one host: one compute thread each, not one per core
    daemon = Proc("daemon", "run", state, dict(base))
    replicas = [Proc(f"replica-{i}", "serve", work / f"replica-{i}", {**base, "LORAD_FLEET__CONTROL_PLANE": daemon.url})
                for i in range(args.replicas)]
    daemon.env.update({"LORAD_FLEET__REPLICAS": ",".join(r.url for r in replicas),
                       "LORAD_FLEET__ADAPTER_URL": daemon.url, "LORAD_FLEET__RECONCILE_SECONDS": "0.5",
                       "LORAD_PROMOTE__ROLLBACK_WINDOW_SECONDS": "0"})  # changes here come from the bench only
    procs = [daemon, *replicas]
    front = None
    try:
        for p in procs:
            p.start()
        wait_until(lambda: all(ready(p) for p in procs), 600, "every process to be ready", [p.log for p in procs])
        print(f"ready after {time.monotonic() - t_start:.0f} s; references", file=sys.stderr)
        refs = references(replicas[0], daemon, versions, args.max_tokens)
        distinct = len({tuple(refs[(v, p)] for p in PROMPTS) for v in ["base", *versions]})
        status, doc = http_json("POST", daemon.url + "/admin/promote", {"version": versions[0], "reason": "start"})
        assert status == 200, doc
        front = Front(replicas)
        time.sleep(1.0)  # the front's first health checks

        print("quiet phase", file=sys.stderr)
        clients = Clients(front.url, args.clients, args.max_tokens)
        time.sleep(args.quiet)
        quiet_results = clients.stop()
        quiet = analyse(quiet_results, refs, versions, None)
        quiet["requests_per_second"] = round(len(quiet_results) / args.quiet, 1)

        print("churn phase", file=sys.stderr)
        rng = random.Random(0)
        clients = Clients(front.url, args.clients, args.max_tokens)
        t_churn = time.monotonic()
        changes, done = [], {"promote": 0, "rollback": 0}
        want = {"promote": args.promotions, "rollback": args.rollbacks}
        kill_record, killed = None, replicas[-1]
        i = 0
        while done["promote"] < want["promote"] or done["rollback"] < want["rollback"]:
            time.sleep(args.interval)
            kind = "rollback" if (i % 6 == 5 and done["rollback"] < want["rollback"]) or \
                done["promote"] >= want["promote"] else "promote"
            kill_now = kill_record is None and kind == "promote" and done["promote"] >= want["promote"] // 2
            c = change(daemon, replicas, kind, versions, rng, kill=killed if kill_now else None,
                       kill_delay=args.kill_delay)
            changes.append(c)
            print(f"{i:3d} {kind:8s} {c['status']} {c.get('to')} {c.get('convergence_s')} {c.get('error', '')[:120]}",
                  file=sys.stderr)
            if c["status"] == 200:
                done[kind] += 1
            if kill_now:
                t_restart = time.monotonic()
                killed.start()
                wait_until(lambda: ready(killed), 600, "the killed replica to restart", [killed.log])
                t_ready = time.monotonic()
                target = http_json("GET", daemon.url + "/readyz")[1]["champion"]
                wait_until(lambda t=target: champion_of(killed) == t, 120, "the restarted replica to rejoin",
                           [killed.log, daemon.log])
                kill_record = {"change": i, "promotion_outcome": c["status"], "error": c.get("error"),
                               "killed_after_s": args.kill_delay, "restart_to_ready_s": round(t_ready - t_restart, 2),
                               "ready_to_current_champion_s": round(time.monotonic() - t_ready, 3),
                               "rejoined_on": champion_of(killed), "current_champion": target}
                kill_record["rejoined_on_current_champion"] = kill_record["rejoined_on"] == target
            i += 1
        churn_results = clients.stop()
        churn_seconds = time.monotonic() - t_churn
        kill_window = next(((c["killed_at"], c["killed_done"]) for c in changes if c["killed_at"]), None)
        churn = analyse(churn_results, refs, versions, kill_window)
        churn["requests_per_second"] = round(len(churn_results) / churn_seconds, 1)
    finally:
        if front is not None:
            front.close()
        for p in procs:
            p.stop()

    ok = [c for c in changes if c["status"] == 200]
    conv = [c["convergence_s"] for c in ok]
    whole = [c["request_to_all_serving_s"] for c in ok if c["request_to_all_serving_s"] is not None]
    loads = [c["load_s"] for c in ok]
    result = {
        "benchmark": "bench/fleet.py", "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "git": {**git, "dirty": git["dirty"] or _common.dirty() or _common.commit() != git["commit"]},
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpu": _common.cpu_name(),
                    "cpu_count": os.cpu_count(), "load_before": load_before,
                    "load_after": [round(x, 2) for x in os.getloadavg()]},
        "setup": {"model": "tiny random Llama (2 layers, hidden 64) on the CPU, float32, serve.batch_invariant",
                  "adapters": len(versions), "distinct_reference_sets": distinct, "clients": args.clients,
                  "max_tokens": args.max_tokens, "interval_s": args.interval, "front": "asyncio round-robin per "
                  "connection (one request), health-checked on /readyz, a request without any response byte "
                  "replayed on the next replica", "control_plane": "lorad run (fleet.replicas, "
                  "fleet.adapter_url: adapters fetched over HTTP, sha256 checked)"},
        "replicas": args.replicas, "promotions": done["promote"], "rollbacks": done["rollback"],
        "requests": churn["requests"], "failed_requests": churn["failed_requests"],
        "mixed_version_responses": churn["mixed_version_responses"],
        "convergence_p99_s": pct(conv, 99),
        "multinode_loss_max_rel_diff": multinode_rel_diff(),
        "convergence_s": {"p50": pct(conv, 50), "p99": pct(conv, 99), "max": max(conv) if conv else None,
                          "measured": "by the control plane, from its own champion flip (the promotion) to the last "
                                      "replica's answer to POST /admin/champion; checked from outside: after each "
                                      "answer every live replica's GET /admin/champion names the new champion "
                                      "(changes_not_converged counts those that did not)"},
        "request_to_all_replicas_serving_s": {
            "p50": pct(whole, 50), "p99": pct(whole, 99), "max": max(whole) if whole else None,
            "measured": "by this program, from sending the change to the daemon until every live replica reports "
                        "the new champion: includes the load phase (every replica fetches, checks and loads the "
                        "version before anything flips)"},
        "load_phase_s": {"p50": pct(loads, 50), "p99": pct(loads, 99), "max": max(loads) if loads else None},
        "changes_refused": [{k: c.get(k) for k in ("kind", "status", "error")} for c in changes if c["status"] != 200],
        "changes_not_converged": sum(1 for c in ok if not c["converged"]),
        "changes": changes,
        "kill": kill_record,
        "churn": churn, "quiet_baseline": quiet,
        "targets": {"failed_requests": 0, "mixed_version_responses": 0, "convergence_p99_s": "<= 2",
                    "killed_replica_rejoins_on_current_champion": True},
        "met": {"failed_requests": churn["failed_requests"] == 0,
                "failed_requests_not_in_flight_on_the_killed_replica": churn["failed_otherwise"] == 0,
                "mixed_version_responses": churn["mixed_version_responses"] == 0,
                "convergence_p99_s": bool(conv) and pct(conv, 99) <= 2.0,
                "killed_replica_rejoins": bool(kill_record and kill_record["rejoined_on_current_champion"])},
        "seconds": round(time.monotonic() - t_start, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("replicas", "promotions", "rollbacks", "requests", "failed_requests",
                                             "mixed_version_responses", "convergence_p99_s", "met")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
