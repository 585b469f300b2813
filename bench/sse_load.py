"""Load generator for OpenAI-style streaming completions: several processes of raw asyncio HTTP/1.1 clients.

    python bench/sse_load.py --url http://127.0.0.1:8000 --clients 32 --requests 40 [--procs 4] [--models a,b]
    python bench/sse_load.py --ceiling [--clients 32 --procs 4]   # against a trivial SSE server: its own limit

Each client keeps one connection open and sends ``--requests`` streaming ``POST /v1/completions`` back to back;
time to first token is the time from writing the request to the first ``data: {`` event. The clients are
split over ``--procs`` processes that start together (each connects and sends one warm-up request first)
and whose results are merged: requests/s = all requests / (last end - first start).

Why not httpx or the openai client here: one Python process streaming 32 clients through httpx spends about
as much CPU per request as the server does, so it measures itself. Stdlib only (no lorad, no torch): the
workers start in well under a second. The ``openai`` client stays the correctness check (tests/test_server.py).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import time

NEW_TOKENS = 32
PROMPT_TOKENS = 64


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))]


def bodies(models: list[str], n_prompts: int = 64, prompt_tokens: int = PROMPT_TOKENS, new_tokens: int = NEW_TOKENS,
           vocab: int = 49152, seed: int = 3) -> list[list[bytes]]:
    """Request bodies per model (random token-id prompts, greedy, streaming), JSON-encoded once."""
    r = random.Random(seed)
    ps = [[r.randrange(100, vocab - 152) for _ in range(prompt_tokens)] for _ in range(n_prompts)]
    return [[json.dumps({"model": m, "prompt": p, "max_tokens": new_tokens, "temperature": 0,
                         "stream": True}).encode() for p in ps] for m in models]


async def _read_head(reader: asyncio.StreamReader) -> tuple[int, bool, int, bool]:
    """Status, chunked?, content length, keep-alive? of one response head."""
    status = int((await reader.readuntil(b"\r\n"))[9:12])
    chunked, length, keep = False, 0, True
    while (line := await reader.readuntil(b"\r\n")) != b"\r\n":
        name, _, value = line.partition(b":")
        name, value = name.strip().lower(), value.strip().lower()
        if name == b"transfer-encoding":
            chunked = b"chunked" in value
        elif name == b"content-length":
            length = int(value)
        elif name == b"connection":
            keep = value != b"close"
    return status, chunked, length, keep


async def stream_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, head: bytes,
                      body: bytes) -> dict:
    """One streaming request on an open connection: status, time to first token, events, [DONE] seen."""
    t0 = time.monotonic()
    writer.write(head + str(len(body)).encode() + b"\r\n\r\n" + body)
    status, chunked, length, keep = await _read_head(reader)
    first, events, done = None, 0, False
    if not chunked:
        await reader.readexactly(length)
        return {"status": status, "ttft": None, "events": 0, "done": False, "keep": keep,
                "seconds": time.monotonic() - t0}
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
        if size == 0:
            await reader.readuntil(b"\r\n")
            break
        data = await reader.readexactly(size + 2)
        if first is None and b"data: {" in data:
            first = time.monotonic() - t0
        events += data.count(b"data: ")
        done = done or b"data: [DONE]" in data
    return {"status": status, "ttft": first, "events": events, "done": done, "keep": keep,
            "seconds": time.monotonic() - t0}


async def _client(host: str, port: int, k: int, requests: int, warm: int, bodies_: list[list[bytes]],
                  go: asyncio.Event, ready: list, out: dict) -> None:
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
            f"Accept: text/event-stream\r\nContent-Length: ").encode()
    mine = bodies_[k % len(bodies_)]
    reader, writer = await asyncio.open_connection(host, port)
    try:
        for i in range(warm + requests):
            if i == warm:
                ready.append(k)
                await go.wait()
            res = await stream_once(reader, writer, head, mine[(k * 7 + i) % len(mine)])
            if i >= warm:
                out["requests"] += 1
                if res["status"] != 200 or not res["done"]:
                    out["errors"].append(res["status"])
                else:
                    out["ttfts"].append(res["ttft"])
                    out["events"] += res["events"]
            if not res["keep"]:
                writer.close()
                reader, writer = await asyncio.open_connection(host, port)
    finally:
        writer.close()


async def _worker(args) -> dict:
    from urllib.parse import urlsplit

    url = urlsplit(args.url)
    models = args.models.split(",")
    bodies_ = bodies(models, prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens, vocab=args.vocab)
    go, ready = asyncio.Event(), []
    out = {"requests": 0, "errors": [], "ttfts": [], "events": 0}
    ks = range(args.first_client, args.first_client + args.clients)
    tasks = [asyncio.create_task(_client(url.hostname, url.port, k, args.requests, args.warm, bodies_, go, ready,
                                         out)) for k in ks]
    while len(ready) < len(tasks):
        if any(t.done() for t in tasks):  # a client failed before it was ready: say why
            for t in tasks:
                if t.done():
                    t.result()
        await asyncio.sleep(0.005)
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)  # the parent's "go"
    out["start"] = time.monotonic()
    go.set()
    await asyncio.gather(*tasks)
    out["end"] = time.monotonic()
    out["cpu_s"] = time.process_time()
    return out


def run(url: str, *, clients: int = 32, requests: int = 40, procs: int | None = None, models: str = "lorad",
        warm: int = 1, prompt_tokens: int = PROMPT_TOKENS, new_tokens: int = NEW_TOKENS, vocab: int = 49152,
        timeout: float = 600) -> dict:
    """``clients`` streaming clients split over ``procs`` processes; merged requests/s and TTFT percentiles.

    Args:
        procs: worker processes (default: up to 4, never more than clients; each holds clients/procs clients).
        warm: requests each client sends before the timed start (connections opened, server paths warm).
    """
    procs = max(1, min(clients, procs or min(4, clients)))
    share = [clients // procs + (i < clients % procs) for i in range(procs)]
    workers, first = [], 0
    for n in share:
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--url", url, "--clients", str(n),
               "--first-client", str(first), "--requests", str(requests), "--warm", str(warm), "--models", models,
               "--prompt-tokens", str(prompt_tokens), "--new-tokens", str(new_tokens), "--vocab", str(vocab)]
        workers.append(subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True))
        first += n
    try:
        for w in workers:  # every worker connected and warm
            line = w.stdout.readline()
            if line.strip() != "ready":
                raise RuntimeError(f"load worker failed before the start (exit {w.wait(10)})")
        for w in workers:
            w.stdin.write("go\n")
            w.stdin.flush()
        results = []
        for w in workers:
            outs, _ = w.communicate(timeout=timeout)
            if w.returncode != 0:
                raise RuntimeError(f"load worker exited {w.returncode}")
            results.append(json.loads(outs.strip().splitlines()[-1]))
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
    seconds = max(r["end"] for r in results) - min(r["start"] for r in results)
    ttfts = [t for r in results for t in r["ttfts"] if t is not None]
    n = sum(r["requests"] for r in results)
    errors = [e for r in results for e in r["errors"]]
    return {"requests_per_s": n / seconds, "requests": n, "errors": len(errors), "error_codes": sorted(set(errors)),
            "seconds": seconds, "events_per_request": sum(r["events"] for r in results) / max(1, n - len(errors)),
            "ttft_p50_ms": 1000 * (pct(ttfts, 50) or 0), "ttft_p99_ms": 1000 * (pct(ttfts, 99) or 0),
            "ttft_mean_ms": 1000 * (statistics.fmean(ttfts) if ttfts else 0), "clients": clients, "procs": procs,
            "client_cpu_s": sum(r["cpu_s"] for r in results)}


# ----------------------------------------------------------------------------- the generator's own ceiling


async def _trivial_server(port: int, events: int, ready: asyncio.Event | None = None) -> None:
    """Answers every request with ``events`` SSE text events and [DONE], one write per event and a yield to the
    loop between (so the events of all connections interleave as an engine's steps would send them)."""
    chunk = b'data: {"id":"cmpl-0","object":"text_completion","created":0,"model":"m","choices":[{"index":0,' \
            b'"text":" w123","logprobs":null,"finish_reason":null}]}\n\n'
    framed = f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n"
    done = b"data: [DONE]\n\n"
    done = f"{len(done):x}\r\n".encode() + done + b"\r\n0\r\n\r\n"
    head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                length = 0
                while (line := await reader.readuntil(b"\r\n")) != b"\r\n":
                    if line[:15].lower() == b"content-length:":
                        length = int(line[15:])
                await reader.readexactly(length)
                writer.write(head)
                for _ in range(events):
                    writer.write(framed)
                    await asyncio.sleep(0)
                writer.write(done)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", port, backlog=4096)
    print("listening", flush=True)
    async with server:
        await server.serve_forever()


def ceiling(clients: int = 32, requests: int = 200, procs: int | None = None, events: int = NEW_TOKENS + 1) -> dict:
    """This generator against a trivial server in its own process (every answer ready at once)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--serve-trivial", str(port),
                               "--events", str(events)], stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout.readline().strip() == "listening"
        return run(f"http://127.0.0.1:{port}", clients=clients, requests=requests, procs=procs)
    finally:
        server.kill()
        server.wait(10)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--requests", type=int, default=40, help="requests per client")
    ap.add_argument("--procs", type=int, default=None, help="worker processes (default min(4, clients))")
    ap.add_argument("--models", default="lorad", help="comma-separated; client k pins models[k %% len]")
    ap.add_argument("--warm", type=int, default=1)
    ap.add_argument("--prompt-tokens", type=int, default=PROMPT_TOKENS)
    ap.add_argument("--new-tokens", type=int, default=NEW_TOKENS)
    ap.add_argument("--vocab", type=int, default=49152, help="prompt token ids are drawn from [100, vocab - 152)")
    ap.add_argument("--ceiling", action="store_true", help="measure this generator against a trivial server")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--first-client", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--serve-trivial", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--events", type=int, default=NEW_TOKENS + 1, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(asyncio.run(_worker(args))))
    elif args.serve_trivial:
        asyncio.run(_trivial_server(args.serve_trivial, args.events))
    elif args.ceiling:
        print(json.dumps(ceiling(args.clients, args.requests, args.procs)))
    else:
        if not args.url:
            ap.error("--url (or --ceiling) is required")
        print(json.dumps(run(args.url, clients=args.clients, requests=args.requests, procs=args.procs,
                             models=args.models, warm=args.warm, prompt_tokens=args.prompt_tokens,
                             new_tokens=args.new_tokens, vocab=args.vocab)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
