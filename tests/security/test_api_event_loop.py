"""Attack: stall the event loop so that every client, /healthz included, waits (issue 28).

Before the fix four 240k-character stop strings (inside the 1 MB body limit) made the hold-back check
quadratic per token and pushed /healthz from 3 ms to 60+ s; connections that never finished their head
or body were held forever.
"""

from __future__ import annotations

import socket
import threading
import time

import httpx
import pytest

from _live import live

from daemon.server import Detokenizer
from daemon.server.protocol import MAX_STOP_CHARS


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    with live(tmp_path_factory.mktemp("loop"), header_timeout_seconds=1.0, body_timeout_seconds=1.0) as s:
        yield s


def test_huge_stop_strings_are_refused_and_healthz_stays_fast(api):
    body = {"model": "lorad", "prompt": "hello world", "max_tokens": 32, "stop": ["a" * 240_000] * 4}
    answers, latencies, done = [], [], threading.Event()

    def attack():
        with httpx.Client(base_url=api.url, timeout=60) as http:
            for _ in range(3):
                answers.append(http.post("/v1/completions", json=body))
        done.set()

    threading.Thread(target=attack, daemon=True).start()
    with httpx.Client(base_url=api.url, timeout=60) as http:
        while not done.is_set() or len(latencies) < 20:
            t0 = time.perf_counter()
            assert http.get("/healthz").status_code == 200
            latencies.append(time.perf_counter() - t0)
            time.sleep(0.01)
    assert [r.status_code for r in answers] == [400] * 3
    assert "stop" in answers[0].json()["error"]["message"] and answers[0].json()["error"]["param"] == "stop"
    assert max(latencies) < 0.1, f"/healthz took up to {max(latencies) * 1000:.0f} ms during the attack"


class CharTokenizer:
    """Token id = one character: the matcher's cost, not the tokenizer's, is what is timed."""

    def decode(self, ids, **_):
        return "".join(map(chr, ids))


def push_seconds(n_tokens: int, stop_chars: int) -> float:
    best = float("inf")
    for _ in range(3):
        d = Detokenizer(CharTokenizer(), ["a" * (stop_chars - 1) + "b"] * 4)  # always a partial match
        t0 = time.perf_counter()
        for _ in range(n_tokens):
            d.push(ord("a"))
        best = min(best, time.perf_counter() - t0)
        assert not d.stopped and d.sent == n_tokens - (stop_chars - 1)
    return best


def test_stop_matching_is_linear_in_the_text_and_flat_in_the_stop_length():
    short, long = push_seconds(10_000, 8), push_seconds(10_000, MAX_STOP_CHARS)
    double = push_seconds(20_000, MAX_STOP_CHARS)
    assert long < 3 * short + 0.05, f"stop length {MAX_STOP_CHARS}: {long:.3f} s vs length 8: {short:.3f} s"
    assert double < 3 * long + 0.05, f"20k tokens {double:.3f} s vs 10k tokens {long:.3f} s"


def raw_connection(api) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", api.server.port), timeout=10)
    return sock


def test_a_head_that_never_ends_is_closed(api):
    with raw_connection(api) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")  # and never the blank line
        t0 = time.monotonic()
        assert sock.recv(1024) == b"", "the server must close the connection"
        assert time.monotonic() - t0 < 5


def test_a_body_that_never_ends_gets_408(api):
    with raw_connection(api) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100\r\n\r\n{\"prompt\": ")
        t0 = time.monotonic()
        answer = b""
        while b"serve.body_timeout_seconds" not in answer and (chunk := sock.recv(4096)):
            answer += chunk
        assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
        assert b"serve.body_timeout_seconds" in answer and time.monotonic() - t0 < 5
    with httpx.Client(base_url=api.url, timeout=30) as http:
        assert http.get("/healthz").status_code == 200
